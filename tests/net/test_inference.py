"""The inference graph (segaware_caffe/inference.py) against the exact graph of the same net:
folded BatchNorm/Scale/Bias at many convolution, deconvolution and inner-product settings,
standalone affine chains, pooling with and without an activation moved behind it, in-place
rewrites where memory is shared, parameter changes after the first call, and when it is used.

Float64 nets compare at 1e-10 (the rewrites compute the same function, only rounding differs);
float32 nets with the golden tolerance."""
import itertools
import random

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe import inference
from segaware_caffe.kernels._native import function as native_function
from segaware_caffe.layers.pooling import Pooling
from segaware_caffe.layers.prelu import PReLU
from segaware_caffe.layers.relu import ReLU
from tests.tolerances import assert_close


def _randomize(net, seed=0):
    """Random parameters of plausible size: BatchNorm statistics with a stored factor other than
    1 (or 0), positive variances; Scale near 1; PReLU slopes of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in net.records:
            blobs = r.module.caffe_blobs()
            if r.type == "BatchNorm":
                factor = float(torch.empty(()).uniform_(0.5, 2.0, generator=g))
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=g) * factor)
                blobs[1].copy_(torch.rand(blobs[1].shape, generator=g).add(0.5) * factor)
                blobs[2].fill_(factor)
            elif r.type == "PReLU":
                blobs[0].copy_(torch.rand(blobs[0].shape, generator=g) - 0.3)
            else:
                for b in blobs:
                    if b.is_floating_point():
                        b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.5 + 0.2)


def _inputs(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype if len(list(net.parameters())) else torch.float32
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in net.input_shapes.items()}


def _both(net, inputs, outputs=None):
    """(inference, exact) results of the same net and inputs."""
    with torch.no_grad():
        assert net.uses_inference_graph()
        fast = net.forward(outputs=outputs, **inputs)
        exact = net.graph_module(outputs)(*net.feed(inputs))
    return fast, exact


def _check(net, inputs, outputs=None, float64=False):
    fast, exact = _both(net, inputs, outputs)
    assert set(fast) == set(exact)
    for name in exact:
        assert fast[name].shape == exact[name].shape, name
        assert fast[name].is_contiguous(), f"{name}: outputs come in the standard layout"
        if float64:
            np.testing.assert_allclose(fast[name].numpy(), exact[name].numpy(), rtol=1e-10,
                                       atol=1e-10 * float(exact[name].abs().max()), err_msg=name)
        else:
            assert_close(fast[name], exact[name], f"inference {name}")


def _layers_called(net, outputs=None):
    """Caffe layer types the inference graph still calls as the net's own modules."""
    gm = net.graph_module(outputs, inference=True)
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes
            if n.op == "call_module" and n.target.startswith("layers.")]


def _net(body, shape, dtype=torch.float64, seed=0, **kwargs):
    dims = " ".join(f"dim: {d}" for d in shape)
    net = sc.Net(f'name: "t" input: "data" input_shape {{ {dims} }}\n{body}', dtype=dtype, **kwargs)
    _randomize(net, seed)
    return net


BN_SCALE = """
layer { name: "bn" type: "BatchNorm" bottom: "y" top: "y" batch_norm_param { eps: 0.001 } }
layer { name: "sc" type: "Scale" bottom: "y" top: "y" scale_param { bias_term: true } }
"""

CONVS = [  # kernel, stride, pad, dilation, group, bias_term, num_output
    (3, 1, 1, 1, 1, True, 6), (1, 1, 0, 1, 1, True, 5), (1, 1, 0, 1, 1, False, 20),
    (3, 2, 0, 1, 1, True, 4), (5, 3, 2, 1, 2, False, 6), (3, 1, 2, 2, 1, True, 3),
    (1, 2, 0, 1, 1, True, 4), (2, 1, 1, 1, 2, True, 4),
]


@pytest.mark.parametrize("kernel,stride,pad,dilation,group,bias,num", CONVS)
@pytest.mark.parametrize("batch", [1, 3])
def test_convolution_with_batchnorm_and_scale_folds(kernel, stride, pad, dilation, group, bias,
                                                    num, batch):
    body = f"""
    layer {{ name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {{
      num_output: {num} kernel_size: {kernel} stride: {stride} pad: {pad} dilation: {dilation}
      group: {group} bias_term: {str(bias).lower()} }} }}
    """ + BN_SCALE + 'layer { name: "relu" type: "ReLU" bottom: "y" top: "y" }'
    net = _net(body, (batch, 4, 11, 9))
    _check(net, _inputs(net), float64=True)
    assert _layers_called(net) == []             # conv + BatchNorm + Scale + ReLU: one module
    net32 = _net(body, (batch, 4, 11, 9), dtype=torch.float32)
    _check(net32, _inputs(net32))


def test_deconvolution_and_inner_product_fold():
    body = """
    layer { name: "up" type: "Deconvolution" bottom: "data" top: "y" convolution_param {
      num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 2 } }
    layer { name: "bn" type: "BatchNorm" bottom: "y" top: "y" }
    layer { name: "b" type: "Bias" bottom: "y" top: "y" }
    layer { name: "ip" type: "InnerProduct" bottom: "y" top: "z" inner_product_param {
      num_output: 5 transpose: true } }
    layer { name: "bn2" type: "BatchNorm" bottom: "z" top: "z" }
    layer { name: "sc2" type: "Scale" bottom: "z" top: "z" }
    """
    net = _net(body, (2, 4, 5, 3))
    _check(net, _inputs(net), float64=True)
    assert _layers_called(net) == []


@pytest.mark.parametrize("settings", ["kernel_size: 3", "kernel_size: 3 pad: 2 dilation: 2 group: 2",
                                      "kernel_size: 3 pad: 1 stride: 2"])
def test_im2col_convolution_folds(settings):
    """A convolution on Im2col columns is a (grouped) 1x1 product over the columns, whatever
    padding, stride and dilation its convolution_param repeats from the Im2col layer."""
    geometry = settings.replace(" group: 2", "").replace("kernel_size: 3", "kernel_size: 3 pad: 1") \
        if "pad" not in settings else settings.replace(" group: 2", "")
    body = f"""
    layer {{ name: "cols" type: "Im2col" bottom: "data" top: "cols" convolution_param {{
      {geometry} }} }}
    layer {{ name: "conv" type: "Convolution" bottom: "cols" top: "y" convolution_param {{
      num_output: 4 {settings} bottom_is_im2col: true }} }}
    """ + BN_SCALE
    net = _net(body, (2, 4, 6, 7))
    _check(net, _inputs(net), float64=True)
    assert _layers_called(net) == ["Im2col"]


def test_standalone_affine_chains_are_one_pass():
    body = """
    layer { name: "bn0" type: "BatchNorm" bottom: "data" top: "a" }
    layer { name: "sc0" type: "Scale" bottom: "a" top: "a" scale_param { bias_term: true } }
    layer { name: "conv" type: "Convolution" bottom: "a" top: "c" convolution_param {
      num_output: 3 kernel_size: 1 } }
    layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "c" top: "s" }
    layer { name: "bn1" type: "BatchNorm" bottom: "s" top: "s" }
    layer { name: "scalar" type: "Scale" bottom: "s" top: "s" scale_param { num_axes: 0 } }
    layer { name: "bias" type: "Bias" bottom: "s" top: "s" }
    """
    net = _net(body, (2, 3, 5, 4))
    _check(net, _inputs(net), float64=True)
    gm = net.graph_module(inference=True)
    affines = [m for m in gm.modules() if isinstance(m, inference.ChannelAffine)]
    assert [len(m.chain) for m in affines] == [2, 3]


