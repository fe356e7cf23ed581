"""Elementwise layers: ReLU, Sigmoid, TanH, AbsVal, Power, Exp, Log, ELU, BNLL, Threshold, Swish,
Dropout, Softmax."""
import numpy as np

from .registry import Emission, literal, register_emitter

__all__ = ["emit_abs_val", "emit_bnll", "emit_dropout", "emit_elu", "emit_exp", "emit_log",
           "emit_power", "emit_relu", "emit_sigmoid", "emit_softmax", "emit_swish", "emit_tanh",
           "emit_threshold"]


def _module_on_bottom(spec, module):
    """The layer as the nn module built by `module` (constructor text), called on its bottom."""
    return Emission(f"{spec.attr}({spec.bottoms[0]})", module=module)


@register_emitter("ReLU")
def emit_relu(spec):
    slope = spec.kwargs.get("negative_slope", 0.0)
    module = "nn.ReLU()" if slope == 0 else f"nn.LeakyReLU({literal(slope)})"
    return _module_on_bottom(spec, module)


@register_emitter("Sigmoid")
def emit_sigmoid(spec):
    return _module_on_bottom(spec, "nn.Sigmoid()")


@register_emitter("TanH")
def emit_tanh(spec):
    return _module_on_bottom(spec, "nn.Tanh()")


@register_emitter("AbsVal")
def emit_abs_val(spec):
    return Emission(f"torch.abs({spec.bottoms[0]})")


def _affine(x, scale, shift):
    """Caffe's order: scale first, then shift."""
    text = x if scale == 1 else f"-{x}" if scale == -1 else f"{x} * {literal(scale)}"
    if shift != 0:
        text = f"{text} + {literal(shift)}" if shift > 0 else f"{text} - {literal(-shift)}"
    return text


@register_emitter("Power")
def emit_power(spec):
    kw = spec.kwargs
    power, scale, shift = kw.get("power", 1.0), kw.get("scale", 1.0), kw.get("shift", 0.0)
    if float(np.float32(power) * np.float32(scale)) == 0:
        return None  # the original's constant output: left to the layer module
    base = _affine(spec.bottoms[0], scale, shift)
    if power == 1:
        return Emission(base if base != spec.bottoms[0] else f"{base}.clone()")
    return Emission(f"torch.pow({base}, {literal(power)})")


@register_emitter("Exp")
def emit_exp(spec):
    inner, outer = spec.kwargs.get("inner_scale", 1.0), spec.kwargs.get("outer_scale", 1.0)
    text = f"torch.exp({_affine(spec.bottoms[0], inner, 0)})"
    return Emission(text if outer == 1 else f"{text} * {literal(outer)}")


@register_emitter("Dropout")
def emit_dropout(spec):
    # nn.Dropout is the identity in eval mode (Caffe's TEST phase) and scales by 1/(1-p) in
    # training, like Caffe's TRAIN phase
    return _module_on_bottom(spec,
                             f"nn.Dropout(p={literal(spec.kwargs.get('dropout_ratio', 0.5))})")


@register_emitter("Softmax")
def emit_softmax(spec):
    return _module_on_bottom(spec, f"nn.Softmax(dim={spec.kwargs.get('axis', 1)})")


@register_emitter("Log")
def emit_log(spec):
    kw = spec.kwargs
    base_scale = kw.get("base_scale", 1.0)
    text = f"torch.log({_affine(spec.bottoms[0], kw.get('scale', 1.0), kw.get('shift', 0.0))})"
    return Emission(text if base_scale == 1 else f"{text} * {literal(base_scale)}")


@register_emitter("ELU")
def emit_elu(spec):
    return _module_on_bottom(spec, f"nn.ELU(alpha={literal(spec.kwargs.get('alpha', 1.0))})")


@register_emitter("BNLL")
def emit_bnll(spec):
    x = spec.bottoms[0]
    # log(1 + exp(x)) without overflow, as the layer computes it
    return Emission(f"torch.relu({x}) + torch.log1p(torch.exp(-torch.abs({x})))")


@register_emitter("Threshold")
def emit_threshold(spec):
    x = spec.bottoms[0]
    return Emission(f"({x}.detach() > {literal(spec.kwargs.get('threshold', 0.0))}).to({x}.dtype)",
                    note="no gradient (the original has none)")


@register_emitter("Swish")
def emit_swish(spec):
    x, beta = spec.bottoms[0], spec.kwargs.get("beta", 1.0)
    inner = x if beta == 1 else f"{x} * {literal(beta)}"
    return Emission(f"{x} * torch.sigmoid({inner})")
