"""Malformed inputs give a CaffeFormatError (or FileExistsError/TypeError) that says what is wrong
and where; never a raw protobuf traceback or a MemoryError."""
import numpy as np
import pytest

from segaware_caffe.caffe_proto import (CaffeFormatError, caffe_pb2, read_blob, read_net, read_solver,
                         read_solverstate, read_variables, read_weights, write_weights)

NET_TEXT_ERRORS = [
    # (prototxt text, regex the message must match)
    ('layer { name: "a" type: "ReLU" bootom: "x" }',
     r"<text>:1:32: in layer 'a' \(ReLU\): .*no field named \"bootom\"(.|\n)*did you mean bottom\?"),
    ('name: "n"\nlayer {\n  name: "conv1"\n  type: "Convolution"\n'
     '  convolution_param { kernal_size: 3 }\n}\n',
     r"<text>:5:23: in layer 'conv1' \(Convolution\): .*ConvolutionParameter.*\"kernal_size\"\.\n"
     r"      convolution_param \{ kernal_size: 3 \}\n {26}\^\n    did you mean kernel_size"),
    ('layer { name: "p" type: "Pooling" pooling_param { pool: MAXX } }',
     r"in layer 'p' \(Pooling\).*no value named MAXX(.|\n)*did you mean MAX\? allowed: MAX, AVE, STOCHASTIC"),
    ('layer { name: "c" type: "Convolution" convolution_param { num_output: "many" } }',
     r"1:\d+: in layer 'c' \(Convolution\): .*(integer|Expected)"),
    ('layer { name: "c" type: "Convolution" convolution_param { num_output: -3 } }',
     r"in layer 'c' \(Convolution\): Value out of range: -3"),
    ('layer { name: "c" type: "Convolution" convolution_param { num_output: 2.5 } }',
     r"in layer 'c' \(Convolution\): Couldn't parse integer: 2.5"),
    ('layer { name: "c" type: "Convolution"\n  top: "a"\n',
     r"<text>:\d+:\d+: in layer 'c' \(Convolution\): Expected \"\}\""),
    ('layer { name: "a" type: "ReLU" } }',
     r"<text>:1:\d+: .*Expected identifier or number, got \}"),
    ('nme: "net"\nlayer { name: "a" }',
     r"<text>:1:1: .*NetParameter.*no field named \"nme\"(.|\n)*did you mean name\?"),
    ('layer { name: "x" name: "y" }', r"in layer 'x' \(\?\): .*multiple \"name\" fields"),
    ('layer { name: "d" type: "Data" include { phase: TRIAN } }',
     r"in layer 'd' \(Data\): .*no value named TRIAN(.|\n)*did you mean TRAIN\?"),
    ('layers { name: "v1" type: CONVOLUTON }',
     r"in layer 'v1' \(CONVOLUTON\): .*no value named CONVOLUTON(.|\n)*did you mean CONVOLUTION"),
    ('layer { name: "a" type: ReLU }', r"in layer 'a' \(ReLU\): Expected string"),
    ('layer { name: "s" type: "Scale" scale_param { filler { type: "constant" valeu: 1 } } }',
     r"in layer 's' \(Scale\): .*FillerParameter.*\"valeu\"(.|\n)*did you mean value\?"),
    ('layer { name: "ok" }\nlayer { name: "a" type: "ReLU" }\nlayers { name: "b" type: RELU }',
     r"mixes current `layer \{ \}` \(2\) and legacy `layers \{ \}` \(1\)"),
    ('layer: { name: "a" type: "ReLU" bootom: "x" }',
     r"<text>:1:33: in layer 'a' \(ReLU\): .*\"bootom\""),
    ('layers { layer { name: "v0" type: "conv" kernelsze: 3 } }',
     r"in layer 'v0' \(conv\): .*V0LayerParameter.*\"kernelsze\"(.|\n)*did you mean kernelsize"),
    ('input: "x" layers { layer { name: "q" type: "quux" } bottom: "x" top: "y" }',
     r"V0 layer 'q' has unknown type 'quux'; V0 types are accuracy, bnll"),
    ('input: "x" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "p" }'
     ' layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }',
     r"padding layer 'p' feeds layer 'r' of type 'relu'; only conv and pool"),
    ('layers { layer { name: "r" type: "relu" } bottom: "nowhere" top: "r" }',
     r"V0 layer 'r' \(relu\) reads blob 'nowhere', which no earlier layer or net input produces"),
]


