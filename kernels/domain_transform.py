"""Domain transform (Gastal & Oliveira 2011) as DeepLab's DomainTransform layer computes it:
edge-preserving recursive filtering of x guided by a reference gradient g.

For iteration i = 0..T-1 (sigma_i = s * sqrt(3) * 2^(T-i-1) / sqrt(4^T - 1)) the weights are
    w = clamp(exp(-sqrt(2) / sigma_i * (1 + g * s / r)), min_weight, 1)
and the signal is filtered in place by four first-order recursions over the valid top-left
h x w region of each image:
    left->right  y[j] += w[j]   * (y[j-1] - y[j])     right->left  y[j] += w[j+1] * (y[j+1] - y[j])
    top->bottom and bottom->top likewise along the columns.
Outside the valid region the output is x.

Backward (DomainTransform): the recursions are run in reverse, which is the exact gradient with
respect to x and to the weights; the reference gradient then receives
    dg = sum_i (-sqrt(2) / sigma_i) * (s / r) * dw * w
which is the derivative of the exponential *without* the clamp: where the weight is clamped
(to min_weight or to 1) the original still passes this gradient, and so does this module.

The constants are the original's float32 values. The recursions are sequential along the scan
axis, so each pass is a loop over one spatial axis, vectorised over images, channels and the
other axis.
"""
import math

import numpy as np
import torch
from torch.autograd.function import once_differentiable

NUM_PASSES = 4     # left->right, right->left, top->bottom, bottom->top


def domain_transform_constants(num_iter, spatial_sigma, range_sigma):
    """(mult1 per iteration, mult2) as float32 values: w = exp(mult1_i * (1 + g * mult2))."""
    s, r = np.float32(spatial_sigma), np.float32(range_sigma)
    mult2 = float(s / r)
    mult1 = []
    # IEEE arithmetic as in the original's C++: with many iterations the late sigma_i underflow
    # to 0 (mult1 = -inf: weight 0) and 4^num_iter may overflow, instead of Python's exceptions
    with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
        norm = np.sqrt(np.power(np.float64(4.0), num_iter) - 1.0)
        for i in range(num_iter):
            sigma_i = np.float32(np.float64(s) * math.sqrt(3.0)
                                 * np.power(np.float64(2.0), num_iter - (i + 1.0)) / norm)
            mult1.append(float(np.float32(-math.sqrt(2.0) / np.float64(sigma_i))))
    return mult1, mult2


def _weights(g, mult1, mult2, min_weight):
    """(N, H, W) weights of one iteration, float32 arithmetic and a correctly rounded exp."""
    t = mult1 * (1 + g * mult2)
    w = torch.exp(t.double()).to(g.dtype)
    return torch.clamp(torch.clamp(w, min=float(np.float32(min_weight))), max=1.0)


def _scan(y, w, length, other_ok, reverse, inter):
    """One recursion along axis 0 of y (L, N, C, K), in place; w (L, N, K); length (N,) valid
    extent along the scan, other_ok (N, K) valid positions across it. Stores the differences in
    inter (L, N, C, K) when it is given."""
    size = y.shape[0]
    steps = range(size - 2, -1, -1) if reverse else range(1, size)
    for pos in steps:
        prev = pos + 1 if reverse else pos - 1
        wpos = prev if reverse else pos
        active = ((wpos < length).unsqueeze(1) & other_ok).unsqueeze(1)    # (N, 1, K)
        diff = y[prev] - y[pos]
        if inter is not None:
            inter[pos] = diff
        y[pos] = torch.where(active, y[pos] + w[wpos].unsqueeze(1) * diff, y[pos])


