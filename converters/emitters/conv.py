"""Convolution, Deconvolution and InnerProduct as stock torch modules (same parameter names and
layouts as the Caffe blobs, so the converted tensors load unchanged)."""
from .registry import Emission, pair_or_int, register_emitter

__all__ = ["emit_convolution", "emit_deconvolution", "emit_inner_product"]


def _conv_arguments(kw, in_channels, out_channels):
    """nn.Conv2d / nn.ConvTranspose2d arguments, defaults left out."""
    args = [str(in_channels), str(out_channels), f"kernel_size={pair_or_int(kw['kernel'])}"]
    for name, key, default in (("stride", "stride", (1, 1)), ("padding", "pad", (0, 0)),
                               ("dilation", "dilation", (1, 1))):
        value = tuple(kw.get(key, default))
        if value != default:
            args.append(f"{name}={pair_or_int(value)}")
    if kw.get("group", 1) != 1:
        args.append(f"groups={kw['group']}")
    if not kw.get("bias_term", True):
        args.append("bias=False")
    return ", ".join(args)


def _plain_2d(spec):
    kw = spec.kwargs
    return (kw.get("channel_axis", 1) == 1 and len(spec.bottoms) == 1 and spec.num_tops == 1
            and len(spec.bottom_shapes[0]) == 4)


@register_emitter("Convolution")
def emit_convolution(spec):
    kw = spec.kwargs
    if not _plain_2d(spec) or kw.get("bottom_is_im2col"):
        return None
    out_channels, per_group = kw["weight_shape"][:2]
    args = _conv_arguments(kw, per_group * kw.get("group", 1), out_channels)
    return Emission(f"{spec.attr}({spec.bottoms[0]})", module=f"nn.Conv2d({args})")


@register_emitter("Deconvolution")
def emit_deconvolution(spec):
    kw = spec.kwargs
    if not _plain_2d(spec):
        return None
    in_channels, per_group = kw["weight_shape"][:2]
    args = _conv_arguments(kw, in_channels, per_group * kw.get("group", 1))
    return Emission(f"{spec.attr}({spec.bottoms[0]})", module=f"nn.ConvTranspose2d({args})")


@register_emitter("InnerProduct")
def emit_inner_product(spec):
    kw = spec.kwargs
    if kw.get("transpose") or kw.get("axis", 1) != 1 or len(spec.bottoms) != 1:
        return None
    bias = "" if kw.get("bias_term", True) else ", bias=False"
    x = spec.bottoms[0]
    flat = x if len(spec.bottom_shapes[0]) == 2 else f"{x}.flatten(1)"
    return Emission(f"{spec.attr}({flat})",
                    module=f"nn.Linear({kw['input_size']}, {kw['num_output']}{bias})")
