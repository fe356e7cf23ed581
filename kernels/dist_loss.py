"""DistLoss: hinge loss pulling same-label embeddings together, others apart (SEMANTICS §3).

For every element e of the distances D (usually Im2dist output) with parity p = int(P_e):
    same (p != 0):      m_e = max(D_e - alpha, 0),  diff_e = +m_e
    different (p == 0): m_e = max(beta - D_e, 0),   diff_e = -m_e
    ignored (p == ignore_label): m_e = 0, diff_e = 0
    loss = sum(m_e) / count(D)            (count includes ignored elements)

Backward is the original's, not the derivative of the loss: dD = diff / count (the gradient of
sum(0.5 m²)/count), whatever the incoming gradient's magnitude, so loss_weight does not scale it
(a zero incoming gradient, i.e. loss_weight 0, gives none, as Caffe then skips the backward).
The parity gets no gradient. Every image is processed (decision 3).
"""
import torch
from torch.autograd.function import once_differentiable

from . import _cuda


def _dist_loss_terms_cpu(dist, parity, alpha, beta, ignore_label):
    """(m, signed diff) per element."""
    parity = torch.trunc(parity)
    same = parity != 0
    margin = torch.where(same, (dist - alpha).clamp_min(0), (beta - dist).clamp_min(0))
    if ignore_label is not None:
        margin = torch.where(parity == ignore_label, margin.new_zeros(()), margin)
    return margin, torch.where(same, margin, -margin)


_CUDA_SOURCE = _cuda.GRID_STRIDE_LOOP + r"""
extern "C" __global__ void dist_loss_terms(
    const long long total, const scalar_t* dist, const scalar_t* parity, scalar_t* margin,
    scalar_t* diff, const scalar_t alpha, const scalar_t beta, const int has_ignore,
    const scalar_t ignore_label) {
  GRID_STRIDE_LOOP(index, total) {
    const scalar_t label = trunc(parity[index]);
    const bool same = label != (scalar_t)0;
    scalar_t value = same ? dist[index] - alpha : beta - dist[index];
    value = value > (scalar_t)0 ? value : (scalar_t)0;
    if (has_ignore && label == ignore_label) value = 0;
    margin[index] = value;
    diff[index] = same ? value : -value;
  }
}
"""


def _dist_loss_terms_cuda(dist, parity, alpha, beta, ignore_label):
    margin = torch.empty_like(dist)
    diff = torch.empty_like(dist)
    _cuda.launch("dist_loss_terms", _CUDA_SOURCE, dist.numel(),
                 (dist, parity.to(dist.dtype).contiguous(), margin, diff, float(alpha), float(beta),
                  ignore_label is not None,
                  float(ignore_label) if ignore_label is not None else 0.0), like=dist)
    return margin, diff


class DistLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dist, parity, alpha, beta, ignore_label):
        dist = dist.contiguous()
        if dist.is_cuda:
            margin, diff = _dist_loss_terms_cuda(dist, parity, alpha, beta, ignore_label)
        else:
            margin, diff = _dist_loss_terms_cpu(dist, parity.to(dist.dtype), alpha, beta,
                                                ignore_label)
        count = dist.numel()
        ctx.save_for_backward(diff)
        ctx.count = count
        return margin.sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (diff,) = ctx.saved_tensors
        # the original ignores the top diff (loss_weight); only "no backward at all" is kept
        grad_dist = diff * ((grad_loss != 0).to(diff.dtype) / ctx.count)
        return grad_dist, None, None, None, None


def dist_loss(dist, parity, alpha, beta, ignore_label=None):
    """The segaware embedding loss.

    Args:
        dist: distances, any shape (usually (N, K, Ho, Wo) from im2dist), float32/float64.
        parity: same number of elements (usually im2parity output): 0 = different labels,
            non-zero = same label, ignore_label = skip.
        alpha, beta: margins, 0 < alpha < beta.
        ignore_label: int or None.
    Returns:
        0-dim loss tensor; its gradient to dist is the original's diff/count (see module doc).
    """
    for name, tensor in (("dist", dist), ("parity", parity)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"dist_loss: {name} must be a tensor, got {type(tensor).__name__}")
    if dist.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dist_loss: dist must be float32 or float64, got {dist.dtype}")
    if dist.numel() != parity.numel():
        raise ValueError(f"dist_loss: parity must have as many elements as dist "
                         f"({tuple(dist.shape)} = {dist.numel()}), got {tuple(parity.shape)} = "
                         f"{parity.numel()}")
    if dist.numel() == 0:
        raise ValueError("dist_loss: dist is empty (the loss divides by its element count)")
    if dist.device != parity.device:
        raise ValueError(f"dist_loss: dist and parity must be on one device, got {dist.device} "
                         f"and {parity.device}")
    if not 0 < alpha < beta:
        raise ValueError(f"dist_loss: need 0 < alpha < beta, got alpha={alpha}, beta={beta}")
    if ignore_label is not None and (isinstance(ignore_label, bool)
                                     or not isinstance(ignore_label, int)):
        raise ValueError(f"dist_loss: ignore_label must be an int or None, got {ignore_label!r}")
    return DistLossFunction.apply(dist, parity.reshape(dist.shape), float(alpha), float(beta),
                                  ignore_label)
