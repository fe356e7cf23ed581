"""Standard layers, group A: Convolution, Deconvolution, InnerProduct, Im2col, Pooling, Interp,
LRN, BatchNorm, Scale, Bias, DummyData, PReLU.

Golden cases are run layer by layer (built from the case prototxt, fed `in/*`, weights from
`param/*`), forward and backward; the remaining tests use references written from the maths.
"""
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe_proto import caffe_pb2, read_net
from segaware_caffe import BuildContext, LayerSetupError
from segaware_caffe.layer import layer_class
from segaware_caffe.layers.pooling import pooled_size

GOLDEN_CASES = [
    "conv_bottom_is_im2col", "conv_dilated_k3d2", "conv_group2", "deconv_k4s2_group",
    "filler_bilinear_deconv", "innerproduct", "im2col_k3p1", "im2col_k3p2d2", "im2col_k5s2p2",
    "pool_ave_k3s2_border", "pool_global_ave", "pool_max_k2s2_odd", "pool_max_k3s2p1_ceil",
    "interp_hw_explicit", "interp_shrink2", "interp_zoom2", "interp_zoom2_padbeg_padend",
    "interp_zoom4", "lrn_across", "lrn_within", "batchnorm_globalstats_then_scale",
    "scale_bias_axis1", "scale_scalar_numaxes0", "dummydata_const_multi", "dummydata_xy_1x2x5x6",
    "dummydata_xy_1x2x7x9",
]


def assert_close(got, ref, what):
    """Golden tolerance: |got - ref| <= 1e-4 |ref| + 1e-5 max|ref|, elementwise."""
    got = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, float)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    scale = np.abs(ref).max() if ref.size else 0.0
    err = np.abs(got - ref)
    bad = err > 1e-4 * np.abs(ref) + 1e-5 * scale
    if bad.any():
        index = np.unravel_index(np.argmax(err), err.shape)
        raise AssertionError(f"{what}: {bad.sum()} elements off, max abs error {err.max():.3g} "
                             f"at {index} (got {got[index]}, expected {ref[index]})")
    return float(err.max()) if err.size else 0.0


def build(layer_param, bottom_shapes, phase="TEST"):
    if isinstance(layer_param, str):
        layer_param = read_net(f"layer {{ {layer_param} }}").layer[0]
    ctx = BuildContext(name=layer_param.name, type=layer_param.type, phase=phase,
                       bottom_shapes=[tuple(s) for s in bottom_shapes],
                       bottom_names=list(layer_param.bottom), top_names=list(layer_param.top))
    return layer_class(layer_param.type, layer_param.name).from_proto(layer_param, ctx)


def as_tuple(tops):
    return (tops,) if isinstance(tops, torch.Tensor) else tuple(tops)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_case(shared, case):
    root = shared / "golden" / "layers" / case
    net = read_net(root / "net.prototxt")
    meta = json.loads((root / "meta.json").read_text())
    data = np.load(root / "data.npz")
    blobs = {name: torch.tensor(data[f"in/{name}"], requires_grad=True) for name in net.input}
    inputs = dict(blobs)
    params = {}       # (layer, index) -> Parameter, for layers whose blobs learn (lr_mult != 0)
    for lp in net.layer:
        layer = build(lp, [blobs[b].shape for b in lp.bottom], meta["phase"])
        for index, blob in enumerate(layer.caffe_blobs()):
            stored = data[f"param/{lp.name}/{index}"]
            if lp.type == "Deconvolution" and "filler" in case:
                assert_close(blob, stored, f"{lp.name} blob {index} as filled")
            with torch.no_grad():
                blob.copy_(torch.from_numpy(stored).reshape(blob.shape))
            lr_mult = lp.param[index].lr_mult if index < len(lp.param) else 1.0
            if lr_mult != 0:
                params[lp.name, index] = blob
        tops = as_tuple(layer(*[blobs[b] for b in lp.bottom]))
        if lp.type == "DummyData":
            # Net-level rule (SEMANTICS §11.6): Net::Forward zeroes element 0 of every net output
            # before the layers run; a constant DummyData top is never rewritten, so it keeps it.
            tops = [top.clone().view(-1).index_fill_(0, torch.tensor([0]), 0).view(top.shape)
                    if spec.type == "constant" and name in meta["outputs"] else top
                    for top, spec, name in zip(tops, layer.fillers, lp.top)]
        blobs.update(zip(lp.top, tops))
    for name, value in blobs.items():
        assert_close(value, data[f"out/{name}"], f"{case}: out/{name}")
    if not meta["backward"]:
        return
    seeded = sum((blobs[name] * torch.from_numpy(data[f"topdiff/{name}"])).sum()
                 for name in meta["outputs"])
    wrt = list(inputs.values()) + list(params.values())
    grads = torch.autograd.grad(seeded, wrt, allow_unused=True)
    for (name, tensor), grad in zip(list(inputs.items()) + list(params.items()), grads):
        if isinstance(name, tuple):
            key = f"paramdiff/{name[0]}/{name[1]}"
        else:
            key = f"diff/{name}"
        assert_close(torch.zeros_like(tensor) if grad is None else grad, data[key], f"{case}: {key}")