def test_layers_that_do_not_fold_stay():
    body = """
    layer { name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {
      num_output: 4 kernel_size: 3 } }
    layer { name: "bn" type: "BatchNorm" bottom: "y" top: "y"
            batch_norm_param { use_global_stats: false } }
    layer { name: "sc" type: "Scale" bottom: "y" top: "y" scale_param { axis: 2 num_axes: 2 } }
    layer { name: "sc2" type: "Scale" bottom: "y" bottom: "y" top: "z" scale_param { axis: 0 } }
    """
    net, twin = _net(body, (2, 3, 7, 6)), _net(body, (2, 3, 7, 6))
    inputs = _inputs(net)
    # BatchNorm without stored statistics keeps state (its divisor): each net runs once
    with torch.no_grad():
        fast = net.forward(**inputs)["z"]
        exact = twin.graph_module()(*twin.feed(inputs))["z"]
    np.testing.assert_allclose(fast.numpy(), exact.numpy(), rtol=1e-10)
    assert _layers_called(net) == ["BatchNorm", "Scale", "Scale"]


def test_asked_intermediates_keep_their_values():
    body = """
    layer { name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {
      num_output: 4 kernel_size: 3 } }
    """ + BN_SCALE + """
    layer { name: "relu" type: "ReLU" bottom: "y" top: "y" }
    layer { name: "pool" type: "Pooling" bottom: "y" top: "p" pooling_param {
      pool: MAX kernel_size: 2 stride: 2 } }
    """
    net = _net(body, (2, 3, 9, 8))
    inputs = _inputs(net)
    outputs = ["y@conv", "y@bn", "y@sc", "y", "p"]
    _check(net, inputs, outputs, float64=True)
    fast, _ = _both(net, inputs, outputs)
    assert not torch.equal(fast["y@conv"], fast["y@bn"])
    assert (fast["y"] >= 0).all() and (fast["y@sc"] < 0).any()


def test_in_place_rewrites_respect_shared_memory():
    # conv's top goes to a ReLU (in place in Caffe) and, through a Split, to an Eltwise: the
    # ReLU must not write into memory the sum still reads; the sum's first bottom is fresh
    body = """
    layer { name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {
      num_output: 3 kernel_size: 1 } }
    layer { name: "relu" type: "ReLU" bottom: "y" top: "r" }
    layer { name: "sum" type: "Eltwise" bottom: "y" bottom: "r" top: "s" }
    layer { name: "relu2" type: "ReLU" bottom: "s" top: "s" relu_param { negative_slope: 0.1 } }
    layer { name: "sum2" type: "Eltwise" bottom: "s" bottom: "data" top: "t" }
    """
    net = _net(body, (2, 3, 4, 5))
    inputs = _inputs(net)
    kept = {k: v.clone() for k, v in inputs.items()}
    _check(net, inputs, float64=True)
    _check(net, inputs, ["r", "s", "t"], float64=True)
    assert all(torch.equal(inputs[k], kept[k]) for k in inputs)      # inputs never written


def _pool_cases(count, seed=0):
    rnd = random.Random(seed)
    cases = []
    while len(cases) < count:
        kernel = (rnd.randint(1, 5), rnd.randint(1, 5))
        pad = (rnd.randint(0, kernel[0] - 1), rnd.randint(0, kernel[1] - 1))
        stride = (rnd.randint(1, 4), rnd.randint(1, 4))
        size = (rnd.randint(kernel[0], 12), rnd.randint(kernel[1], 12))
        layer = Pooling(method=rnd.choice(["MAX", "AVE"]), kernel=kernel, pad=pad, stride=stride,
                        round_mode=rnd.choice([0, 1]))
        if min(layer.output_spatial_size(*size)) > 0:
            cases.append((layer, size, rnd.random() < 0.5, rnd.randrange(5)))
    return cases


@pytest.mark.parametrize("compiled", [True, False])
def test_pooling_matches_the_layer_everywhere(compiled, monkeypatch):
    """Caffe's windows at random kernel/pad/stride/rounding, empty windows (kernel < stride)
    included, in both memory layouts, with a ReLU / leaky ReLU / PReLU moved behind the pooling
    (slopes of both signs: a negative one must not commute); through the compiled loops (small
    images too) and through torch's pooling."""
    monkeypatch.setattr(inference.InferencePooling, "COMPILED_MIN_ELEMENTS",
                        0 if compiled else 1 << 62)
    for layer, size, channels_last, act in _pool_cases(400):
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        activation = [None, ReLU(), ReLU(negative_slope=0.2), ReLU(negative_slope=-0.5),
                      PReLU(channels=3)][act]
        if isinstance(activation, PReLU):
            activation = activation.double()
            with torch.no_grad():
                activation.slope.copy_(torch.tensor([0.25, -0.5, 0.0]))
        if layer.method == "AVE":
            activation = None
        with torch.no_grad():
            ref = layer(activation(x) if activation is not None else x)
            got = inference.InferencePooling(layer, activation)(x)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, equal_nan=True,
                                   msg=lambda m: f"{layer.extra_repr()} {size} {activation}: {m}")


def test_global_pooling_and_activation_behind_pooling_in_a_net():
    body = """
    layer { name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {
      num_output: 4 kernel_size: 3 } }
    layer { name: "prelu" type: "PReLU" bottom: "y" top: "y" }
    layer { name: "pool" type: "Pooling" bottom: "y" top: "p" pooling_param {
      pool: MAX kernel_size: 3 stride: 2 } }
    layer { name: "relu" type: "ReLU" bottom: "p" top: "p" }
    layer { name: "gmax" type: "Pooling" bottom: "p" top: "g" pooling_param {
      pool: MAX global_pooling: true } }
    layer { name: "gave" type: "Pooling" bottom: "y" top: "a" pooling_param {
      pool: AVE global_pooling: true } }
    """
    net = _net(body, (3, 2, 12, 11))
    _check(net, _inputs(net), float64=True)
    gm = net.graph_module(inference=True)
    moved = [m for m in gm.modules() if isinstance(m, inference.InferencePooling)
             and m.activation is not None]
    assert [type(m.activation).__name__ for m in moved] == ["ReLU"]   # PReLU's top is read twice


@pytest.mark.parametrize("layout", [True, False])
def test_pointwise_convolution_heads(layout, monkeypatch):
    monkeypatch.setattr(inference, "CHANNELS_LAST", layout)
    body = """
    layer { name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {
      num_output: 20 kernel_size: 3 } }
    layer { name: "prelu" type: "PReLU" bottom: "y" top: "y" }
    layer { name: "head1" type: "Convolution" bottom: "y" top: "h1" convolution_param {
      num_output: 2 kernel_size: 1 } }
    layer { name: "head2" type: "Convolution" bottom: "y" top: "h2" convolution_param {
      num_output: 17 kernel_size: 1 } }
    layer { name: "prob" type: "Softmax" bottom: "h1" top: "prob" }
    """
    for batch in (1, 2):
        net = _net(body, (batch, 3, 9, 7))
        _check(net, _inputs(net), float64=True)
        net32 = _net(body, (batch, 3, 9, 7), dtype=torch.float32)
        _check(net32, _inputs(net32))


