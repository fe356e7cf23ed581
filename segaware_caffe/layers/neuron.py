"""Elementwise neuron layers: AbsVal, Power, Exp, Log, Sigmoid, TanH, Threshold, BNLL, ELU.

Constants are rounded to float32 the way the original computes them (``Dtype`` arithmetic), and
backward passes that are not the plain derivative of the forward (Power's special cases, BNLL's
clamped exponent) are written out explicitly.
"""
import numpy as np
import torch

from ..layer import CaffeLayer, register_layer


def _f32(value):
    return float(np.float32(value))


def _non_default(**settings):
    """extra_repr text for the settings (name=(value, default)) that differ from their default."""
    return ", ".join(f"{name}={value}" for name, (value, default) in settings.items() if value != default)


class _ElementwiseNeuron(CaffeLayer):
    """A neuron layer without settings: same shape in and out, nothing to read from the prototxt."""
    SAME_SHAPE = True

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls()


@register_layer("AbsVal")
class AbsVal(_ElementwiseNeuron):
    """y = |x|; dx = sign(x) * dy with sign(0) = 0 (torch.abs's gradient does exactly that)."""

    def forward(self, x):
        return torch.abs(x)


class _PowerFunction(torch.autograd.Function):
    """y = (shift + scale*x)^power with the original's backward special cases."""

    @staticmethod
    def forward(ctx, x, power, scale, shift):
        diff_scale = _f32(np.float32(power) * np.float32(scale))
        ctx.constants = (power, scale, shift, diff_scale)
        if diff_scale == 0:
            value = 1.0 if power == 0 else _f32(np.power(np.float32(shift), np.float32(power)))
            y = torch.full_like(x, value)
        else:
            y = x
            if scale != 1:
                y = y * scale
            if shift != 0:
                y = y + shift
            if power != 1:
                y = torch.pow(y, power)
            elif y is x:
                y = x.clone()
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, y = ctx.saved_tensors
        power, scale, shift, diff_scale = ctx.constants
        if diff_scale == 0:
            # the original writes diff_scale (0) and never multiplies by the top diff
            return torch.zeros_like(x), None, None, None
        if power == 1:
            local = torch.full_like(x, diff_scale)
        elif power == 2:
            local = x * _f32(np.float32(diff_scale) * np.float32(scale))
            if shift != 0:
                local = local + _f32(np.float32(diff_scale) * np.float32(shift))
        elif shift == 0:
            local = y / x * power            # NaN/inf at x = 0, as in the original
        else:
            base = x * scale if scale != 1 else x
            local = y / (base + shift) * diff_scale
        return grad_y * local, None, None, None


@register_layer("Power")
class Power(CaffeLayer):
    """y = (shift + scale*x)^power (C pow semantics; a constant when power*scale == 0).

    Backward (dscale = power*scale): dscale == 0 -> 0; power == 1 -> dscale*dy;
    power == 2 -> dscale*(scale*x + shift)*dy; shift == 0 -> power*y/x*dy;
    else dscale*y/(scale*x + shift)*dy.
    """
    SAME_SHAPE = True

    def __init__(self, *, power=1.0, scale=1.0, shift=0.0):
        super().__init__()
        self.power, self.scale, self.shift = power, scale, shift

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.power_param
        return cls(power=_f32(p.power), scale=_f32(p.scale), shift=_f32(p.shift))

    def forward(self, x):
        return _PowerFunction.apply(x, self.power, self.scale, self.shift)

    def extra_repr(self):
        return _non_default(power=(self.power, 1.0), scale=(self.scale, 1.0), shift=(self.shift, 0.0))


@register_layer("Exp")
class Exp(CaffeLayer):
    """y = outer * exp(inner * x) with inner = ln(base)*scale (scale when base is -1 = e) and
    outer = 1 if shift == 0 else pow(base, shift) -- the raw base, so base -1 with a shift gives
    pow(-1, shift) (the original's bug, kept). dx = dy * y * inner."""
    SAME_SHAPE = True

    def __init__(self, *, inner_scale=1.0, outer_scale=1.0):
        super().__init__()
        self.inner_scale, self.outer_scale = inner_scale, outer_scale

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.exp_param
        base, scale, shift = np.float32(p.base), np.float32(p.scale), np.float32(p.shift)
        if base != -1 and not base > 0:
            raise ctx.error(f"exp_param.base must be strictly positive (or -1 for e), got {p.base}")
        log_base = np.float32(1) if base == -1 else np.log(base)
        inner = _f32(log_base * scale)
        with np.errstate(invalid="ignore", divide="ignore"):
            outer = 1.0 if shift == 0 else _f32(np.power(base, shift))
        if base == -1 and shift != 0:
            ctx.warn(f"exp_param: base -1 (e) with shift {p.shift} gives y = pow(-1, shift) * "
                     f"exp(scale*x) = {outer} * exp({inner}*x) in the original, not "
                     f"e^(shift + scale*x); kept for compatibility (give base: 2.7182817 for the "
                     f"intended formula)")
        return cls(inner_scale=inner, outer_scale=outer)

    def forward(self, x):
        y = torch.exp(x * self.inner_scale if self.inner_scale != 1 else x)
        if self.outer_scale != 1:
            y = y * self.outer_scale
        return y

    def extra_repr(self):
        return _non_default(inner_scale=(self.inner_scale, 1.0), outer_scale=(self.outer_scale, 1.0))


