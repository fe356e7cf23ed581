"""The build pipeline (segaware_caffe.canonical): reading, legacy inputs, input shapes, NetState
filtering and Caffe's InsertSplits, checked against split nets written out by hand from Caffe's
rules (the layouts of BVLC's split-insertion tests)."""
from pathlib import Path

import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.caffe_proto import caffe_pb2, read_net
from segaware_caffe.canonical import (FROM_LEGACY_INPUTS, FROM_PROTOTXT, FROM_SPLITS, canonical_net,
                                      insert_splits, read_net_source)


DATA = 'layer { name: "data" type: "DummyData" top: "data" top: "label" }\n'


def layers(param):
    """(name, type, bottoms, tops, loss weights) per layer."""
    return [(lp.name, lp.type, list(lp.bottom), list(lp.top), list(lp.loss_weight))
            for lp in param.layer]


def split(body):
    """insert_splits of a net made of the DummyData layer DATA and `body`: (param, origins)."""
    return insert_splits(read_net(DATA + body))


def test_no_split_for_single_readers_and_in_place_chains():
    body = """
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" }
    layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
    layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" }
    """
    out, origins = split(body)
    assert layers(out) == layers(read_net(DATA + body))
    assert origins == [None] * 4


def test_a_blob_read_twice_gets_a_split_right_after_its_producer():
    out, origins = split("""
    layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" }
    layer { name: "ip2" type: "InnerProduct" bottom: "data" top: "ip2" }
    layer { name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "ip2" }
    """)
    assert layers(out) == [
        ("data", "DummyData", [], ["data", "label"], []),
        ("data_data_0_split", "Split", ["data"], ["data_data_0_split_0", "data_data_0_split_1"],
         [0.0, 0.0]),
        ("ip1", "InnerProduct", ["data_data_0_split_0"], ["ip1"], []),
        ("ip2", "InnerProduct", ["data_data_0_split_1"], ["ip2"], []),
        ("loss", "EuclideanLoss", ["ip1", "ip2"], [], []),
    ]
    assert origins == [None, FROM_SPLITS, None, None, None]


def test_in_place_chains_split_after_the_last_rewrite():
    # BVLC's TestWithInPlace layout: the ReLU rewrites innerprod1, whose two readers then share a
    # Split named after the ReLU; the data blob's two readers get one after the data layer
    out, _ = split("""
    layer { name: "innerprod1" type: "InnerProduct" bottom: "data" top: "innerprod1" }
    layer { name: "relu1" type: "ReLU" bottom: "innerprod1" top: "innerprod1" }
    layer { name: "innerprod2" type: "InnerProduct" bottom: "innerprod1" top: "innerprod2" }
    layer { name: "loss1" type: "EuclideanLoss" bottom: "innerprod1" bottom: "label" }
    layer { name: "loss2" type: "EuclideanLoss" bottom: "innerprod2" bottom: "data" }
    """)
    assert [(n, b, t) for n, _, b, t, _ in layers(out)] == [
        ("data", [], ["data", "label"]),
        ("data_data_0_split", ["data"], ["data_data_0_split_0", "data_data_0_split_1"]),
        ("innerprod1", ["data_data_0_split_0"], ["innerprod1"]),
        ("relu1", ["innerprod1"], ["innerprod1"]),
        ("innerprod1_relu1_0_split", ["innerprod1"],
         ["innerprod1_relu1_0_split_0", "innerprod1_relu1_0_split_1"]),
        ("innerprod2", ["innerprod1_relu1_0_split_0"], ["innerprod2"]),
        ("loss1", ["innerprod1_relu1_0_split_1", "label"], []),
        ("loss2", ["innerprod2", "data_data_0_split_1"], []),
    ]


def test_a_loss_weight_counts_as_a_reader_and_moves_to_split_0():
    out, _ = split("""
    layer { name: "p" type: "Power" bottom: "data" top: "p" loss_weight: 3 }
    layer { name: "q" type: "Power" bottom: "p" top: "q" }
    layer { name: "r" type: "Power" bottom: "p" top: "r" }
    """)
    assert layers(out)[1] == ("p", "Power", ["data"], ["p"], [])      # its own list is cleared
    assert layers(out)[2] == ("p_p_0_split", "Split", ["p"],
                              ["p_p_0_split_0", "p_p_0_split_1", "p_p_0_split_2"], [3.0, 0.0, 0.0])
    assert layers(out)[3][2] == ["p_p_0_split_1"] and layers(out)[4][2] == ["p_p_0_split_2"]


