"""`segaware-caffe export --python`: the generated module computes what sc.Net computes."""
import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from segaware_caffe import caffe_proto
import segaware_caffe as sc
from segaware_caffe.converters.emitters import emitter_for, register_emitter
from segaware_caffe.converters.python_export import build_net, instantiate, python_source, unused_inputs
from segaware_caffe.resize import resize_deploy
from tests.conftest import GOLDEN
from tests.net.test_no_backward import CASES as NO_BACKWARD_CASES
from tests.net.test_no_backward import case_feeds, case_net, refusal_pattern
from tests.tolerances import EXPORT_MAXREL, max_relative_error
from segaware_caffe.tools.cli import main

# torch 2.13 deprecates TorchScript; tracing still works and the issue asks for it
JIT_WARNINGS = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning",
                                          "ignore::torch.jit.TracerWarning")
GOLDEN_LAYERS = sorted((GOLDEN / "layers").glob("*/meta.json"))


def import_file(path, name="exported_model"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def written_datasets(net):
    """{file/dataset: tensor} of what the net's HDF5Output layers wrote."""
    files = [r.module.file_name for r in net.records if r.type == "HDF5Output"]
    if not files:
        return {}
    h5py = pytest.importorskip("h5py", reason="HDF5Output writes HDF5 files; needs h5py")
    written = {}
    for name in files:
        with h5py.File(name, "r") as f:
            written.update({f"{name}/{k}": torch.from_numpy(f[k][()]) for k in f})
    return written


def golden_case_net(meta_path, tmp_path, monkeypatch):
    """(case folder, meta, net with its weights) of a golden case. Data layers read (and
    HDF5Output writes) files relative to the working directory: it becomes a copy of the case
    folder, as the original ran there."""
    case = meta_path.parent
    meta = json.loads(meta_path.read_text())
    shutil.copytree(case, tmp_path / "case")
    monkeypatch.chdir(tmp_path / "case")
    net = build_net(case / "net.prototxt", phase=meta["phase"].lower(),
                    variables=meta.get("variables") or None)
    if (case / "weights.caffemodel").exists():
        net.load_weights(case / "weights.caffemodel")
    return case, meta, net


@pytest.mark.parametrize("meta_path", GOLDEN_LAYERS, ids=lambda p: p.parent.name)
def test_golden_layer_nets(meta_path, tmp_path, monkeypatch):
    """Every golden layer net, exported: emitters and fallbacks on awkward settings."""
    case, meta, net = golden_case_net(meta_path, tmp_path, monkeypatch)
    export = python_source(net)
    model = instantiate(export, net)
    if net.phase == "TRAIN":
        model.train()
    data = np.load(case / "data.npz")
    inputs = [torch.from_numpy(data["in/" + name].copy()) for name in net.input_names]
    for record in net.records:
        if record.type == "MemoryData":   # the same arrays handed to both
            net.set_input_arrays(data["src/data"].copy(), data["src/label"].copy())
            getattr(model, record.key).set_input_arrays(data["src/data"].copy(),
                                                        data["src/label"].copy())
    torch.manual_seed(0)
    with torch.no_grad():
        ref = net.forward(**dict(zip(net.input_names, inputs)))
    ref.update(written_datasets(net))
    torch.manual_seed(0)
    with torch.no_grad():   # the module takes only the inputs some layer reads
        got = model(*[x for name, x in zip(net.input_names, inputs) if name in export.inputs])
    got.update(written_datasets(net))   # the exported writer rewrote the same file
    for name in unused_inputs(net):     # and does not hand them back
        assert name not in export.inputs
        ref.pop(name, None)
    assert set(got) == set(ref)
    errors = {k: max_relative_error(got[k], ref[k]) for k in ref}
    print(case.name, {k: f"{v:.1e}" for k, v in errors.items()},
          {layer.type: layer.how for layer in export.layers})
    assert errors, "the net reports no outputs"
    assert max(errors.values()) <= EXPORT_MAXREL, errors


DEPLOY = [("embs", 65), ("vgg", 65), ("res", 65)]


@pytest.mark.slow
@pytest.mark.parametrize("name, size", DEPLOY, ids=[d[0] for d in DEPLOY])
def test_deploy_exports_match_net(reference, tmp_path, name, size):
    """The released deploy nets (resized) with filler weights: export with the caffemodel, import the
    file, load() its safetensors, and compare with sc.Net on the same inputs."""
    net_param = resize_deploy(caffe_proto.read_net(reference / f"segaware/config/{name}/deploy.prototxt"), size)
    prototxt = tmp_path / "deploy.prototxt"
    caffe_proto.write_net(net_param, prototxt)
    torch.manual_seed(0)
    net = sc.Net(prototxt)
    net.save_weights(tmp_path / "filler.caffemodel")
    assert main(["export", str(prototxt), str(tmp_path / "filler.caffemodel"),
                 "--python", str(tmp_path / "model.py")]) == 0
    assert (tmp_path / "model.safetensors").exists()
    # the segmentation-aware convolutions are written fused, as sc.Net runs them
    source = (tmp_path / "model.py").read_text()
    assert source.count("= masked_conv2d(") == len(net.fused_groups) == (14 if name == "vgg" else 0)
    assert "import Im2col" not in source
    module = import_file(tmp_path / "model.py", f"exported_{name}")
    model = module.load()
    torch.manual_seed(1)
    inputs = {k: torch.rand(s) * 255 for k, s in net.input_shapes.items()}
    unused = unused_inputs(net)           # vgg's label: no layer reads it, the module omits it
    assert unused == (["label"] if name == "vgg" else [])
    with torch.no_grad():
        ref = net.forward(**inputs)
        got = model(**{k: v for k, v in inputs.items() if k not in unused})
    assert set(got) == set(ref) - set(unused)
    errors = {k: max_relative_error(got[k], ref[k]) for k in got}
    print(f"{name} deploy at {size}: max relative error {errors}")
    assert max(errors.values()) <= EXPORT_MAXREL


def test_source_reads_like_the_net(reference, tmp_path):
    net = build_net(reference / "bvlc/mnist_lenet.prototxt")
    source = python_source(net).source
    for line in ("self.conv1 = nn.Conv2d(1, 20, kernel_size=5)",
                 "self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)",
                 "self.ip1 = nn.Linear(800, 500)",
                 "conv1 = self.conv1(data)",
                 "ip1 = self.ip1(pool2.flatten(1))",
                 "return {'prob': prob}"):
        assert line in source, line
    compile(source, "lenet.py", "exec")


@pytest.mark.slow
@JIT_WARNINGS
def test_jit_trace_and_compile(reference):
    net = build_net(reference / "bvlc/mnist_lenet.prototxt", input_shapes={"data": (2, 1, 28, 28)})
    export = python_source(net)
    model = instantiate(export, net)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = net.graph_module()(*net.feed({"data": x}))["prob"]   # the graph export writes out
        traced = torch.jit.trace(model, (x,), strict=False)
        assert torch.equal(traced(x)["prob"], ref)
        compiled = torch.compile(model)
        assert max_relative_error(compiled(x)["prob"], ref) <= EXPORT_MAXREL


@JIT_WARNINGS
def test_jit_trace_segaware_net(golden):
    """A net with segmentation-aware kernels (Im2dist) traces too."""
    case = golden / "layers/segaware_conv"
    net = build_net(case / "net.prototxt")
    net.load_weights(case / "weights.caffemodel")
    model = instantiate(python_source(net), net)
    data = np.load(case / "data.npz")
    inputs = [torch.from_numpy(data["in/" + n].copy()) for n in net.input_names]
    with torch.no_grad():
        traced = torch.jit.trace(model, tuple(inputs), strict=False)
        ref = net.forward(**dict(zip(net.input_names, inputs)))
        got = traced(*inputs)
    assert max(max_relative_error(got[k], ref[k]) for k in ref) <= EXPORT_MAXREL


def test_emitter_registry():
    assert emitter_for("Convolution") is not None and emitter_for("NoSuchType") is None
    with pytest.raises(ValueError, match="already registered"):
        register_emitter("ReLU")(lambda spec: None)


def test_export_needs_an_output(reference, capsys):
    assert main(["export", str(reference / "bvlc/mnist_lenet.prototxt")]) == 1
    assert "give --python FILE and/or --onnx FILE" in capsys.readouterr().err


def test_propagate_down_false_carries_into_the_export():
    text = """
    name: "t"
    input: "a" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }
    input: "b" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }
    layer { name: "ca" type: "Convolution" bottom: "a" top: "ca"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" } } }
    layer { name: "cb" type: "Convolution" bottom: "b" top: "cb"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" } } }
    layer { name: "sum" type: "Eltwise" bottom: "ca" bottom: "cb" top: "s"
            propagate_down: true propagate_down: false }
    """
    net = build_net(caffe_proto.read_net(text))
    export = python_source(net)
    assert "cb.detach()" in export.source
    model = instantiate(export, net).train()
    a, b = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    model(a, b)["s"].sum().backward()
    net.forward(a=a, b=b)["s"].sum().backward()
    for key in ("ca", "cb"):
        mine, theirs = dict(model.named_parameters())[f"{key}.weight"], net.params[key][0]
        assert (mine.grad is None) == (theirs.grad is None), key
    assert dict(model.named_parameters())["ca.weight"].grad is not None
    torch.testing.assert_close(dict(model.named_parameters())["ca.weight"].grad, net.params["ca"][0].grad)


def test_export_keeps_the_zeroed_element_0_of_unwritten_outputs():
    # see segaware_caffe.net.zero_first_element; an input no layer reads (like vgg deploy's
    # `label`) is left out of the module altogether
    from tests.net.test_zeroing import ZEROED_NET
    net = build_net(caffe_proto.read_net(ZEROED_NET))
    export = python_source(net)
    for line in ("x = zero_first_element(x)", "c = zero_first_element(c)"):
        assert line in export.source, line
    assert "z = zero_first_element(" not in export.source    # read through a Split
    assert "label" not in export.inputs and "label" not in export.outputs
    assert "label" in net.outputs and "zero_first_element(label)" not in export.source
    model = instantiate(export, net)
    inputs = {"x": torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True),
              "label": torch.tensor([[7.0, 8.0, 9.0, 10.0]]),
              "y": torch.ones(1, 4), "z": torch.ones(1, 4)}
    got = model(*[inputs[name] for name in export.inputs])
    ref = net.forward(**inputs)
    assert ref["label"].tolist() == [[0.0, 8.0, 9.0, 10.0]]
    assert set(got) == set(ref) - {"label"}
    for k in got:
        assert torch.equal(got[k], ref[k]), k
    assert got["xr"].tolist() == [0.0, 2.0, 3.0, 4.0]
    got["xr"].sum().backward()
    assert inputs["x"].grad.flatten().tolist() == [1.0, 1.0, 1.0, 1.0]


