"""What building a net costs: closed-form top shapes for the common layers (the same shapes as
the fake-tensor inference they replace), and parameters written once -- after parameter
sharing, and without random draws when the weights file sets the layer next."""
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.caffe_proto import caffe_pb2
from segaware_caffe.errors import LayerSetupError
from segaware_caffe.fillers import constant_parameter, fill_parameter
from segaware_caffe.layer import CaffeLayer, layer_class, register_layer, registered_types
from tests.conftest import GOLDEN, REFERENCE, reference_files
from tests.layers.helpers import build


def _overrides_shapes(module):
    return type(module).output_shapes is not CaffeLayer.output_shapes or module.SAME_SHAPE


def _closed_forms_agree(net):
    checked = 0
    for record in net.records:
        module = record.module
        if module.NET_INPUT or not _overrides_shapes(module) or not record.bottoms:
            continue
        if type(module).output_shapes is not CaffeLayer.output_shapes and not (
                module.SAME_SHAPE or type(module).__module__.startswith("segaware_caffe.layers.")
                and type(module).__name__ in CLOSED_FORM):
            continue                                   # a data-dependent override of its own
        bottoms = [net.blob_shapes[b] for b in record.bottoms]
        assert [tuple(s) for s in module.output_shapes(bottoms)] == \
            [tuple(s) for s in module.inferred_shapes(bottoms)], f"{record.name} ({record.type})"
        checked += 1
    return checked


CLOSED_FORM = {"Convolution", "Deconvolution", "Pooling", "InnerProduct", "Concat", "Split",
               "Interp", "Im2col", "Tile", "Slice", "Im2dist", "Im2parity"}

NETS = [REFERENCE / "segaware" / "config" / n / "deploy.prototxt" for n in ("embs", "vgg", "res")] + \
    sorted(p for p in (REFERENCE / "bvlc").glob("*.prototxt")
           if "solver" not in p.name and "train" not in p.name)


@pytest.mark.parametrize("path", reference_files(NETS),
                         ids=lambda p: p and f"{p.parent.name}/{p.name}")
def test_closed_form_shapes_of_reference_nets(path):
    assert _closed_forms_agree(sc.Net(path)) > 0


class _quiet:
    """Warnings off (the golden nets' writers warn about missing output folders)."""

    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


@pytest.mark.parametrize("meta", sorted(GOLDEN.glob("*/*/meta.json"))[:200],
                         ids=lambda p: f"{p.parts[-3]}/{p.parts[-2]}")
def test_closed_form_shapes_of_golden_nets(meta, tmp_path, monkeypatch):
    import json
    import shutil
    case = meta.parent
    if not (case / "net.prototxt").exists():
        pytest.skip(f"{case.name}: no net.prototxt (a solver case)")
    shutil.copytree(case, tmp_path / "case")
    monkeypatch.chdir(tmp_path / "case")
    info = json.loads(meta.read_text())
    with _quiet():
        net = sc.Net(tmp_path / "case" / "net.prototxt", phase=info.get("phase", "TEST").lower(),
                     variables=info.get("variables") or None)
    _closed_forms_agree(net)