@pytest.mark.parametrize("text, pattern", NET_TEXT_ERRORS)
def test_net_text_errors(text, pattern):
    with pytest.raises(CaffeFormatError, match=pattern):
        read_net(text)


def test_unresolved_variables_are_all_listed_with_lines():
    text = 'name: "${NET_ID}"\nlayer {\n  name: "${NET_ID}_conv"\n  top: "${TOP}"\n}\n'
    with pytest.raises(CaffeFormatError, match=r"<text>: 2 template variables not set: "
                       r"\$\{NET_ID\} \(lines 1, 3\); \$\{TOP\} \(line 4\)"):
        read_net(text, {"OTHER": 1})


def test_unresolved_variable_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "a.prototxt"\nbase_lr: ${LEARNING_RATE}\n')
    with pytest.raises(CaffeFormatError, match=r"solver.prototxt: 1 template variable not set: "
                       r"\$\{LEARNING_RATE\} \(line 2\)"):
        read_solver(path)


def test_syntax_error_in_a_file_names_file_line_and_column(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "n"\nlayer {\n  name: "a"\n  type: "ReLU"\n  botom: "x"\n}\n')
    with pytest.raises(CaffeFormatError, match=rf"{path}:5:3: in layer 'a' \(ReLU\)"):
        read_net(path)


def test_error_after_substitution_keeps_line_numbers():
    with pytest.raises(CaffeFormatError, match=r"<text>:3:\d+: in layer 'c' \(Convolution\)"):
        read_net('layer {\n name: "c" type: "Convolution"\n convolution_param { num_output: ${N} } }',
                 {"N": "x"})


def test_missing_and_binary_and_directory_net_files(tmp_path):
    with pytest.raises(CaffeFormatError, match=r"nope/net.prototxt: no such file"):
        read_net("nope/net.prototxt")
    with pytest.raises(CaffeFormatError, match=r"is a directory"):
        read_net(tmp_path)
    binary = tmp_path / "w.caffemodel"
    write_weights({"a": [np.ones(3)]}, binary)
    with pytest.raises(CaffeFormatError, match=r"binary file, not a text prototxt .*read_weights"):
        read_net(binary)
    latin = tmp_path / "latin.prototxt"
    latin.write_bytes(b'name: "caf\xe9"')
    with pytest.raises(CaffeFormatError, match=r"latin.prototxt: not UTF-8 text"):
        read_net(latin)


def test_truncated_caffemodels_say_so(golden, tmp_path):
    data = (golden / "layers" / "innerproduct" / "weights.caffemodel").read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 7):
        with pytest.raises(CaffeFormatError, match=r"truncated"):
            read_weights(data[:cut])
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CaffeFormatError, match=rf"{path}: not a valid binary \.caffemodel"):
        read_weights(path)


def test_non_caffe_binaries():
    with pytest.raises(CaffeFormatError, match=r"empty file, expected a binary \.caffemodel"):
        read_weights(b"")
    with pytest.raises(CaffeFormatError, match=r"not a valid binary \.caffemodel"):
        read_weights(np.random.RandomState(0).bytes(1000))
    # bytes that happen to decode, but only into fields a NetParameter does not have
    with pytest.raises(CaffeFormatError, match=r"not a Caffe \.caffemodel .*none of its 2 fields"):
        read_weights(b"\x08\x01\x10\x02")
    with pytest.raises(CaffeFormatError, match=r"text file, not a binary \.caffemodel"):
        read_weights(b'name: "LeNet"\nlayer { name: "conv1" }\n')
    with pytest.raises(CaffeFormatError, match=r"not a Caffe \.caffemodel .*none of layer, layers"):
        read_weights(caffe_pb2.NetParameter(name="only a name").SerializeToString())
    with pytest.raises(CaffeFormatError, match=r"no such file"):
        read_weights("/nonexistent.caffemodel")