HOSTILE = '''
name: "evil\\"\\"\\"\\nimport os; BOOM = 1\\n\\"\\"\\"'\\\\"
input: "x\\n = 1; BOOM = 2 #" input_shape { dim: 1 dim: 2 }
layer { name: "class" type: "Power" bottom: "x\\n = 1; BOOM = 2 #" top: "y\\"\\"\\"; BOOM = 3"
        power_param { scale: 2 } }
layer { name: "lambda\\n    BOOM = 4" type: "InnerProduct" bottom: "y\\"\\"\\"; BOOM = 3" top: "z')]; BOOM = 5 #"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "w\\"\\"\\"" type: "MatWrite" bottom: "y\\"\\"\\"; BOOM = 3"
        mat_write_param { prefix: "out/\\"\\"\\"; BOOM = 6; \\"\\"\\"" } }
'''


def test_names_and_strings_from_the_file_never_become_code(tmp_path, monkeypatch):
    """Net, layer and blob names and parameter strings with quotes, triple quotes and newlines
    reach the source only as identifiers or repr()'d literals: the module compiles, defines no
    BOOM, and computes what the net computes."""
    from segaware_caffe.converters.python_export import load_source
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)     # MatWrite writes only inside the working directory
    net = build_net(caffe_proto.read_net(HOSTILE))
    export = python_source(net)
    compile(export.source, "hostile.py", "exec")
    module = load_source(export.source)
    import builtins
    assert not hasattr(module, "BOOM") and not hasattr(builtins, "BOOM")
    model = instantiate(export, net)
    x = torch.randn(1, 2)
    got = model(x)
    # a layer without tops still runs (MatWrite writes its file)
    written = list((tmp_path / "out").iterdir())
    assert len(written) == 1
    written[0].unlink()
    ref = net.forward(**{net.input_names[0]: x})
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert set(ref) == {"z')]; BOOM = 5 #"}
    assert "# class (Power)" in export.source and "self.lambda_____BOOM___4 = nn.Linear" in export.source