def test_folded_blobs_follow_parameter_changes():
    body = """
    layer { name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {
      num_output: 4 kernel_size: 3 } }
    """ + BN_SCALE
    net = _net(body, (1, 2, 6, 6))
    inputs = _inputs(net)
    _check(net, inputs, float64=True)
    conv, bn = net.params["conv"][0], net.params["bn"]
    with torch.no_grad():
        conv.mul_(2)                          # an in-place update torch sees
    _check(net, inputs, float64=True)
    bn[1].data.mul_(3)                        # a write torch does not see ...
    inference.parameters_changed()            # ... announced
    _check(net, inputs, float64=True)
    before, _ = _both(net, inputs)
    net.load_weights(_net(body, (1, 2, 6, 6), seed=5).to_weights_proto())
    _check(net, inputs, float64=True)
    after, _ = _both(net, inputs)
    assert not torch.allclose(before["y"], after["y"])
    net.to(torch.float32)
    _check(net, {k: v.float() for k, v in inputs.items()})


def test_when_the_inference_graph_is_used():
    body = """
    layer { name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {
      num_output: 2 kernel_size: 1 } }
    layer { name: "bn" type: "BatchNorm" bottom: "y" top: "y" }
    """
    net = _net(body, (1, 2, 3, 3))
    calls = []
    net.layers["bn"].register_forward_hook(lambda *args: calls.append(1))
    inputs = _inputs(net)
    with torch.no_grad():
        net.forward(**inputs)
    with torch.inference_mode():
        assert net.uses_inference_graph()
        net.forward(**inputs)
    assert calls == []                                   # folded into the convolution
    out = net.forward(**inputs)                          # autograd on: the exact graph
    assert calls == [1] and out["y"].requires_grad
    out["y"].sum().backward()
    assert net.params["conv"][0].grad is not None
    exact = _net(body, (1, 2, 3, 3), inference=False)
    exact.layers["bn"].register_forward_hook(lambda *args: calls.append(2))
    with torch.no_grad():
        assert not exact.uses_inference_graph()
        exact.forward(**inputs)
    assert calls == [1, 2]
    train = _net(body.replace('"BatchNorm"', '"BatchNorm" batch_norm_param { use_global_stats: true }'),
                 (1, 2, 3, 3), phase="train")
    with torch.no_grad():
        assert not train.uses_inference_graph()          # TRAIN keeps Caffe's exact semantics


def test_side_effect_layers_still_run(tmp_path):
    pytest.importorskip("h5py", reason="HDF5Output writes HDF5 files (needs h5py)")
    import h5py
    body = f"""
    layer {{ name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {{
      num_output: 2 kernel_size: 1 }} }}
    layer {{ name: "out" type: "HDF5Output" bottom: "y" bottom: "data"
            hdf5_output_param {{ file_name: "{tmp_path / 'out.h5'}" }} }}
    """
    net = _net(body, (1, 2, 3, 3), dtype=torch.float32)
    inputs = _inputs(net)
    with torch.no_grad():
        net.forward(**inputs)
        expected = net.graph_module(["y"])(*net.feed(inputs))["y"]
    with h5py.File(tmp_path / "out.h5", "r") as f:
        np.testing.assert_allclose(f["data"][()], expected.numpy(), rtol=1e-6)