def _net_with_blob(**blob_fields):
    net = caffe_pb2.NetParameter()
    layer = net.layer.add(name="fc", type="InnerProduct")
    blob = layer.blobs.add(**blob_fields)
    return net, blob


def _two_layer_weights():
    net = caffe_pb2.NetParameter(name="n")
    first = net.layer.add(name="conv", type="Convolution", bottom=["data"], top=["x"])
    first.blobs.add(shape=caffe_pb2.BlobShape(dim=[2]), data=[1.0, 2.0])
    second = net.layer.add(name="conv2", type="Convolution", bottom=["x"], top=["y"])
    second.convolution_param.weight_filler.type = "gaussian"
    return net.SerializeToString()


@pytest.mark.parametrize("text, bad, pattern", [
    (b"conv2", b"c\xffnv2", r"w\.caffemodel: layer 1 \(Convolution\): field 'name' is not valid "
                            r"UTF-8 text \(b'c\\xffnv2'\)"),
    (b"\x0bConvolution\x1a\x04", b"\x0bConvoluti\xfen\x1a\x04", r"w\.caffemodel: layer 0 'conv' \(Convoluti\ufffdn\): field "
                                        r"'type' is not valid UTF-8 text"),
    (b"data", b"d\xe9ta", r"w\.caffemodel: layer 0 'conv' \(Convolution\): field 'bottom\[0\]' is "
                          r"not valid UTF-8 text \(b'd\\xe9ta'\)"),
    (b"gaussian", b"gau\xffsian", r"layer 1 'conv2' \(Convolution\): field "
                                  r"'convolution_param\.weight_filler\.type' is not valid UTF-8"),
    (b"\n\x01n", b"\n\x01\xff", r"w\.caffemodel: field 'name' is not valid UTF-8 text \(b'\\xff'\)"),
])
def test_string_fields_that_are_not_utf8_name_the_layer_and_field(tmp_path, text, bad, pattern):
    """protobuf returns bytes for such fields; the reader refuses them (the blobs, which hold
    no text, are not walked)."""
    data = _two_layer_weights()
    assert data.count(text) == 1
    (tmp_path / "w.caffemodel").write_bytes(data.replace(text, bad))
    with pytest.raises(CaffeFormatError, match=pattern):
        read_weights(tmp_path / "w.caffemodel")
    read_weights(data)      # the file as written reads


def test_every_caffe_proto_error_is_a_caffe_format_error():
    import inspect
    from segaware_caffe import caffe_proto
    from segaware_caffe.errors import SegawareError
    modules = [caffe_proto] + [getattr(caffe_proto, name) for name in
                               ("binary", "dialects", "extensions", "io", "text", "upgrade", "wire")]
    classes = {cls for module in modules for _, cls in inspect.getmembers(module, inspect.isclass)
               if issubclass(cls, BaseException) and cls.__module__.startswith(caffe_proto.__name__)}
    assert {"CaffeFormatError", "DialectError", "WireError", "DeclarationError"} <= \
        {cls.__name__ for cls in classes}
    for cls in classes:
        assert issubclass(cls, CaffeFormatError) and issubclass(cls, SegawareError), cls


def test_huge_declared_dims_are_rejected_before_allocating():
    net, blob = _net_with_blob()
    blob.shape.dim.extend([10 ** 6, 10 ** 6])
    blob.data.extend([0.0] * 10)
    with pytest.raises(CaffeFormatError, match=r"layer 'fc' blob 0: declared shape \(1000000, "
                       r"1000000\) has 1000000000000 elements but the blob holds 10 data values"):
        read_weights(net.SerializeToString())