def test_refused_gradients_carry_into_the_export():
    from tests.net.toy_net import REFUSING_NET
    text = REFUSING_NET
    net = build_net(caffe_proto.read_net(text))
    export = python_source(net)
    assert "par = refuse_gradient(" in export.source
    model = instantiate(export, net).train()
    out = model(torch.ones(4))["par"]
    with pytest.raises(sc.errors.NoBackwardError, match=r"parity \(Im2parity\) has no backward"):
        out.sum().backward()


@pytest.mark.parametrize("case", NO_BACKWARD_CASES, ids=[c.ids or c.type for c in NO_BACKWARD_CASES])
def test_every_refusal_carries_into_the_export(case):
    """Each layer type the original cannot backpropagate through: the exported module refuses
    the gradient as sc.Net does, and computes the same tops."""
    net = case_net(case)
    model = instantiate(python_source(net), net).train()
    out = model(**case_feeds(case))
    ref = net.forward(**case_feeds(case))
    if case.type not in ("Augmentation", "AdaptiveBiasChannel"):   # they draw random numbers
        torch.testing.assert_close(out["t0"], ref["t0"], equal_nan=True)
    with pytest.raises(sc.errors.NoBackwardError, match=refusal_pattern(case)):
        net.loss(out).backward()
    # propagate_down: false for the refused bottom: nothing is refused
    spared = case_net(case, propagate_down=[False] * len(case.bottoms))
    model = instantiate(python_source(spared), spared).train()
    trains = {k.removeprefix("layers."): p.requires_grad for k, p in spared.named_parameters()}
    for name, p in model.named_parameters():     # lr_mult 0 is the Net's, not the module's
        p.requires_grad_(trains[name])
    loss = spared.loss(model(**case_feeds(case)))
    if loss.requires_grad:
        loss.backward()