def _scan_backward(gy, w, length, other_ok, reverse, inter, wdiff):
    """Reverse of `_scan`: gy (L, N, C, K) in place; accumulates the weight gradient (summed
    over channels) into wdiff (L, N, K)."""
    size = gy.shape[0]
    steps = range(0, size - 1) if reverse else range(size - 1, 0, -1)
    for pos in steps:
        prev = pos + 1 if reverse else pos - 1
        wpos = prev if reverse else pos
        active2 = (wpos < length).unsqueeze(1) & other_ok                  # (N, K)
        active = active2.unsqueeze(1)
        g = gy[pos]
        wdiff[wpos] = torch.where(active2, wdiff[wpos] + (g * inter[pos]).sum(1), wdiff[wpos])
        weight = w[wpos].unsqueeze(1)
        gy[prev] = torch.where(active, gy[prev] + weight * g, gy[prev])
        gy[pos] = torch.where(active, (1 - weight) * g, g)


def _valid(dims, height, width, device):
    """Valid (h, w) per image as int64 (C++ int() truncation), on `device`."""
    n = dims.shape[0]
    hw = torch.trunc(dims.detach().reshape(n, -1)[:, :2]).to(torch.int64)
    rows, cols = hw[:, 0], hw[:, 1]
    if bool((rows > height).any()) or bool((cols > width).any()):
        raise ValueError(f"domain_transform: the valid size (h, w) of every image must be at most "
                         f"the blob's ({height}, {width}), got {hw.tolist()}")
    return rows.to(device), cols.to(device)


def _layouts(height, width, rows, cols, device):
    """Masks across the scan axis: for the horizontal passes (rows valid), for the vertical ones
    (columns valid)."""
    h_ok = torch.arange(height, device=device).unsqueeze(0) < rows.unsqueeze(1)   # (N, H)
    w_ok = torch.arange(width, device=device).unsqueeze(0) < cols.unsqueeze(1)    # (N, W)
    return h_ok, w_ok


def _forward(x, g, rows, cols, mult1, mult2, min_weight, keep):
    """The filtered x; with keep, also the weights and differences the backward needs."""
    n, c, height, width = x.shape
    h_ok, w_ok = _layouts(height, width, rows, cols, x.device)
    y = x.permute(3, 0, 1, 2).contiguous()           # (W, N, C, H): horizontal scans
    saved = []
    for m1 in mult1:
        w = _weights(g[:, 0], m1, mult2, min_weight)   # (N, H, W)
        w_h = w.permute(2, 0, 1)                       # (W, N, H)
        w_v = w.permute(1, 0, 2)                       # (H, N, W)
        inters = [torch.zeros_like(y) if keep else None for _ in range(2)]
        _scan(y, w_h, cols, h_ok, False, inters[0])
        _scan(y, w_h, cols, h_ok, True, inters[1])
        y = y.permute(3, 1, 2, 0).contiguous()       # (H, N, C, W): vertical scans
        inters += [torch.zeros_like(y) if keep else None for _ in range(2)]
        _scan(y, w_v, rows, w_ok, False, inters[2])
        _scan(y, w_v, rows, w_ok, True, inters[3])
        y = y.permute(3, 1, 2, 0).contiguous()       # back to (W, N, C, H)
        if keep:
            saved.append((w, inters))
    return y.permute(1, 2, 3, 0).contiguous(), saved