@register_layer("Log")
class Log(CaffeLayer):
    """y = log(shift + scale*x) / ln(base) (base -1 = e); dx = dy * scale / ln(base) / (shift + scale*x)."""
    SAME_SHAPE = True

    def __init__(self, *, base_scale=1.0, scale=1.0, shift=0.0):
        super().__init__()
        self.base_scale, self.scale, self.shift = base_scale, scale, shift

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.log_param
        base = np.float32(p.base)
        if base != -1 and not base > 0:
            raise ctx.error(f"log_param.base must be strictly positive (or -1 for e), got {p.base}")
        log_base = np.float32(1) if base == -1 else np.log(base)
        if log_base == 0:
            raise ctx.error(f"log_param.base {p.base} has log(base) = 0, so 1/log(base) is infinite")
        return cls(base_scale=_f32(np.float32(1) / log_base), scale=_f32(p.scale), shift=_f32(p.shift))

    def forward(self, x):
        inner = x * self.scale if self.scale != 1 else x
        if self.shift != 0:
            inner = inner + self.shift
        y = torch.log(inner)
        return y * self.base_scale if self.base_scale != 1 else y

    def extra_repr(self):
        return _non_default(base_scale=(self.base_scale, 1.0), scale=(self.scale, 1.0),
                            shift=(self.shift, 0.0))


@register_layer("Sigmoid")
class Sigmoid(_ElementwiseNeuron):
    """y = 1 / (1 + exp(-x)); dx = dy * y * (1 - y)."""

    def forward(self, x):
        return torch.sigmoid(x)


@register_layer("TanH")
class TanH(_ElementwiseNeuron):
    """y = tanh(x); dx = dy * (1 - y^2)."""

    def forward(self, x):
        return torch.tanh(x)


@register_layer("Threshold")
class Threshold(CaffeLayer):
    """y = 1 if x > threshold else 0. Forward only (the original has no backward)."""
    SAME_SHAPE = True
    HAS_BACKWARD = False

    def __init__(self, *, threshold=0.0):
        super().__init__()
        self.threshold = threshold

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls(threshold=_f32(layer_param.threshold_param.threshold))

    def forward(self, x):
        return (x.detach() > self.threshold).to(x.dtype)

    def extra_repr(self):
        return _non_default(threshold=(self.threshold, 0.0))


# exp() argument clamp of the original's BNLL backward
_BNLL_THRESHOLD = 50.0


class _BNLLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        # x > 0: x + log(1 + exp(-x)); else log(1 + exp(x)) -- one expression for both; the
        # original adds in double, which log1p matches for tiny exp(-|x|)
        return torch.relu(x) + torch.log1p(torch.exp(-torch.abs(x)))

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        expval = torch.exp(torch.clamp(x, max=_BNLL_THRESHOLD))
        return grad_y * expval / (expval + 1)


@register_layer("BNLL")
class BNLL(_ElementwiseNeuron):
    """y = log(1 + exp(x)) (binomial normal log likelihood); dx = dy * e/(e+1), e = exp(min(x, 50))."""

    def forward(self, x):
        return _BNLLFunction.apply(x)


class _ELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        # exp(x) - 1 rather than expm1: the original's float arithmetic near 0
        y = torch.where(x > 0, x, alpha * (torch.exp(torch.clamp(x, max=0)) - 1))
        ctx.save_for_backward(x, y)
        ctx.alpha = alpha
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, y = ctx.saved_tensors
        return torch.where(x > 0, grad_y, grad_y * (y + ctx.alpha)), None


@register_layer("ELU")
class ELU(CaffeLayer):
    """y = x if x > 0 else alpha*(exp(x) - 1); dx = dy if x > 0 else dy*(y + alpha)."""
    SAME_SHAPE = True

    def __init__(self, *, alpha=1.0):
        super().__init__()
        self.alpha = alpha

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls(alpha=_f32(layer_param.elu_param.alpha))

    def forward(self, x):
        return _ELUFunction.apply(x, self.alpha)

    def extra_repr(self):
        return _non_default(alpha=(self.alpha, 1.0))