def test_solver_test_nets_see_the_trained_parameters(tmp_path):
    from segaware_caffe.solver import Solver
    net = """
    name: "t"
    input: "x" input_shape { dim: 4 dim: 3 }
    input: "y" input_shape { dim: 4 dim: 2 }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "z" inner_product_param {
      num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "z" top: "z" batch_norm_param {
      use_global_stats: true } }
    layer { name: "sc" type: "Scale" bottom: "z" top: "z" scale_param { bias_term: true } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "z" bottom: "y" top: "loss" }
    """
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(
        'train_net: "net.prototxt" test_net: "net.prototxt" test_iter: 1 base_lr: 0.5 '
        'lr_policy: "fixed"')
    g = torch.Generator().manual_seed(0)
    feed = {"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, 2, generator=g)}
    solver = Solver(tmp_path / "solver.prototxt", test_inputs=lambda index, i: feed)
    with torch.no_grad():
        for blob in solver.net.params["bn"]:
            blob.fill_(1.0)
    before = solver.test(0)["loss"]
    solver.step(3, inputs=lambda it: feed)
    after = solver.test(0)["loss"]
    test_net = solver.test_nets[0]
    expected = test_net.graph_module()(*test_net.feed(feed))["loss"]     # the exact graph
    assert after == pytest.approx(float(expected.detach()), rel=1e-6)
    assert after != pytest.approx(before, rel=1e-3)


def test_float32_bench_shapes_within_golden_tolerance():
    """The shapes of the benchmark nets: MTCNN-like PReLU blocks and a bottleneck with
    BatchNorm/Scale, float32, batch > 1."""
    body = """
    layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param {
      num_output: 10 kernel_size: 3 } }
    layer { name: "p1" type: "PReLU" bottom: "c1" top: "c1" }
    layer { name: "pool1" type: "Pooling" bottom: "c1" top: "pool1" pooling_param {
      pool: MAX kernel_size: 3 stride: 2 } }
    layer { name: "c2" type: "Convolution" bottom: "pool1" top: "c2" convolution_param {
      num_output: 16 kernel_size: 1 } }
    layer { name: "bn2" type: "BatchNorm" bottom: "c2" top: "c2" }
    layer { name: "s2" type: "Scale" bottom: "c2" top: "c2" scale_param { bias_term: true } }
    layer { name: "r2" type: "ReLU" bottom: "c2" top: "c2" }
    layer { name: "c3" type: "Convolution" bottom: "c2" top: "c3" convolution_param {
      num_output: 16 kernel_size: 3 pad: 1 stride: 2 } }
    layer { name: "ip" type: "InnerProduct" bottom: "c3" top: "ip" inner_product_param {
      num_output: 7 } }
    layer { name: "p4" type: "PReLU" bottom: "ip" top: "ip" prelu_param { channel_shared: true } }
    layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
    """
    for batch, size in itertools.product((1, 5), ((24, 24), (17, 30))):
        net = _net(body, (batch, 3, *size), dtype=torch.float32, seed=batch)
        _check(net, _inputs(net, seed=size[1]))


def test_a_batch_of_zero_images():
    """N = 0 through the 1x1 products, the Im2col product and folded convolutions: empty tops of
    the right shapes, as the exact graph gives."""
    body = """
    layer { name: "c1" type: "Convolution" bottom: "data" top: "y" convolution_param {
      num_output: 3 kernel_size: 1 } }
    """ + BN_SCALE + """
    layer { name: "cols" type: "Im2col" bottom: "y" top: "cols" convolution_param {
      kernel_size: 3 pad: 1 } }
    layer { name: "c2" type: "Convolution" bottom: "cols" top: "z" convolution_param {
      num_output: 2 kernel_size: 3 pad: 1 bottom_is_im2col: true } }
    """
    net = _net(body, (0, 4, 5, 6))
    fast, exact = _both(net, _inputs(net))
    for name in exact:
        assert fast[name].shape == exact[name].shape == (0, *net.blob_shapes[name][1:]), name
    for channels_last in (False, True):          # both layouts of the 1x1 product
        for outputs in (3, 20):
            y = inference._pointwise(torch.zeros(0, 4, 5, 6), torch.ones(4, outputs), None,
                                     channels_last)
            assert y.shape == (0, outputs, 5, 6)


CONCAT_OF_RESIZES = """
layer { name: "c1" type: "Convolution" bottom: "data" top: "a" convolution_param {
  num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "p" type: "Pooling" bottom: "a" top: "b" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "c2" type: "Convolution" bottom: "b" top: "c" convolution_param {
  num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "up" type: "Interp" bottom: "c" top: "c_up" interp_param { height: 9 width: 11 } }
layer { name: "p2" type: "Pooling" bottom: "c" top: "d" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "up2" type: "Interp" bottom: "d" top: "d_up" interp_param { height: 9 width: 11 } }
layer { name: "cat" type: "Concat" bottom: "data" bottom: "a" bottom: "c_up" bottom: "d_up" top: "cat" }
layer { name: "emb" type: "Convolution" bottom: "cat" top: "y" convolution_param {
  num_output: 4 kernel_size: 1 } }
"""


def test_a_product_of_resized_parts_runs_before_the_resize():
    """A 1x1 convolution of a Concat of Interp resizes (the vgg embedding head) computes each
    part's product before its resize and never builds the concatenation."""
    net = _net(CONCAT_OF_RESIZES + BN_SCALE, (2, 3, 9, 11))
    gm = net.graph_module(None, inference=True)
    assert any(type(m).__name__ == "PointwiseOverConcat" for m in gm.modules())
    assert "Concat" not in _layers_called(net)
    _check(net, _inputs(net), float64=True)


@pytest.mark.parametrize("outputs", [["y", "c_up"], ["y", "cat"]])
def test_a_resized_part_or_the_concat_asked_for_is_kept(outputs):
    net = _net(CONCAT_OF_RESIZES, (1, 3, 9, 11))
    _check(net, _inputs(net), outputs=outputs, float64=True)
    if "cat" in outputs:
        assert "Concat" in _layers_called(net, outputs)


RELU_AFTER = {
    "relu": 'layer { name: "r" type: "ReLU" bottom: "y" top: "y" }',
    "leaky": 'layer { name: "r" type: "ReLU" bottom: "y" top: "y" relu_param { negative_slope: 0.2 } }',
    "none": "",
}


@pytest.mark.parametrize("kernel,stride,pad,dilation,group,bias,num", CONVS)
@pytest.mark.parametrize("after", sorted(RELU_AFTER))
def test_float32_convolutions_with_reordered_weights_and_fused_relu(
        kernel, stride, pad, dilation, group, bias, num, after, monkeypatch):
    """float32 channels_last convolutions run with oneDNN's reordered weights and the ReLU that
    follows as its post-op (or in place on the top): the exact graph's values, the ReLU node
    gone; with the reordered path switched off, torch's convolution gives the same."""
    body = f"""
    layer {{ name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {{
      num_output: {num} kernel_size: {kernel} stride: {stride} pad: {pad} dilation: {dilation}
      group: {group} bias_term: {str(bias).lower()} }} }}
    """ + RELU_AFTER[after]
    net = _net(body, (2, 4, 9, 8), dtype=torch.float32)
    inputs = _inputs(net)
    _check(net, inputs)
    gm = net.graph_module(inference=True)
    names = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.relu_ not in names and torch.relu not in names
    op = gm.get_submodule("inference.conv")
    slope = {"relu": 0.0, "leaky": 0.2, "none": None}[after]
    assert op.activation == (None if slope is None else pytest.approx(slope, rel=1e-6))
    if op.channels_last and not op.pointwise and inference._packed_convolution_available():
        assert op._packed is not None and not op._packed_failed
    fast, _ = _both(net, inputs)
    monkeypatch.setattr(inference, "PACKED_CONVOLUTION", False)
    calls = []
    monkeypatch.setattr(inference.InferenceConvolution, "_packed_call",
                        lambda *args: calls.append(args))
    with torch.no_grad():
        plain = net.forward(**inputs)
    assert not calls and net.graph_module(inference=True) is gm
    assert_close(fast["y"], plain["y"], "packed vs torch's convolution")


def test_reordered_weights_follow_parameters_and_input_shapes():
    """The reordered weights are made again after a parameter change and for a new input shape;
    the pooling plan is made per input shape."""
    body = """
    layer { name: "conv" type: "Convolution" bottom: "data" top: "y" convolution_param {
      num_output: 6 kernel_size: 3 pad: 1 } }
    layer { name: "r" type: "ReLU" bottom: "y" top: "y" }
    layer { name: "pool" type: "Pooling" bottom: "y" top: "p" pooling_param {
      pool: MAX kernel_size: 3 stride: 2 } }
    """
    net = _net(body, (1, 3, 10, 10), dtype=torch.float32)
    inputs = _inputs(net)
    _check(net, inputs)
    with torch.no_grad():
        net.params["conv"][0].mul_(-1)
    _check(net, inputs)
    net.params["conv"][1].data.add_(1)
    inference.parameters_changed()
    _check(net, inputs)
    for shape in ((2, 3, 13, 7), (1, 3, 10, 10)):
        x = torch.randn(shape)
        with torch.no_grad():
            fast = net.forward(data=x)["p"]
            exact = net.graph_module()(x)["p"]
        assert fast.shape == exact.shape
        assert_close(fast, exact, f"input {shape}")


@pytest.mark.parametrize("kernel,pad,dilation,bias,num", [
    ((3, 3), (1, 1), (1, 1), True, 5), ((3, 3), (6, 6), (6, 6), False, 21),
    ((3, 1), (2, 0), (2, 1), True, 3), ((5, 5), (0, 1), (1, 1), True, 8),
    ((3, 3), (9, 9), (9, 9), True, 4),       # taps wholly outside a 7x8 image
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_few_output_convolutions_as_one_product_of_all_taps(kernel, pad, dilation, bias, num,
                                                            dtype):
    """Many channels to few outputs at stride 1 (ASPP classifiers, SSD heads): one product of
    every tap's weights with the pixels and shifted sums, from either input layout (after a
    channels_last convolution or not), with a ReLU after it or not."""
    assert num <= inference.InferenceConvolution.TAP_PRODUCT_OUTPUTS
    channels = inference.InferenceConvolution.TAP_PRODUCT_CHANNELS
    kernel_text = f"kernel_h: {kernel[0]} kernel_w: {kernel[1]} pad_h: {pad[0]} pad_w: {pad[1]}"
    tail = f"""
    layer {{ name: "head" type: "Convolution" bottom: "x" top: "y" convolution_param {{
      num_output: {num} {kernel_text} dilation: {dilation[0]} dilation: {dilation[1]}
      bias_term: {str(bias).lower()} }} }}
    """
    first = f"""
    layer {{ name: "c1" type: "Convolution" bottom: "data" top: "x" convolution_param {{
      num_output: {channels} kernel_size: 1 }} }}
    """
    for body in (first + tail, first + 'layer { name: "r" type: "ReLU" bottom: "x" top: "x" }'
                 + tail + 'layer { name: "r2" type: "ReLU" bottom: "y" top: "y" }'):
        net = _net(body, (2, 3, 7, 8), dtype=dtype)
        gm = net.graph_module(inference=True)
        head = gm.get_submodule("inference.head")
        assert head.tap_product and not head.channels_last
        _check(net, _inputs(net), float64=dtype == torch.float64)


@pytest.mark.parametrize("fresh_first", [True, False])
def test_residual_sum_and_relu_are_one_in_place_pass(fresh_first):
    """A residual block's end, Eltwise SUM of a shortcut read elsewhere too and a fresh branch,
    then ReLU: the sum writes into the fresh bottom (whichever side it is on) and the ReLU joins
    it in one fused pass; the shortcut keeps its values for its other reader."""
    branch = 'bottom: "b"'
    shortcut = 'bottom: "a"'
    bottoms = f"{branch} {shortcut}" if fresh_first else f"{shortcut} {branch}"
    body = f"""
    layer {{ name: "c1" type: "Convolution" bottom: "data" top: "a" convolution_param {{
      num_output: 4 kernel_size: 1 }} }}
    layer {{ name: "r1" type: "ReLU" bottom: "a" top: "a" }}
    layer {{ name: "c2" type: "Convolution" bottom: "a" top: "b" convolution_param {{
      num_output: 4 kernel_size: 3 pad: 1 }} }}
    layer {{ name: "sum" type: "Eltwise" {bottoms} top: "s" }}
    layer {{ name: "r2" type: "ReLU" bottom: "s" top: "s" }}
    layer {{ name: "c3" type: "Convolution" bottom: "a" top: "t" convolution_param {{
      num_output: 2 kernel_size: 1 }} }}
    """
    for dtype in (torch.float64, torch.float32):
        net = _net(body, (2, 3, 5, 6), dtype=dtype)
        _check(net, _inputs(net), float64=dtype == torch.float64)
        gm = net.graph_module(inference=True)
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        if inference._fused_add_relu_available():
            assert inference._add_relu_ in targets
            assert inference._add_ not in targets and torch.relu_ not in targets


RESIDUAL_BLOCKS = """
layer { name: "c1" type: "Convolution" bottom: "data" top: "a" convolution_param {
  num_output: 16 kernel_size: 1 } }
layer { name: "r1" type: "ReLU" bottom: "a" top: "a" }
layer { name: "c2a" type: "Convolution" bottom: "a" top: "b0" convolution_param {
  num_output: 8 kernel_size: 1 } }
layer { name: "c2" type: "Convolution" bottom: "b0" top: "b" convolution_param {
  num_output: 16 kernel_size: 3 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "b" bottom: "a" top: "s" }
layer { name: "r2" type: "ReLU" bottom: "s" top: "s" }
layer { name: "c3a" type: "Convolution" bottom: "s" top: "t0" convolution_param {
  num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "c3" type: "Convolution" bottom: "t0" top: "t" convolution_param {
  num_output: 16 kernel_size: 1 } }
layer { name: "sum2" type: "Eltwise" bottom: "s" bottom: "t" top: "u" }
layer { name: "c4" type: "Convolution" bottom: "u" top: "y" convolution_param {
  num_output: 3 kernel_size: 1 } }
"""


def _residual_modes(net):
    gm = net.graph_module(inference=True)
    return sorted(m.residual for m in gm.modules()
                  if isinstance(m, inference.InferenceConvolution) and m.residual)


def test_residual_sums_become_the_convolutions_post_ops():
    """Two blocks' ends (a branch ending in a 3x3 convolution + shortcut, then ReLU; one ending
    in a 1x1 convolution + shortcut, without ReLU):
    in float32 the branch convolution adds its top into the shortcut, which the graph owns and
    reads no more, with the ReLU as oneDNN post-ops; the values stay the exact graph's, twice
    in a row, and the input is left as it was."""
    if not inference._packed_convolution_available():
        pytest.skip("this torch build has no oneDNN convolution with post-ops")
    net = _net(RESIDUAL_BLOCKS, (2, 5, 9, 8), dtype=torch.float32)
    assert _residual_modes(net) == ["add", "add_relu"]
    inputs = _inputs(net)
    kept = inputs["data"].clone()
    _check(net, inputs)
    _check(net, inputs)
    assert torch.equal(inputs["data"], kept)
    gm = net.graph_module(inference=True)
    convolutions = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
                    and isinstance(gm.get_submodule(n.target), inference.InferenceConvolution)]
    assert not any(op._packed_failed for op in convolutions), "oneDNN refused a post-op"
    net64 = _net(RESIDUAL_BLOCKS, (2, 5, 9, 8))         # float64: the top, then the sum
    _check(net64, _inputs(net64), float64=True)


@pytest.mark.parametrize("case", ["input", "read_after", "own_input"])
def test_residual_sums_stay_where_the_shortcut_is_not_the_graphs_to_overwrite(case):
    """Not fused: a shortcut that is the net's input (the caller's tensor), one read again
    after the sum, or the branch convolution's own input."""
    if case == "input":
        body = """
        layer { name: "c" type: "Convolution" bottom: "data" top: "b" convolution_param {
          num_output: 5 kernel_size: 3 pad: 1 } }
        layer { name: "sum" type: "Eltwise" bottom: "b" bottom: "data" top: "y" }
        layer { name: "r" type: "ReLU" bottom: "y" top: "y" }"""
    else:
        reader = "a" if case == "read_after" else "s"
        body = f"""
        layer {{ name: "c1" type: "Convolution" bottom: "data" top: "a" convolution_param {{
          num_output: 5 kernel_size: 1 }} }}
        layer {{ name: "c2" type: "Convolution" bottom: "a" top: "b" convolution_param {{
          num_output: 5 kernel_size: 3 pad: 1 }} }}
        layer {{ name: "sum" type: "Eltwise" bottom: "b" bottom: "a" top: "s" }}
        layer {{ name: "c3" type: "Convolution" bottom: "{reader}" top: "y" convolution_param {{
          num_output: 2 kernel_size: 1 }} }}"""
        # own_input: the shortcut "a" is read by nothing after the sum, but the branch
        # convolution c2 reads it while it would write into it
    net = _net(body, (1, 5, 7, 6), dtype=torch.float32)
    inputs = _inputs(net)
    kept = inputs["data"].clone()
    _check(net, inputs)
    assert torch.equal(inputs["data"], kept)
    assert _residual_modes(net) == []


def test_the_embedding_head_runs_in_several_threads_at_once_and_deep_copies():
    """The product over a concatenation of resizes keeps temporaries between calls, one set per
    thread: the same net run from four threads at once gives each thread the single-threaded
    values; a net that ran deep-copies."""
    import copy
    from concurrent.futures import ThreadPoolExecutor
    net = _net(CONCAT_OF_RESIZES, (1, 2, 9, 11), dtype=torch.float32)
    inputs = [_inputs(net, seed=s) for s in range(8)]
    with torch.no_grad():
        expected = [net.forward(**x)["y"] for x in inputs]

    def run(x):
        with torch.no_grad():
            return [net.forward(**x)["y"] for _ in range(20)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, inputs))
    for got, want in zip(results, expected):
        for y in got:
            assert torch.equal(y, want)
    clone = copy.deepcopy(net)
    with torch.no_grad():
        assert torch.equal(clone.forward(**inputs[0])["y"], expected[0])


def _random_net_text(rng):
    """A random chain of the layers the rewrites touch: convolutions of random geometry (some
    with many channels and few outputs), in-place and out-of-place ReLUs, residual sums, MAX /
    AVE pooling, BatchNorm + Scale, a concatenation, inner products."""
    lines, top, channels, index = [], "data", 3, 0

    def name(kind):
        nonlocal index
        index += 1
        return f"{kind}{index}"

    for _ in range(rng.randint(2, 6)):
        choice = rng.choice(["conv", "conv", "wide", "relu", "sum", "pool", "bn", "cat"])
        if choice in ("conv", "wide"):
            out = rng.choice([2, 5]) if choice == "wide" else rng.choice([3, 8, 16])
            if choice == "wide" and channels < 256:      # many channels first
                widen = name("c")
                lines.append(f'layer {{ name: "{widen}" type: "Convolution" bottom: "{top}" '
                             f'top: "{widen}" convolution_param {{ num_output: 256 '
                             f'kernel_size: 1 }} }}')
                top, channels = widen, 256
            k, d = rng.choice([1, 3]), rng.choice([1, 2])
            pad = rng.choice([0, (k // 2) * d])
            layer = name("c")
            lines.append(f'layer {{ name: "{layer}" type: "Convolution" bottom: "{top}" '
                         f'top: "{layer}" convolution_param {{ num_output: {out} kernel_size: {k} '
                         f'pad: {pad} dilation: {d} }} }}')
            top, channels = layer, out
        elif choice == "relu":
            in_place = rng.random() < 0.7
            layer = name("r")
            lines.append(f'layer {{ name: "{layer}" type: "ReLU" bottom: "{top}" '
                         f'top: "{top if in_place else layer}" }}')
            top = top if in_place else layer
        elif choice == "sum":
            branch = name("b")
            lines.append(f'layer {{ name: "{branch}" type: "Convolution" bottom: "{top}" '
                         f'top: "{branch}" convolution_param {{ num_output: {channels} '
                         f'kernel_size: 3 pad: 1 }} }}')
            layer = name("s")
            first, second = (top, branch) if rng.random() < 0.5 else (branch, top)
            lines.append(f'layer {{ name: "{layer}" type: "Eltwise" bottom: "{first}" '
                         f'bottom: "{second}" top: "{layer}" }}')
            lines.append(f'layer {{ name: "{name("r")}" type: "ReLU" bottom: "{layer}" '
                         f'top: "{layer}" }}')
            top = layer
        elif choice == "pool":
            layer = name("p")
            method = rng.choice(["MAX", "AVE"])
            lines.append(f'layer {{ name: "{layer}" type: "Pooling" bottom: "{top}" top: "{layer}" '
                         f'pooling_param {{ pool: {method} kernel_size: {rng.choice([2, 3])} '
                         f'stride: {rng.choice([1, 2])} pad: {rng.choice([0, 1])} }} }}')
            top = layer
        elif choice == "bn":
            bn, sc_ = name("bn"), name("sc")
            lines.append(f'layer {{ name: "{bn}" type: "BatchNorm" bottom: "{top}" top: "{top}" }}')
            lines.append(f'layer {{ name: "{sc_}" type: "Scale" bottom: "{top}" top: "{top}" '
                         f'scale_param {{ bias_term: true }} }}')
        else:
            side = name("c")
            lines.append(f'layer {{ name: "{side}" type: "Convolution" bottom: "{top}" '
                         f'top: "{side}" convolution_param {{ num_output: 4 kernel_size: 1 }} }}')
            layer = name("cat")
            lines.append(f'layer {{ name: "{layer}" type: "Concat" bottom: "{top}" '
                         f'bottom: "{side}" top: "{layer}" }}')
            top, channels = layer, channels + 4
    # (no ReLU on the output: a top that it zeroes almost everywhere would compare float32
    # rounding of the large values before it against the few small ones left)
    lines.append(f'layer {{ name: "ip" type: "InnerProduct" bottom: "{top}" top: "ip" '
                 f'inner_product_param {{ num_output: 3 }} }}')
    return "\n".join(lines)


@pytest.mark.parametrize("seed", range(24))
def test_random_nets_keep_the_exact_graphs_values(seed):
    """Random chains of convolutions, activations, residual sums, pooling, affine layers and
    concatenations: every rewrite together (folding, fused activations, in-place and fused
    sums, tap products, layouts) gives the exact graph's outputs, float64 and float32."""
    rng = random.Random(seed)
    for _ in range(50):         # a chain whose pooling shrinks the image to nothing: draw again
        body = _random_net_text(rng)
        shape = (rng.choice([1, 2]), 3, rng.randint(6, 11), rng.randint(6, 11))
        try:
            _net(body, shape, seed=seed)
            break
        except sc.NetBuildError:
            continue
    else:
        raise AssertionError("no buildable random net in 50 draws")
    for dtype in (torch.float64, torch.float32):
        net = _net(body, shape, dtype=dtype, seed=seed)
        _check(net, _inputs(net, seed=seed), float64=dtype == torch.float64)


@pytest.mark.parametrize("param", ["height: 9 width: 13", "zoom_factor: 2 pad_beg: -1 pad_end: -1",
                                   "shrink_factor: 1"])
def test_interp_writes_its_top_into_a_given_buffer(param):
    """Interp.resize(x, out=...) (the embedding head's kept buffers): the layer's top, whatever
    the buffer's layout, for a plain resize, a cropped one and the identity."""
    net = sc.Net('name: "t" input: "data" input_shape { dim: 2 dim: 3 dim: 6 dim: 7 }\n'
                 f'layer {{ name: "up" type: "Interp" bottom: "data" top: "up" '
                 f'interp_param {{ {param} }} }}')
    layer = net.layers["up"]
    x = torch.randn(2, 3, 6, 7).contiguous(memory_format=torch.channels_last)
    expected = layer(x)
    num, channels, height, width = net.blob_shapes["up"]
    buffer = torch.full((num, height, width, channels), float("nan")).permute(0, 3, 1, 2)
    got = layer.resize(x, out=buffer)
    assert got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("param", ["height: 9 width: 13", "height: 1 width: 4",
                                   "zoom_factor: 3 pad_beg: -1 pad_end: -2", "shrink_factor: 3",
                                   "shrink_factor: 2 zoom_factor: 3", "shrink_factor: 1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["standard", "channels_last"])
def test_compiled_interp_is_the_layers_resize(param, dtype, layout):
    """The inference graph's Interp (a compiled loop reading the rows and columns it samples,
    through a crop's strides): the layer's top within rounding, in the input's layout, and into
    a given buffer; NaN and inf reach the pixels that read them."""
    net = sc.Net(f'name: "t" input: "data" input_shape {{ dim: 2 dim: 3 dim: 10 dim: 11 }}\n'
                 f'layer {{ name: "up" type: "Interp" bottom: "data" top: "up" '
                 f'interp_param {{ {param} }} }}', dtype=dtype)
    layer = net.layers["up"]
    x = torch.randn(2, 3, 10, 11, dtype=dtype)
    x[0, 1, 4, 5], x[1, 2, 9, 10] = float("nan"), float("inf")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    expected = layer(x)
    got = inference.compiled_resize(layer, x)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance, equal_nan=True)
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                             else torch.contiguous_format)
    buffer = torch.empty_like(got)
    assert inference.compiled_resize(layer, x, out=buffer).data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, got, rtol=0, atol=0, equal_nan=True)
    # added into a sum (the embedding head's resized parts), where the loop runs
    total = torch.randn(got.shape, dtype=dtype).contiguous(memory_format=torch.channels_last
                                                            if layout == "channels_last"
                                                            else torch.contiguous_format)
    start = total.clone()
    added = inference.compiled_resize(layer, x, out=total, accumulate=True)
    compiled = inference.native_function("interp.c", "bilinear", dtype) is not None
    if param == "shrink_factor: 1" or not compiled:     # nothing added, nothing written
        assert added is None and torch.equal(total, start)
    else:
        torch.testing.assert_close(total, start + got, rtol=tolerance, atol=tolerance,
                                   equal_nan=True)
    with torch.no_grad():
        torch.testing.assert_close(net.forward(data=x)["up"], expected, rtol=tolerance,
                                   atol=tolerance, equal_nan=True)


def _segaware_block(name, bottom, channels, num_output, kernel=3, pad=1, stride=1, dilation=1,
                    relu=True):
    """The released configs' segaware convolution of `bottom` (channels) with the mask of the
    embedding "emb": Im2dist -> Scale -> AbsVal -> Exp -> Tile, Im2col x mask, a convolution
    on the columns (fused into one op by the net), and a ReLU."""
    geometry = f"kernel_size: {kernel} pad: {pad} stride: {stride} dilation: {dilation}"
    return f"""
    layer {{ name: "{name}_dist" type: "Im2dist" bottom: "emb" top: "{name}_dist"
      convolution_param {{ {geometry} }} im2dist_param {{ norm: L1 }} }}
    layer {{ name: "{name}_w" type: "Scale" bottom: "{name}_dist" top: "{name}_w"
      scale_param {{ num_axes: 0 filler {{ type: "constant" value: 0.05 }} bias_term: false }} }}
    layer {{ name: "{name}_abs" type: "AbsVal" bottom: "{name}_w" top: "{name}_abs" }}
    layer {{ name: "{name}_exp" type: "Exp" bottom: "{name}_abs" top: "{name}_exp"
      exp_param {{ scale: -1 }} }}
    layer {{ name: "{name}_tile" type: "Tile" bottom: "{name}_exp" top: "{name}_tile"
      tile_param {{ axis: 1 tiles: {channels} }} }}
    layer {{ name: "{name}_cols" type: "Im2col" bottom: "{bottom}" top: "{name}_cols"
      convolution_param {{ num_output: {num_output} {geometry} }} }}
    layer {{ name: "{name}_hit" type: "Eltwise" bottom: "{name}_cols" bottom: "{name}_tile"
      top: "{name}_hit" eltwise_param {{ operation: PROD }} }}
    layer {{ name: "{name}" type: "Convolution" bottom: "{name}_hit" top: "{name}"
      convolution_param {{ num_output: {num_output} {geometry} bottom_is_im2col: true }} }}
    """ + (f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}'
           if relu else "")


def _segaware_net(batch, channels, size, blocks, dtype=torch.float32):
    """x (batch, channels, size) and emb (batch, 4, size) inputs, then segaware blocks
    (name, bottom, channels, num_output, kernel, pad, stride, dilation, relu); the blocks
    after the first one read its top at the image size (stride 1)."""
    dims = lambda c: " ".join(f"dim: {d}" for d in (batch, c, *size))
    text = (f'name: "segaware" input: "x" input_shape {{ {dims(channels)} }} '
            f'input: "emb" input_shape {{ {dims(4)} }}\n'
            + "".join(_segaware_block(*block) for block in blocks))
    net = sc.Net(text, dtype=dtype)
    _randomize(net)
    with torch.no_grad():
        for r in net.records:
            if r.type == "Convolution":
                r.module.caffe_blobs()[0].mul_(0.1)
    return net


def _masked_ops(net):
    gm = net.graph_module(inference=True)
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                    inference.InferenceMaskedConv)]