# layer bodies (without bottoms and tops), bottom shapes and top count: every SAME_SHAPE type
# and the closed forms at settings other than the default
SNIPPETS = [
    ('type: "AbsVal"', [(2, 3, 4, 5)], 1), ('type: "BNLL"', [(3, 4)], 1),
    ('type: "ELU"', [(2, 3, 1)], 1), ('type: "Exp" exp_param { base: 2 }', [(2, 3, 4, 5)], 1),
    ('type: "Log"', [(5,)], 1), ('type: "Power" power_param { power: 2 }', [(2, 3)], 1),
    ('type: "Power" power_param { scale: 0 }', [(2, 3, 4)], 1), ('type: "Sigmoid"', [(1, 2)], 1),
    ('type: "TanH"', [(2, 2, 2, 2)], 1), ('type: "Threshold"', [(2, 3, 4)], 1),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', [(2, 3, 4, 5)], 1),
    ('type: "PReLU"', [(2, 3, 4, 5)], 1),
    ('type: "PReLU" prelu_param { channel_shared: true }', [(2, 3)], 1),
    ('type: "Dropout"', [(2, 3, 4, 5)], 1),
    ('type: "Scale" scale_param { axis: 0 num_axes: 2 bias_term: true }', [(2, 3, 4, 5)], 1),
    ('type: "Scale" scale_param { axis: 0 }', [(2, 3, 4, 5), (2, 3)], 1),
    ('type: "Bias"', [(2, 3, 4), (3, 4)], 1),
    ('type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3, 4, 5)] * 3, 1),
    ('type: "LRN" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL }', [(2, 3, 7, 5)], 1),
    ('type: "LRN"', [(2, 7, 3, 5)], 1), ('type: "Softmax" softmax_param { axis: 2 }', [(2, 3, 4, 5)], 1),
    ('type: "Swish"', [(2, 3)], 1), ('type: "Clip" clip_param { min: -1 max: 1 }', [(2, 3, 4)], 1),
    ('type: "Normalize"', [(2, 3, 4, 5)], 1),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 '
     'dilation: 2 group: 2 }', [(2, 4, 11, 8)], 1),
    ('type: "Convolution" convolution_param { num_output: 3 kernel_h: 1 kernel_w: 3 axis: 2 }',
     [(2, 2, 4, 9, 7)] * 2, 2),
    ('type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 4 stride: 3 pad: 1 }',
     [(2, 4, 5, 3)], 1),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }', [(2, 3, 8, 7)], 2),
    ('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 stride: 3 round_mode: FLOOR }',
     [(2, 3, 8, 7)], 1),
    ('type: "Pooling" pooling_param { pool: MAX global_pooling: true }', [(2, 3, 8, 7)], 1),
    ('type: "InnerProduct" inner_product_param { num_output: 5 axis: 2 }', [(2, 3, 4, 5)], 1),
    ('type: "Concat" concat_param { axis: -1 }', [(2, 3, 4), (2, 3, 6), (2, 3, 1)], 1),
    ('type: "Split"', [(2, 3)], 3),
    ('type: "Interp" interp_param { zoom_factor: 3 pad_beg: -1 pad_end: -1 }', [(2, 3, 7, 6)], 1),
    ('type: "Interp" interp_param { shrink_factor: 2 }', [(1, 3, 7, 6)], 1),
    ('type: "Interp" interp_param { height: 5 width: 9 }', [(1, 3, 7, 6)], 1),
    ('type: "Im2col" convolution_param { kernel_size: 3 stride: 2 pad: 2 dilation: 2 }',
     [(2, 3, 9, 8)], 1),
    ('type: "Tile" tile_param { axis: 2 tiles: 3 }', [(2, 3, 4, 5)], 1),
    ('type: "Slice" slice_param { axis: 2 slice_point: 1 slice_point: 3 }', [(2, 3, 5, 2)], 3),
    ('type: "Slice" slice_param { axis: -1 }', [(2, 3, 6)], 2),
    ('type: "Im2dist" convolution_param { kernel_size: 3 stride: 2 pad: 2 dilation: 2 }',
     [(2, 3, 9, 8)], 1),
    ('type: "Im2parity" convolution_param { kernel_h: 3 kernel_w: 1 pad: 1 }', [(2, 1, 6, 5)], 1),
]


@pytest.mark.parametrize("body,shapes,tops", SNIPPETS,
                         ids=[f"{s[0].split(chr(34))[1]}{i}" for i, s in enumerate(SNIPPETS)])
def test_closed_form_shapes_of_layer_settings(body, shapes, tops):
    names = "".join(f' bottom: "b{i}"' for i in range(len(shapes))) + \
        "".join(f' top: "t{i}"' for i in range(tops))
    layer = build(f'name: "l" {body}{names}', shapes)
    assert [tuple(s) for s in layer.output_shapes(shapes)] == \
        [tuple(s) for s in layer.inferred_shapes(shapes)]


def test_every_same_shape_type_is_covered():
    covered = {body.split('"')[1] for body, _, _ in SNIPPETS}
    same_shape = {t for t in registered_types() if layer_class(t).SAME_SHAPE}
    assert same_shape <= covered, f"SAME_SHAPE types without a snippet: {same_shape - covered}"


@pytest.mark.parametrize("net", reference_files(["res", "vgg"]))
def test_released_deploy_nets_build_without_fake_tensors(net, reference, monkeypatch):
    def refuse(self, bottom_shapes):
        raise AssertionError(f"{type(self).__name__} ran fake-tensor shape inference")
    monkeypatch.setattr(CaffeLayer, "inferred_shapes", refuse)
    built = sc.Net(reference / "segaware" / "config" / net / "deploy.prototxt")
    assert built.records