def test_a_zero_loss_weight_is_no_reader():
    out, _ = split("""
    layer { name: "p" type: "Power" bottom: "data" top: "p" loss_weight: 0 }
    layer { name: "q" type: "Power" bottom: "p" top: "q" }
    """)
    assert [lp.type for lp in out.layer] == ["DummyData", "Power", "Power"]


def test_legacy_inputs_become_an_input_layer_and_keep_caffes_split_names():
    canonical = canonical_net("""
    name: "t"
    input: "a" input_shape { dim: 1 dim: 2 }
    input: "b" input_shape { dim: 1 dim: 2 }
    layer { name: "x" type: "Eltwise" bottom: "a" bottom: "b" top: "x" }
    layer { name: "y" type: "Eltwise" bottom: "b" bottom: "x" top: "y" }
    """)
    assert layers(canonical.param)[:2] == [
        ("input", "Input", [], ["a", "b"], []),
        ("b_input_1_split", "Split", ["b"], ["b_input_1_split_0", "b_input_1_split_1"], [0.0, 0.0])]
    assert canonical.origins == [FROM_LEGACY_INPUTS, FROM_SPLITS, FROM_PROTOTXT, FROM_PROTOTXT]
    assert not len(canonical.param.input)
    assert canonical.inputs() == {"a": (1, 2), "b": (1, 2)}


def test_every_layer_runs_in_its_own_phase_or_the_nets():
    canonical = canonical_net("""
    input: "a" input_shape { dim: 1 }
    layer { name: "p" type: "Power" bottom: "a" top: "p" }
    layer { name: "q" type: "Power" bottom: "a" top: "q" phase: TRAIN }
    """, phase="test")
    assert [caffe_pb2.Phase.Name(lp.phase) for lp in canonical.param.layer] == \
        ["TEST", "TEST", "TEST", "TRAIN"]
    assert canonical.param.state.phase == caffe_pb2.TEST


def test_filtering_before_splitting():
    # the TRAIN-only reader is gone before the split count: no Split in the TEST net
    text = """
    input: "a" input_shape { dim: 1 }
    layer { name: "p" type: "Power" bottom: "a" top: "p" }
    layer { name: "q" type: "Power" bottom: "a" top: "q" include { phase: TRAIN } }
    """
    assert [lp.type for lp in canonical_net(text, phase="test").param.layer] == ["Input", "Power"]
    assert [lp.type for lp in canonical_net(text, phase="train").param.layer] == \
        ["Input", "Split", "Power", "Power"]


def test_one_rule_for_path_text_and_netparameter(tmp_path):
    text = 'name: "n" input: "a" input_shape { dim: 1 }'
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    for model in (path, str(path)):
        source = read_net_source(model)
        assert (source.path, source.where, source.base_dir) == (str(path), str(path), str(tmp_path))
    source = read_net_source(text)
    assert (source.path, source.where, source.base_dir) == (None, "net n", ".")
    param = read_net(text)
    copy = read_net_source(param)
    assert copy.param == param and copy.param is not param
    canonical_net(param)
    assert len(param.input) == 1        # the caller's NetParameter is not changed
    assert read_net_source(copy) is copy


def test_input_shapes_override_the_declared_ones():
    text = """
    name: "t"
    input: "x" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }
    layer { name: "in" type: "Input" top: "y" top: "z" input_param { shape { dim: 4 } } }
    layer { name: "p" type: "Power" bottom: "x" top: "p" }
    """
    net = sc.Net(text, input_shapes={"x": (2, 2, 5, 7), "z": (6,)})
    assert net.input_shapes == {"x": (2, 2, 5, 7), "y": (4,), "z": (6,)}
    assert net.blob_shapes["p"] == (2, 2, 5, 7)
    out = net.forward(x=torch.ones(2, 2, 5, 7), y=torch.ones(4), z=torch.ones(6))
    assert out["p"].shape == (2, 2, 5, 7)
    with pytest.raises(sc.NetBuildError, match=r"no input named 'w' \(inputs: x, y, z\)"):
        sc.Net(text, input_shapes={"w": (1,)})