PIXEL_MAJOR = inference._packed_convolution_available() and \
    native_function("masked_conv.c", "masked_pixel_columns", torch.float32) is not None


@pytest.mark.skipif(not PIXEL_MAJOR, reason="needs oneDNN and the compiled column loop")
@pytest.mark.parametrize("block", [
    (16, 24, 3, 1, 1, 1, True), (20, 16, 3, 2, 1, 2, False), (32, 17, 3, 1, 2, 1, True),
    (16, 8, 3, 6, 1, 6, True),     # dilated taps past a 9x10 image
    (16, 12, 5, 2, 1, 1, False),
])
@pytest.mark.parametrize("batch", [1, 2])
def test_segaware_convolutions_run_pixel_major_columns_through_onednn(block, batch,
                                                                      monkeypatch):
    """Float32 segaware convolutions of 128+ columns per output run as pixel-major masked
    columns times oneDNN's 1x1 convolution (bias and ReLU as post-ops), in bands shorter than
    the image; the next one reads the channels_last top; outputs as the exact graph's."""
    from segaware_caffe.kernels import masked_conv as masked_conv_module
    monkeypatch.setattr(masked_conv_module, "CPU_BAND_BYTES", 20000)
    channels, num_output, kernel, pad, stride, dilation, relu = block
    blocks = [("a", "x", channels, num_output, kernel, pad, stride, dilation, relu)]
    if stride == 1:
        blocks.append(("b", "a", num_output, 16, 3, 1, 1, 1, True))
    net = _segaware_net(batch, channels, (9, 10), blocks)
    ops = _masked_ops(net)
    assert len(ops) == len(blocks) and all(op.channels_last for op in ops)
    # fewer columns per output (b after 12 or 8 channels): the band loop, channels_last top
    pixel_major = [op.fused.conv.weight[0].numel() >= 128 for op in ops]
    assert [op.pixel_major for op in ops] == pixel_major and pixel_major[0]
    calls = []
    original = masked_conv_module.masked_conv2d_pixel_major
    monkeypatch.setattr(inference, "masked_conv2d_pixel_major",
                        lambda *a: calls.append(1) or original(*a))
    inputs = _inputs(net)
    _check(net, inputs)
    assert len(calls) == sum(pixel_major)


