"""The golden cases of the library's standard layer types, run layer by layer: each layer of the
case's canonical net (Split layers included, as Caffe builds it) is built on its own and called
on the blobs, with no net-level rule in between, so a difference points at one layer module.

Net::Forward's zeroing of element 0 of net outputs is the one place where the net, not a layer,
writes a blob (and through a Reshape it reaches the bottom's memory too): element 0 of every blob
is left out here (tests/golden checks whole nets, zeroing included)."""
import json

import numpy as np
import pytest
import torch

from segaware_caffe.canonical import canonical_net
from tests.conftest import GOLDEN
from tests.layers.helpers import as_tuple, build
from tests.tolerances import assert_close, is_integer_valued

CASES = [
    "conv_bottom_is_im2col", "conv_dilated_k3d2", "conv_group2", "deconv_k4s2_group",
    "filler_bilinear_deconv", "innerproduct", "im2col_k3p1", "im2col_k3p2d2", "im2col_k5s2p2",
    "pool_ave_k3s2_border", "pool_global_ave", "pool_max_k2s2_odd", "pool_max_k3s2p1_ceil",
    "interp_hw_explicit", "interp_shrink2", "interp_zoom2", "interp_zoom2_padbeg_padend",
    "interp_zoom4", "lrn_across", "lrn_within", "batchnorm_globalstats_then_scale",
    "scale_bias_axis1", "scale_scalar_numaxes0", "dummydata_const_multi", "dummydata_xy_1x2x5x6",
    "dummydata_xy_1x2x7x9",
    "absval", "argmax_axis1", "argmax_topk2_maxval", "channelreduce_max", "channelreduce_sum",
    "concat_axis1", "dropout_testphase", "eltwise_max3", "eltwise_prod", "eltwise_sum_coeff",
    "exp_base2_scale0.5_shift0.1", "exp_scaleneg1", "flatten", "power_scale_shift_power2",
    "relu_negslope", "reshape", "segaccuracy_ignore255", "sigmoid", "silence", "slice_equal",
    "slice_points", "softmax", "softmaxloss_ignore255", "softmaxloss_normalize_false", "split",
    "tanh", "tile_axis1_x5",
]


def run_layers(root, meta, data):
    """Build and run the case's layers one by one. Returns (blobs by name, the first version of
    each blob by name (Caffe's diff of an in-place blob is its first version's), learnable
    blobs by (layer, index))."""
    canonical = canonical_net(root / "net.prototxt", phase=meta["phase"],
                              variables=meta.get("variables") or None)
    blobs, first, params = {}, {}, {}
    for lp in canonical.param.layer:
        if lp.type == "Input":
            for top in lp.top:
                blobs[top] = first[top] = torch.tensor(data[f"in/{top}"], requires_grad=True)
            continue
        bottoms = [blobs[b] for b in lp.bottom]
        layer = build(lp, [b.shape for b in bottoms], meta["phase"])
        for index, blob in enumerate(layer.caffe_blobs()):
            stored = data[f"param/{lp.name}/{index}"]
            if lp.type == "Deconvolution" and "filler" in root.name:
                assert_close(blob, stored, f"{lp.name} blob {index} as filled")
            with torch.no_grad():
                blob.copy_(torch.from_numpy(stored).reshape(blob.shape))
            lr_mult = lp.param[index].lr_mult if index < len(lp.param) else 1.0
            if lr_mult != 0:
                params[lp.name, index] = blob
        for top, value in zip(lp.top, as_tuple(layer(*bottoms))):
            if value.requires_grad:
                value.retain_grad()
            blobs[top] = value
            first.setdefault(top, value)
    return blobs, first, params


@pytest.mark.parametrize("case", CASES)
def test_golden_case_layer_by_layer(case):
    root = GOLDEN / "layers" / case
    meta = json.loads((root / "meta.json").read_text())
    data = np.load(root / "data.npz")
    blobs, first, params = run_layers(root, meta, data)
    errors = {}
    for key in data.files:
        if not key.startswith("out/"):
            continue
        name = key[4:]
        got, ref = blobs[name].detach().double().numpy().copy(), data[key].astype(np.float64)
        if got.size:
            got.flat[0] = ref.flat[0]      # Net::Forward's zeroing (module docstring)
        errors[key] = assert_close(got, ref, f"{case}: {key}", exact=is_integer_valued(ref))
    if meta["backward"]:
        if meta["loss_tops"]:
            tops = list(meta["loss_tops"])
            seeds = [torch.tensor(float(w)) for w in meta["loss_tops"].values()]
        else:
            tops = [k[len("topdiff/"):] for k in data.files if k.startswith("topdiff/")]
            seeds = [torch.from_numpy(data[f"topdiff/{t}"]) for t in tops]
        live = [(blobs[t], s) for t, s in zip(tops, seeds) if blobs[t].requires_grad]
        torch.autograd.backward([t for t, _ in live], [s for _, s in live])
        for key in data.files:
            if key.startswith("diff/"):
                value = first[key[5:]]
                grad = value.grad if value.grad is not None else torch.zeros_like(value)
                errors[key] = assert_close(grad, data[key], f"{case}: {key}")
            elif key.startswith("paramdiff/"):
                _, layer, index = key.split("/")
                blob = params.get((layer, int(index)))
                if blob is not None:
                    grad = blob.grad if blob.grad is not None else torch.zeros_like(blob)
                    errors[key] = assert_close(grad, data[key], f"{case}: {key}")
    print(f"{case}: max error / max|ref|: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