def _backward(grad, rows, cols, mult1, mult2, saved):
    n, c, height, width = grad.shape
    h_ok, w_ok = _layouts(height, width, rows, cols, grad.device)
    gy = grad.permute(2, 0, 1, 3).contiguous()       # (H, N, C, W): vertical passes first
    grad_g = grad.new_zeros(n, height, width)
    valid = h_ok.unsqueeze(2) & w_ok.unsqueeze(1)    # (N, H, W)
    for m1, (w, inters) in zip(reversed(mult1), reversed(saved)):
        w_h = w.permute(2, 0, 1)
        w_v = w.permute(1, 0, 2)
        wdiff_v = grad.new_zeros(height, n, width)
        _scan_backward(gy, w_v, rows, w_ok, True, inters[3], wdiff_v)
        _scan_backward(gy, w_v, rows, w_ok, False, inters[2], wdiff_v)
        gy = gy.permute(3, 1, 2, 0).contiguous()     # (W, N, C, H)
        wdiff_h = wdiff_v.permute(2, 1, 0).contiguous()   # (W, N, H)
        _scan_backward(gy, w_h, cols, h_ok, True, inters[1], wdiff_h)
        _scan_backward(gy, w_h, cols, h_ok, False, inters[0], wdiff_h)
        gy = gy.permute(3, 1, 2, 0).contiguous()     # back to (H, N, C, W)
        wdiff = wdiff_h.permute(1, 2, 0)               # (N, H, W)
        term = (float(np.float32(m1) * np.float32(mult2)) * wdiff) * w
        grad_g = torch.where(valid, grad_g + term, grad_g)
    return gy.permute(1, 2, 0, 3).contiguous(), grad_g.unsqueeze(1)


class DomainTransformFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, dims, num_iter, spatial_sigma, range_sigma, min_weight):
        mult1, mult2 = domain_transform_constants(num_iter, spatial_sigma, range_sigma)
        rows, cols = _valid(dims, *x.shape[2:], x.device)
        keep = any(ctx.needs_input_grad[:2])
        y, saved = _forward(x, g, rows, cols, mult1, mult2, min_weight, keep)
        ctx.constants = (mult1, mult2)
        ctx.saved = saved
        ctx.save_for_backward(rows, cols)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, cols = ctx.saved_tensors
        grad_x, grad_g = _backward(grad.contiguous(), rows, cols, *ctx.constants, ctx.saved)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_g if ctx.needs_input_grad[1] else None, None, None, None, None, None)


def _check(x, g, dims, num_iter, spatial_sigma, range_sigma, min_weight):
    if x.dim() != 4:
        raise ValueError(f"domain_transform: x must be (N, C, H, W), got {tuple(x.shape)}")
    n, _, height, width = x.shape
    if tuple(g.shape) != (n, 1, height, width):
        raise ValueError(f"domain_transform: the reference gradient must be {(n, 1, height, width)}, "
                         f"got {tuple(g.shape)}")
    if dims.dim() == 0 or dims.shape[0] != n or (n and dims[0].numel() < 2):
        raise ValueError(f"domain_transform: dims must hold (h, w) per image, (N, 2, 1, 1) with N = {n}, "
                         f"got {tuple(dims.shape)}")
    if g.dtype != x.dtype or g.device != x.device:
        raise ValueError(f"domain_transform: x and the reference gradient must share dtype and device, "
                         f"got {x.dtype}/{x.device} and {g.dtype}/{g.device}")
    if num_iter < 1 or spatial_sigma <= 0 or range_sigma <= 0 or min_weight < 0:
        raise ValueError(f"domain_transform: needs num_iter >= 1, spatial_sigma > 0, range_sigma > 0 "
                         f"and min_weight >= 0, got {num_iter}, {spatial_sigma}, {range_sigma}, {min_weight}")


def domain_transform(x, g, dims, *, num_iter=3, spatial_sigma=50.0, range_sigma=5.0, min_weight=0.0):
    """Filter x (N, C, H, W) guided by g (N, 1, H, W) >= 0 over the valid (h, w) = dims[n, :2] of
    each image; differentiable in x and g (the original's gradient, see the module notes)."""
    _check(x, g, dims, num_iter, spatial_sigma, range_sigma, min_weight)
    if not (torch.is_grad_enabled() and (x.requires_grad or g.requires_grad)):
        mult1, mult2 = domain_transform_constants(num_iter, spatial_sigma, range_sigma)
        rows, cols = _valid(dims, *x.shape[2:], x.device)
        return _forward(x, g, rows, cols, mult1, mult2, min_weight, False)[0]
    return DomainTransformFunction.apply(x, g, dims, int(num_iter), float(spatial_sigma),
                                         float(range_sigma), float(min_weight))