@pytest.mark.skipif(not PIXEL_MAJOR, reason="needs oneDNN and the compiled column loop")
def test_pixel_major_weights_follow_parameters_and_a_refusal_falls_back(monkeypatch):
    """The reordered pixel-major weights are made again after a parameter change; where oneDNN
    refuses the product, the band loop of the exact path gives the top from then on; a deep
    copy makes its own reordering."""
    import copy
    net = _segaware_net(1, 16, (12, 11), [("a", "x", 16, 16, 3, 1, 1, 1, True),
                                          ("b", "a", 16, 20, 3, 1, 1, 1, False)])
    inputs = _inputs(net)
    _check(net, inputs)
    with torch.no_grad():
        net.params["a"][0].mul_(-1)
    _check(net, inputs)
    net.params["b"][1].data.add_(1)
    inference.parameters_changed()
    _check(net, inputs)
    twin = copy.deepcopy(net)
    _check(twin, inputs)

    def refuse(*args):
        raise RuntimeError("oneDNN: could not create a primitive")
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", refuse, raising=False)
    _check(net, inputs)
    assert all(op._pixel_failed for op in _masked_ops(net))


@pytest.mark.parametrize("batch", [1, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tail", ["", "relu", "leaky", "nobias", "transpose"])
def test_inner_products_of_a_few_rows(batch, dtype, tail, monkeypatch):
    """Up to LINEAR_ROWS input rows, an InnerProduct (with its ReLU / leaky ReLU, bias or none)
    is the compiled product split over output rows; more rows, or a transposed weight, torch's;
    the exact graph's values either way."""
    ip = "inner_product_param { num_output: 37" + (" bias_term: false" if tail == "nobias"
                                                     else "") + \
        (" transpose: true" if tail == "transpose" else "") + " }"
    body = f"""
    layer {{ name: "conv" type: "Convolution" bottom: "data" top: "c" convolution_param {{
      num_output: 6 kernel_size: 3 }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "c" top: "y" {ip} }}
    """ + ({"relu": 'layer { name: "r" type: "ReLU" bottom: "y" top: "y" }',
            "leaky": 'layer { name: "r" type: "ReLU" bottom: "y" top: "y" '
                     'relu_param { negative_slope: 0.2 } }'}.get(tail, ""))
    net = _net(body, (batch, 3, 11, 13), dtype=dtype)
    calls = []
    original = inference._few_rows_linear
    monkeypatch.setattr(inference, "_few_rows_linear",
                        lambda *a: calls.append(original(*a) is not None) or original(*a))
    _check(net, _inputs(net), float64=dtype == torch.float64)
    compiled = native_function("linear.c", "linear_rows", dtype) is not None
    assert calls == [compiled and batch <= inference.LINEAR_ROWS and tail != "transpose"]


WINOGRAD_READY = inference._packed_convolution_available() and \
    inference._winograd_loops(torch.float32) is not None


@pytest.mark.skipif(not WINOGRAD_READY, reason="needs oneDNN and the compiled transforms")
@pytest.mark.parametrize("channels,outputs,size,pad,batch", [
    (128, 128, (10, 14), (1, 1), 1), (130, 144, (11, 9), (0, 0), 2),   # odd tiles, N = 2
    (128, 129, (12, 13), (2, 1), 1), (144, 128, (16, 16), (1, 0), 1),
])
@pytest.mark.parametrize("tail", ["", "relu", "leaky", "nobias", "residual", "residual_relu"])
def test_winograd_convolutions_keep_the_exact_values(channels, outputs, size, pad, batch, tail,
                                                     monkeypatch):
    """Stride-1 3x3 convolutions of 128+ channels run as Winograd F(2x2, 3x3) (in bands of tile
    rows, with the bias, the ReLU / leaky ReLU, or a residual sum written into the shortcut);
    values as the exact graph's, within float32 rounding."""
    monkeypatch.setattr(inference, "WINOGRAD_BAND_BYTES", 200_000)
    residual = tail.startswith("residual")
    if residual:
        pad = (1, 1)        # the sum needs the shortcut's size
    # a (3x3) -> b (1x1) -> w (3x3) [-> sum with a] [-> ReLU]: a is the graph's (channels_last),
    # free after the sum
    body = f"""
    layer {{ name: "a" type: "Convolution" bottom: "data" top: "a" convolution_param {{
      num_output: {outputs} kernel_size: 3 pad: 1 }} }}
    layer {{ name: "b" type: "Convolution" bottom: "a" top: "b" convolution_param {{
      num_output: {channels} kernel_size: 1 }} }}
    layer {{ name: "w" type: "Convolution" bottom: "b" top: "w" convolution_param {{
      num_output: {outputs} kernel_size: 3 pad_h: {pad[0]} pad_w: {pad[1]}
      {"bias_term: false" if tail == "nobias" else ""} }} }}
    """
    top = "w"
    if residual:
        body += 'layer { name: "sum" type: "Eltwise" bottom: "w" bottom: "a" top: "s" }'
        top = "s"
    slope = {"relu": 0, "leaky": 0.1, "residual_relu": 0}.get(tail)
    if slope is not None:
        body += (f'layer {{ name: "r" type: "ReLU" bottom: "{top}" top: "{top}" '
                 f'relu_param {{ negative_slope: {slope} }} }}')
    net = _net(body, (batch, channels, *size), dtype=torch.float32)
    calls = []
    original = inference.winograd_convolution
    monkeypatch.setattr(inference, "winograd_convolution",
                        lambda *a, **k: calls.append(k.get("out") is not None or
                                                     (len(a) > 6 and a[6] is not None))
                        or original(*a, **k))
    _check(net, _inputs(net))
    assert calls, "the Winograd path ran"
    if residual:       # (a's convolution runs by Winograd too)
        assert _residual_modes(net) == ["add_relu" if tail == "residual_relu" else "add"]
        assert calls == [False, True]


@pytest.mark.skipif(not WINOGRAD_READY, reason="needs oneDNN and the compiled transforms")
def test_winograd_does_not_run_where_it_would_be_slower_or_is_refused(monkeypatch):
    """Fewer than 128 channels, stride 2, dilation, float64 or a tiny image: oneDNN's direct
    convolution; a refused product: the direct convolution from then on."""
    def layer(channels, **settings):
        text = " ".join(f"{k}: {v}" for k, v in settings.items())
        net = _net(f"""layer {{ name: "w" type: "Convolution" bottom: "data" top: "w"
          convolution_param {{ num_output: 128 kernel_size: 3 {text} }} }}""",
                   (1, channels, 16, 16), dtype=torch.float32)
        return net.records[-1].module
    x = lambda c, size=16: torch.randn(1, c, size, size)
    assert inference.winograd_applies(layer(128, pad=1), x(128))
    assert not inference.winograd_applies(layer(64, pad=1), x(64))
    assert not inference.winograd_applies(layer(128, stride=2), x(128))
    assert not inference.winograd_applies(layer(128, dilation=2), x(128))
    assert not inference.winograd_applies(layer(128), x(128).double())
    assert not inference.winograd_applies(layer(128), x(128, 7))        # 9 tiles
    net = _net("""layer { name: "w" type: "Convolution" bottom: "data" top: "w"
      convolution_param { num_output: 128 kernel_size: 3 pad: 1 } }""", (1, 128, 12, 12),
               dtype=torch.float32)
    inputs = _inputs(net)

    def refuse(*args, **kwargs):
        raise RuntimeError("could not create a primitive")
    monkeypatch.setattr(inference.PackedPointwise, "__call__", refuse)
    _check(net, inputs)
    gm = net.graph_module(inference=True)
    ops = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert ops[0]._winograd_failed


@pytest.mark.skipif(not inference._packed_convolution_available(), reason="needs oneDNN")
def test_a_reordered_kernel_per_input_shape():
    """PackedPointwise reorders its kernel for each input shape it sees (a last, shorter band
    too), and its products are the 1x1 convolution's, grouped or not."""
    from segaware_caffe.kernels.masked_conv import PackedPointwise
    for groups in (1, 4):
        kernel = torch.randn(8 * groups, 5, 1, 1)
        product = PackedPointwise(kernel, groups)
        for rows in (3, 1, 3):
            x = torch.randn(2, 5 * groups, rows, 7).contiguous(memory_format=torch.channels_last)
            expected = torch.nn.functional.conv2d(x, kernel, groups=groups)
            torch.testing.assert_close(product(x), expected, rtol=1e-5, atol=1e-5)
        assert len(product._reordered) == 2
