"""NormConvMeanfield with N > 1 and learned (non-identity) blobs, against a reference written
from its definition."""

import numpy as np
import torch


from tests.layers.helpers import build, patch_positions
from tests.tolerances import BIG, assert_close


def _softmax(a, axis):
    e = np.exp(a - a.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def meanfield_message(q, feat, kernel, pad, dilation, scale):
    """One image's message (remove flags true): sum_k softmax_k(-scale * D)[k, p] * Q[p + o_k]."""
    channels, height, width = q.shape
    dist = None
    for k, oh, ow, is_centre, (ch, cw), (nh, nw), centre_in, neigh_in, out in patch_positions(
            height, width, kernel, pad, 1, dilation):
        if dist is None:
            dist = np.zeros((kernel * kernel,) + out)
        if centre_in and (is_centre or not neigh_in):
            dist[k, oh, ow] = BIG
        elif centre_in:
            diff = feat[:, ch, cw].astype(np.float64) - feat[:, nh, nw]
            dist[k, oh, ow] = (0.5 * diff * diff).sum()
    attention = _softmax(-scale * dist, 0)
    message = np.zeros((channels,) + dist.shape[1:])
    for k, oh, ow, _, _, (nh, nw), _, neigh_in, _ in patch_positions(
            height, width, kernel, pad, 1, dilation):
        if neigh_in:
            message[:, oh, ow] += attention[k, oh, ow] * q[:, nh, nw]
    return message


def test_normconv_meanfield_batch_with_learned_blobs():
    rng = np.random.default_rng(6)
    batch, channels, height, width = 2, 3, 7, 8
    unary, q0 = (rng.standard_normal((batch, channels, height, width)).astype(np.float32)
                 for _ in range(2))
    bilateral = rng.standard_normal((batch, 4, height, width)).astype(np.float32)
    spatial = rng.standard_normal((batch, 2, height, width)).astype(np.float32)
    layer = build('name: "c" type: "NormConvMeanfield" bottom: "u" bottom: "q" bottom: "b" '
                  'bottom: "s" top: "c" norm_conv_meanfield_param { num_iterations: 3 '
                  'remove_center: true remove_bounds: true remove_center: true remove_bounds: true '
                  'kernel_size: 3 pad: 2 dilation: 2 scale: 0.7 '
                  'kernel_size: 5 pad: 2 dilation: 1 scale: 1.5 }',
                  [unary.shape, q0.shape, bilateral.shape, spatial.shape])
    blobs = [rng.standard_normal((channels, channels)).astype(np.float32) for _ in range(3)]
    with torch.no_grad():
        for parameter, value in zip(layer.caffe_blobs(), blobs):
            parameter.copy_(torch.tensor(value).reshape(1, 1, channels, channels))
    w_spatial, w_bilateral, compat = blobs
    ref = np.zeros(unary.shape)
    for n in range(batch):
        x = q0[n].astype(np.float64)
        for _ in range(3):
            q = _softmax(x, 0)
            s = meanfield_message(q, spatial[n], 5, 2, 1, 1.5)
            b = meanfield_message(q, bilateral[n], 3, 2, 2, 0.7)
            m = np.einsum("ab,bhw->ahw", w_spatial, s) + np.einsum("ab,bhw->ahw", w_bilateral, b)
            x = unary[n] - np.einsum("ab,bhw->ahw", compat, m)
        ref[n] = x
    got = layer(*(torch.tensor(a) for a in (unary, q0, bilateral, spatial)))
    assert_close(got, ref, "top")