@pytest.mark.parametrize("text, message", [
    ('input: "a" input_shape { dim: 1 } input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1',
     r"net <text>: give net inputs either as input_shape or as input_dim, not both"),
    ('input: "a"', r"net inputs \['a'\] have no input_shape or input_dim"),
    ('input: "a" input_shape { dim: 1 }\nlayer { name: "p" type: "Power" bottom: "b" top: "p" }',
     r"p \(Power\): bottom blob 'b' is not produced by any earlier layer or net input "
     r"\(known blobs: a\)"),
    ('layer { name: "p" type: "Power" top: "p" include { phase: TEST } exclude { phase: TRAIN } }',
     r"p \(Power\): specify either include or exclude rules, not both"),
])
def test_pipeline_errors_name_the_net_or_layer(text, message):
    with pytest.raises(sc.NetBuildError, match=message):
        canonical_net(text)


X = 'input: "x" input_shape { dim: 2 dim: 3 }\n'


@pytest.mark.parametrize("body, message", [
    ('layer { name: "a" type: "ReLU" bottom: "x" top: "y" }\n'
     'layer { name: "b" type: "Sigmoid" bottom: "y" top: "y2" }\n'
     'layer { name: "c" type: "TanH" bottom: "x" top: "y" }',
     r"^c \(TanH\): top blob 'y' is produced by multiple sources: layer 'a' \(ReLU\) already "
     r"produces it; a layer may write an existing blob only in place \(top 0 named like bottom 0\)"),
    ('layer { name: "s" type: "Slice" bottom: "x" top: "y" top: "y" }',
     r"^s \(Slice\): top blob 'y' is produced by multiple sources: this layer names it twice"),
    # in place on a blob, but at the wrong top index (Caffe compares top j with bottom j)
    ('layer { name: "e" type: "Eltwise" bottom: "x" bottom: "x2" top: "x2" }',
     r"^e \(Eltwise\): top blob 'x2' is produced by multiple sources: layer 'input' \(Input\)"),
    ('layer { name: "d" type: "DummyData" top: "x" dummy_data_param { shape { dim: 2 } } }',
     r"^d \(DummyData\): top blob 'x' is produced by multiple sources: layer 'input' \(Input\)"),
    # x is read by a and by the in-place b: the Split takes b out of place, as in Caffe
    ('layer { name: "a" type: "ReLU" bottom: "x" top: "y" }\n'
     'layer { name: "b" type: "ReLU" bottom: "x" top: "x" }',
     r"^b \(ReLU\): top blob 'x' is produced by multiple sources: layer 'input' \(Input\) "
     r"already produces it\. The layer is in place on 'x' in the prototxt, but that version of 'x' "
     r"has other readers too, so Caffe's InsertSplits feeds this layer a Split top "
     r"\('x_input_0_split_1'\)"),
])
def test_a_blob_produced_by_two_layers_is_an_error_naming_both(body, message):
    text = X + 'input: "x2" input_shape { dim: 2 dim: 3 }\n' + body
    with pytest.raises(sc.NetBuildError, match=message):
        canonical_net(text)


def test_legacy_inputs_declared_twice():
    with pytest.raises(sc.NetBuildError, match=r"^net <text>: input blob 'x' is declared twice$"):
        canonical_net(X + X)


def test_in_place_chains_and_excluded_layers_are_single_sources():
    body = """
    layer { name: "r" type: "ReLU" bottom: "x" top: "x" }
    layer { name: "d" type: "Dropout" bottom: "x" top: "x" }
    layer { name: "a" type: "ReLU" bottom: "x" top: "y" include { phase: TRAIN } }
    layer { name: "b" type: "Sigmoid" bottom: "x" top: "y" include { phase: TEST } }
    layer { name: "p" type: "Power" bottom: "y" top: "y" }
    """
    for phase in ("train", "test"):
        net = sc.Net(X + body, phase=phase)
        assert net.outputs == ["y"]


def test_phase_must_be_train_or_test(tmp_path):
    with pytest.raises(sc.NetBuildError, match=r"phase must be 'train' or 'test', got 'deploy'"):
        sc.Net('input: "a" input_shape { dim: 1 }', phase="deploy")


def test_every_builder_goes_through_the_pipeline():
    """The modules that build or read nets import the pipeline, and no other module decides
    path-or-text for a net or upgrades legacy inputs itself."""
    root = Path(__file__).resolve().parents[2]
    for name in ("segaware_caffe/net.py", "segaware_caffe/solver.py", "segaware_caffe/resize.py",
                 "tools/cmd_run.py", "tools/cmd_inspect.py"):
        assert "canonical" in (root / name).read_text(), name
    for folder in ("segaware_caffe", "converters", "tools"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            if path.name == "canonical.py":
                continue
            assert "upgrade_net_input(" not in text, path
            assert "os.path.exists(model" not in text and "input_dim[4 *" not in text, path