def test_the_export_refuses_a_gradient_of_learnable_blobs_of_a_layer_without_backward():
    case = next(c for c in NO_BACKWARD_CASES if c.type == "NospConvMeanfield")
    trains = dataclasses.replace(case, params=case.params.replace(
        "param { lr_mult: 0 } param { lr_mult: 0 } ", ""))
    net = case_net(trains, learnable=False)
    export = python_source(net)
    assert "refuse_gradient(" in export.source and "self.t.compatibility" in export.source
    model = instantiate(export, net).train()
    with pytest.raises(sc.errors.NoBackwardError, match=r"t \(NospConvMeanfield\) has no backward "
                                                        r"in the original Caffe, but a gradient "
                                                        r"was asked of its learnable blobs"):
        net.loss(model(**case_feeds(case))).backward()
    for p in model.parameters():      # frozen: nothing asked
        p.requires_grad_(False)
    assert not net.loss(model(**case_feeds(case))).requires_grad


@pytest.mark.parametrize("pooling", ["kernel_size: 3 stride: 2", "kernel_h: 2 kernel_w: 3 stride: 1",
                                     "global_pooling: true"])
def test_stochastic_pooling_in_the_test_phase_exports_its_own_numbers(pooling):
    """TEST-phase STOCHASTIC pooling is sum(x^2) / sum(x) per window, not an average: the
    export runs the layer class, and gives sc.Net's numbers."""
    net = sc.Net('input: "x" input_shape { dim: 2 dim: 3 dim: 7 dim: 6 } layer { name: "p" '
                 f'type: "Pooling" bottom: "x" top: "y" pooling_param {{ pool: STOCHASTIC {pooling} }} }}')
    export = python_source(net)
    assert "AvgPool2d" not in export.source and ".mean(" not in export.source
    x = torch.rand(2, 3, 7, 6, generator=torch.Generator().manual_seed(5))
    got = instantiate(export, net)(x)["y"]
    want = net.forward(x=x)["y"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    windows = x.unfold(2, 3, 2).unfold(3, 3, 2) if pooling.startswith("kernel_size") else None
    if windows is not None:       # the first full windows, from the definition
        ref = (windows ** 2).sum((-1, -2)) / windows.sum((-1, -2))
        torch.testing.assert_close(want[:, :, :ref.shape[2], :ref.shape[3]], ref)
