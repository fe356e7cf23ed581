"""Pooling as nn.MaxPool2d / nn.AvgPool2d where torch's ceil-mode rules are Caffe's."""
from .registry import Emission, pair_or_int, register_emitter

__all__ = ["emit_pooling"]
CEIL = 0


@register_emitter("Pooling")
def emit_pooling(spec):
    kw = spec.kwargs
    if kw.get("mask_top") or spec.num_tops != 1:
        return None
    x = spec.bottoms[0]
    method = kw.get("method", "MAX")
    if method not in ("MAX", "AVE"):
        # STOCHASTIC (TEST: sum(x^2) / sum(x) per window; TRAIN: a sampled value) has no stock
        # torch module: the layer class runs it
        return None
    if kw.get("global_pooling"):
        reduce = "amax" if method == "MAX" else "mean"
        return Emission(f"{x}.{reduce}(dim=(2, 3), keepdim=True)", note="global pooling")
    kernel, pad, stride = kw["kernel"], tuple(kw.get("pad", (0, 0))), tuple(kw.get("stride", (1, 1)))
    # torch accepts pad <= kernel/2 only, and always drops a last window that starts in the
    # padding; Caffe drops it only when the layer pads, which is the same unless kernel < stride
    if any(p > k // 2 for p, k in zip(pad, kernel)):
        return None
    if not any(pad) and any(k < s for k, s in zip(kernel, stride)):
        return None
    ceil = kw.get("round_mode", CEIL) == CEIL
    args = [f"kernel_size={pair_or_int(kernel)}", f"stride={pair_or_int(stride)}"]
    if any(pad):
        args.append(f"padding={pair_or_int(pad)}")
    if ceil:
        args.append("ceil_mode=True")
    cls = "nn.MaxPool2d" if method == "MAX" else "nn.AvgPool2d"
    return Emission(f"{spec.attr}({x})", module=f"{cls}({', '.join(args)})")

