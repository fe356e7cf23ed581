"""Im2dist and Im2parity layers with stride, dilation and pads larger than the kernel, against
per-tap loops."""

import numpy as np
import pytest
import torch


from tests.layers.helpers import build, patch_positions
from tests.tolerances import BIG
from tests.tolerances import assert_close


def im2dist_reference(x, grad_top, kernel, pad, stride, dilation, norm, remove_center,
                      remove_bounds):
    """Forward from Im2dist's definition; backward by the original's GPU rule (L1 takes
    sign(0) = 0), which the project follows where the CPU and GPU paths differ."""
    batch, _, height, width = x.shape
    top = grad = None
    for k, oh, ow, is_centre, (ch, cw), (nh, nw), centre_in, neigh_in, out in patch_positions(
            height, width, kernel, pad, stride, dilation):
        if top is None:
            top = np.zeros((batch, kernel * kernel) + out, np.float32)
            grad = np.zeros(x.shape)
        for n in range(batch):
            if not centre_in:
                continue
            if remove_center and is_centre:
                top[n, k, oh, ow] = BIG
            elif neigh_in:
                diff = x[n, :, ch, cw] - x[n, :, nh, nw]
                top[n, k, oh, ow] = np.abs(diff).sum() if norm == "L1" else (0.5 * diff * diff).sum()
                if not is_centre:
                    step = (np.sign(diff) if norm == "L1" else diff) * grad_top[n, k, oh, ow]
                    grad[n, :, ch, cw] += step
                    grad[n, :, nh, nw] -= step
            else:
                top[n, k, oh, ow] = BIG if remove_bounds else 0
    return top, grad


GEOMETRIES = [(3, 1, 2, 1), (3, 4, 1, 1), (3, 5, 2, 2), (4, 2, 3, 1), (5, 7, 2, 1), (3, 0, 3, 2)]


@pytest.mark.parametrize("kernel,pad,stride,dilation", GEOMETRIES)
@pytest.mark.parametrize("norm,remove_center,remove_bounds", [("L1", False, False),
                                                              ("L1", True, True),
                                                              ("L2", True, False)])
def test_im2dist_stride_and_oversized_pad(kernel, pad, stride, dilation, norm, remove_center,
                                          remove_bounds):
    rng = np.random.default_rng(2)
    x = rng.integers(-2, 3, (2, 3, 7, 8)).astype(np.float32)   # small integers: exact ties
    flags = f"remove_center: {str(remove_center).lower()} remove_bounds: {str(remove_bounds).lower()}"
    layer = build(f'name: "d" type: "Im2dist" bottom: "x" top: "y" convolution_param {{ '
                  f'kernel_size: {kernel} pad: {pad} stride: {stride} dilation: {dilation} }} '
                  f'im2dist_param {{ norm: {norm} {flags} }}', [x.shape])
    xt = torch.tensor(x, requires_grad=True)
    top = layer(xt)
    grad_top = rng.standard_normal(tuple(top.shape)).astype(np.float32)
    top.backward(torch.tensor(grad_top))
    ref_top, ref_grad = im2dist_reference(x, grad_top, kernel, pad, stride, dilation, norm,
                                          remove_center, remove_bounds)
    assert_close(top, ref_top, "top")
    assert_close(xt.grad, ref_grad, "bottom diff")


@pytest.mark.parametrize("kernel,pad,stride,dilation", GEOMETRIES)
@pytest.mark.parametrize("ignore_label", [None, 255])
def test_im2parity_stride_and_oversized_pad(kernel, pad, stride, dilation, ignore_label):
    rng = np.random.default_rng(3)
    labels = (rng.choice([0, 1, 2, 255], (2, 2, 7, 8))
              + rng.choice([0.0, 0.5], (2, 2, 7, 8))).astype(np.float32)
    extra = "" if ignore_label is None else f"im2parity_param {{ ignore_label: {ignore_label} }}"
    layer = build(f'name: "q" type: "Im2parity" bottom: "x" top: "y" convolution_param {{ '
                  f'kernel_size: {kernel} pad: {pad} stride: {stride} dilation: {dilation} }} '
                  f'{extra}', [labels.shape])
    fill = 0 if ignore_label is None else ignore_label
    ref = None
    for k, oh, ow, _, (ch, cw), (nh, nw), centre_in, neigh_in, out in patch_positions(
            7, 8, kernel, pad, stride, dilation):
        if ref is None:
            ref = np.zeros((2, kernel * kernel) + out, np.float32)
        for n in range(2):
            if not centre_in:
                ref[n, k, oh, ow] = fill
                continue
            for c in range(2):                      # the last channel wins
                centre = int(labels[n, c, ch, cw])
                neighbour = int(labels[n, c, nh, nw]) if neigh_in else 0
                if ignore_label is not None and ignore_label in (centre, neighbour):
                    ref[n, k, oh, ow] = ignore_label
                else:
                    ref[n, k, oh, ow] = float(centre == neighbour)
    assert_close(layer(torch.tensor(labels)), ref, "top", rel=0, floor=0)
