"""DistLoss: hinge loss pulling same-label embeddings together, others apart.

For every element e of the distances D (usually Im2dist output) with parity p = int(P_e):
    same (p != 0):      m_e = max(D_e - alpha, 0),  diff_e = +m_e
    different (p == 0): m_e = max(beta - D_e, 0),   diff_e = -m_e
    ignored (p == ignore_label): m_e = 0, diff_e = 0
    loss = sum(m_e) / count(D)            (count includes ignored elements; NaN when D is empty,
                                           as 0 / 0 is)

Backward is the original's, not the derivative of the loss: dD = diff / count (the gradient of
sum(0.5 m²)/count), whatever the incoming gradient's magnitude, so loss_weight does not scale it
(a zero incoming gradient, i.e. loss_weight 0, gives none, as Caffe then skips the backward).
The parity gets no gradient. Every image of the batch is processed (the original's GPU path did
so; its CPU path only the first image).

The op is `torch.ops.segaware.dist_loss`; float16 / bfloat16 distances are computed in float32
and the loss cast back.
"""
import torch
from torch import Tensor

from . import _cuda
from .geometry import check_tensor, compute_dtype, no_autocast


def _terms_cpu(dist, parity, alpha, beta, ignore_label):
    """(m, signed diff) per element."""
    parity = torch.trunc(parity)
    same = parity != 0
    margin = torch.where(same, (dist - alpha).clamp_min(0), (beta - dist).clamp_min(0))
    if ignore_label is not None:
        margin = torch.where(parity == ignore_label, margin.new_zeros(()), margin)
    return margin, torch.where(same, margin, -margin)


def _terms_cuda(dist, parity, alpha, beta, ignore_label, begin=0):
    """`begin` > 0 numbers the elements from there (tests: offsets beyond 2^31)."""
    margin = torch.empty_like(dist)
    diff = torch.empty_like(dist)
    shifted = lambda t: _cuda.Shifted(t, begin) if begin else t  # noqa: E731
    _cuda.launch_flat("dist_loss_terms", ("dist_loss.cu",), dist.numel(),
                      (shifted(dist), shifted(parity), shifted(margin), shifted(diff),
                       float(alpha), float(beta), ignore_label is not None,
                       float(ignore_label) if ignore_label is not None else 0.0),
                      like=dist, begin=begin)
    return margin, diff


@torch.library.custom_op("segaware::dist_loss", mutates_args=())
@no_autocast
def dist_loss_op(dist: Tensor, parity: Tensor, alpha: float, beta: float,
                 ignore_label: int | None) -> tuple[Tensor, Tensor]:
    """(loss, diff / count): the 0-dim loss and the gradient the original gives dist."""
    dist = dist.contiguous()
    parity = parity.to(dist.dtype).reshape(dist.shape).contiguous()
    path = _terms_cuda if dist.is_cuda else _terms_cpu
    margin, diff = path(dist, parity, alpha, beta, ignore_label)
    count = dist.numel()
    if count == 0:   # 0 / 0, as the original's arithmetic gives for an empty blob
        return margin.sum() * float("nan"), diff
    return margin.sum() / count, diff / count


@dist_loss_op.register_fake
def _(dist, parity, alpha, beta, ignore_label):
    return dist.new_empty(()), torch.empty_like(dist, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, scaled_diff = output
    ctx.save_for_backward(scaled_diff)


def _backward(ctx, grad_loss, _grad_diff):
    grad_dist = None
    if ctx.needs_input_grad[0]:
        (scaled_diff,) = ctx.saved_tensors
        # the original ignores the top diff (loss_weight); only "no backward at all" is kept
        grad_dist = scaled_diff * (grad_loss != 0).to(scaled_diff.dtype)
    return grad_dist, None, None, None, None


dist_loss_op.register_autograd(_backward, setup_context=_setup_context)


def dist_loss(dist, parity, alpha, beta, ignore_label=None):
    """The segaware embedding loss.

    Args:
        dist: distances, any shape (usually (N, K, Ho, Wo) from im2dist), a floating tensor.
        parity: same number of elements (usually im2parity output): 0 = different labels,
            non-zero = same label, ignore_label = skip.
        alpha, beta: margins, 0 < alpha < beta.
        ignore_label: int or None.
    Returns:
        0-dim loss tensor in dist's dtype; its gradient to dist is the original's diff/count
        (see module doc). An empty dist gives NaN (0 / 0).
    """
    check_tensor("dist_loss", "dist", dist)
    check_tensor("dist_loss", "parity", parity, dtypes=None, like=dist)
    if dist.numel() != parity.numel():
        raise ValueError(f"dist_loss: parity must have as many elements as dist "
                         f"({tuple(dist.shape)} = {dist.numel()}), got {tuple(parity.shape)} = "
                         f"{parity.numel()}")
    if not 0 < alpha < beta:
        raise ValueError(f"dist_loss: need 0 < alpha < beta, got alpha={alpha}, beta={beta}")
    if ignore_label is not None and (isinstance(ignore_label, bool)
                                     or not isinstance(ignore_label, int)):
        raise ValueError(f"dist_loss: ignore_label must be an int or None, got {ignore_label!r}")
    dtype = compute_dtype(dist.dtype)
    loss, _ = dist_loss_op(dist.to(dtype), parity.detach(), float(alpha), float(beta),
                           ignore_label)
    return loss.to(dist.dtype)