def test_legacy_dims_and_negative_dims_are_checked():
    net, blob = _net_with_blob(num=1, channels=2, height=3, width=4)
    blob.data.extend([1.0] * 5)
    with pytest.raises(CaffeFormatError, match=r"declared shape \(1, 2, 3, 4\) has 24 elements"):
        read_weights(net.SerializeToString())
    net, blob = _net_with_blob()
    blob.shape.dim.extend([-2, 3])
    with pytest.raises(CaffeFormatError, match=r"negative dimension in declared shape \(-2, 3\)"):
        read_weights(net.SerializeToString())


def test_bad_binaryproto_and_solverstate(golden):
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([1, 3, 10, 10])
    blob.data.extend([0.5] * 7)
    with pytest.raises(CaffeFormatError, match=r"<bytes>: declared shape \(1, 3, 10, 10\) has 300"):
        read_blob(blob.SerializeToString())
    with pytest.raises(CaffeFormatError, match=r"not a valid binary \.binaryproto"):
        read_blob(b"\xff\xff\xff")
    state = (golden / "solver" / "sgd_step_momentum_wd" /
             "snap_iter_2.solverstate").read_bytes()
    with pytest.raises(CaffeFormatError, match=r"\.solverstate .*truncated"):
        read_solverstate(state[: len(state) // 2])


def test_solver_errors(tmp_path):
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "missing_net.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\n')
    with pytest.raises(CaffeFormatError, match=r"solver.prototxt: net: net file "
                       r"'missing_net.prototxt' not found \(looked in .*missing_net.prototxt"):
        read_solver(solver, load_nets=True)
    with pytest.raises(CaffeFormatError, match=r"SolverParameter.*\"bsae_lr\"(.|\n)*did you mean base_lr"):
        read_solver('net: "a"\nbsae_lr: 0.1')
    with pytest.raises(CaffeFormatError, match=r"names no training net"):
        read_solver('base_lr: 0.1', load_nets=True)
    with pytest.raises(CaffeFormatError, match=r"no value named ADAMM"):
        read_solver('solver_type: ADAMM')


VARIABLE_FILE_ERRORS = [
    ("CROP_SIZE 321\n", r"vars.sh:1: expected KEY=value"),
    ("export A=1\nMASK_PAD=$(( (MASK_SIZE-1)/2 ))\n", r"vars.sh:2: MASK_PAD: command substitution"),
    ('NAME="unterminated\n', r"vars.sh:1: NAME: No closing quotation"),
    ("A=$UNDEFINED/x\n", r"vars.sh:1: A refers to \$UNDEFINED, which is not defined above it"),
    ("A=two words\n", r"vars.sh:1: A: the value has unquoted spaces"),
    ("echo hello\n", r"vars.sh:1: expected KEY=value"),
]


@pytest.mark.parametrize("content, pattern", VARIABLE_FILE_ERRORS)
def test_bad_variable_files(tmp_path, content, pattern):
    path = tmp_path / "vars.sh"
    path.write_text(content)
    with pytest.raises(CaffeFormatError, match=pattern):
        read_variables(path)
    with pytest.raises(CaffeFormatError, match=pattern):
        read_net('name: "${A}"', variables=str(path))


def test_missing_variables_file_and_bad_names(tmp_path):
    with pytest.raises(CaffeFormatError, match=r"nowhere.sh: variables file not found"):
        read_net('name: "x"', variables=str(tmp_path / "nowhere.sh"))
    with pytest.raises(CaffeFormatError, match=r"variable name 'NOT VALID' is not a valid identifier"):
        read_net('name: "x"', variables={"NOT VALID": 1})


def test_writer_argument_errors(tmp_path):
    with pytest.raises(TypeError, match=r"write_weights needs a NetParameter or a dict"):
        write_weights([np.ones(2)], tmp_path / "x.caffemodel")
    with pytest.raises(TypeError, match=r"expected a numeric array"):
        write_weights({"a": [np.array(["text"])]}, tmp_path / "y.caffemodel")