SHARED = """
name: "s"
input: "x" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 }
layer { name: "a" type: "Convolution" bottom: "x" top: "a" param { name: "w" } param { name: "b" }
        convolution_param { num_output: 2 kernel_size: 3 pad: 1
                            weight_filler { type: "gaussian" std: 1 } bias_filler { type: "constant" value: 0.5 } } }
layer { name: "b" type: "Convolution" bottom: "a" top: "b" param { name: "w" } param { name: "b" }
        convolution_param { num_output: 2 kernel_size: 3 pad: 1
                            weight_filler { type: "xavier" } } }
layer { name: "ip" type: "InnerProduct" bottom: "b" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "uniform" min: 2 max: 3 } } }
layer { name: "sc" type: "Scale" bottom: "ip" top: "ip" scale_param { bias_term: true } }
layer { name: "pr" type: "PReLU" bottom: "ip" top: "ip" }
"""


def test_fillers_write_the_values_and_shared_blobs_are_the_owners():
    torch.manual_seed(3)
    net = sc.Net(SHARED)
    a, b = net.params["a"], net.params["b"]
    assert a[0] is b[0] and a[1] is b[1]
    assert a[0].std() > 0.3 and torch.equal(a[1], torch.full((2,), 0.5))
    w = net.params["ip"][0]
    assert (w >= 2).all() and (w <= 3).all() and torch.equal(net.params["ip"][1], torch.zeros(3))
    assert torch.equal(net.params["sc"][0], torch.ones(3))
    assert torch.equal(net.params["sc"][1], torch.zeros(3))
    assert torch.equal(net.params["pr"][0], torch.full((3,), 0.25))
    # the same draws as filling each blob in turn: the shared one is drawn once
    torch.manual_seed(3)
    expected = torch.empty(2, 2, 3, 3).normal_(0, 1)
    assert torch.equal(a[0], expected)


def test_no_random_draws_for_layers_the_weights_file_sets(tmp_path):
    weights = sc.Net(SHARED).to_weights_proto()
    state = torch.random.get_rng_state()
    net = sc.Net(SHARED, weights=weights)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, blobs in net.params.items():
        if not blobs:
            continue
        stored = next(layer for layer in weights.layer if layer.name == name)
        for blob, stored_blob in zip(blobs, stored.blobs):
            assert torch.equal(blob.detach().reshape(-1), torch.tensor(list(stored_blob.data)))
    sc.Net(SHARED)                                       # without weights it draws
    assert not torch.equal(torch.random.get_rng_state(), state)


def test_a_bad_filler_still_fails_when_weights_follow():
    bad = SHARED.replace('type: "xavier"', 'type: "nonsense"')
    weights = sc.Net(SHARED).to_weights_proto()
    with pytest.raises(LayerSetupError, match="unknown filler type 'nonsense'"):
        sc.Net(bad, weights=weights)


def test_partial_weights_keep_filler_values():
    weights = sc.Net(SHARED).to_weights_proto()
    keep = [layer for layer in weights.layer if layer.name != "ip"]
    partial = caffe_pb2.NetParameter()
    partial.layer.extend(keep)
    net = sc.Net(SHARED, weights=partial)
    w = net.params["ip"][0]
    assert (w >= 2).all() and (w <= 3).all()


@register_layer("TestSelfWritten")
class _SelfWritten(CaffeLayer):
    """A layer whose from_proto writes its own blob (no filler)."""
    CAFFE_BLOBS = ("weight",)

    def __init__(self, *, size):
        super().__init__()
        self.weight = constant_parameter((size,), 1.0)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        layer = cls(size=ctx.bottom_shapes[0][1])
        with torch.no_grad():
            layer.weight.copy_(torch.arange(float(layer.weight.numel())))
        return layer

    def forward(self, x):
        return x * self.weight.view(1, -1)


def test_blobs_a_layer_writes_itself_are_kept_and_others_get_their_constant():
    net = sc.Net('name: "w" input: "x" input_shape { dim: 1 dim: 4 }\n'
                 'layer { name: "s" type: "TestSelfWritten" bottom: "x" top: "y" }')
    assert torch.equal(net.params["s"][0], torch.arange(4.0))
    assert torch.equal(constant_parameter((2,), 3.0), torch.full((2,), 3.0))
    p = constant_parameter((3,))
    assert torch.equal(fill_parameter(p, None, default_value=2.0), torch.full((3,), 2.0))
