"""Eltwise: elementwise PROD / SUM (with coefficients) / MAX over bottoms of one shape."""
import torch

from ..layer import CaffeLayer, register_layer

_OPERATIONS = {0: "PROD", 1: "SUM", 2: "MAX"}  # EltwiseParameter.EltwiseOp


class _ProdQuotientGrad(torch.autograd.Function):
    """Product whose backward is dx_i = dy * y / x_i (stable_prod_grad: false; NaN where x_i = 0)."""

    @staticmethod
    def forward(ctx, *bottoms):
        y = bottoms[0] * bottoms[1]
        for x in bottoms[2:]:
            y = y * x
        ctx.save_for_backward(y, *bottoms)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, *bottoms = ctx.saved_tensors
        return tuple(grad_y * (y / x) if needed else None
                     for x, needed in zip(bottoms, ctx.needs_input_grad))


@register_layer("Eltwise")
class Eltwise(CaffeLayer):
    """PROD: y = prod x_i (backward dy * product of the others, or dy*y/x_i when
    stable_prod_grad is false); SUM: y = sum coeff_i * x_i; MAX: y = max x_i with the whole
    gradient routed to the winning bottom (a tie goes to the later bottom, as on the GPU)."""
    SAME_SHAPE = True
    BOTTOMS = (2, None)

    def __init__(self, *, operation="SUM", coeffs=None, stable_prod_grad=True):
        super().__init__()
        self.operation = operation
        self.coeffs = tuple(coeffs) if coeffs is not None else None
        self.stable_prod_grad = stable_prod_grad

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.eltwise_param
        operation = _OPERATIONS[p.operation]
        coeffs = None
        if len(p.coeff):
            if operation != "SUM":
                raise ctx.error(f"eltwise_param.coeff is only allowed with operation SUM, "
                                f"got operation {operation} with {len(p.coeff)} coeff values")
            if len(p.coeff) != len(ctx.bottom_names):
                raise ctx.error(f"eltwise_param.coeff needs one value per bottom: got "
                                f"{len(p.coeff)} values for {len(ctx.bottom_names)} bottoms")
            coeffs = [float(c) for c in p.coeff]
        shapes = ctx.bottom_shapes
        for name, shape in zip(ctx.bottom_names[1:], shapes[1:]):
            if tuple(shape) != tuple(shapes[0]):
                raise ctx.error(f"all bottoms must have the same shape: bottom {name!r} has "
                                f"{tuple(shape)}, bottom {ctx.bottom_names[0]!r} has {tuple(shapes[0])}")
        return cls(operation=operation, coeffs=coeffs, stable_prod_grad=bool(p.stable_prod_grad))

    def forward(self, *bottoms):
        if self.operation == "PROD":
            if not self.stable_prod_grad:
                return _ProdQuotientGrad.apply(*bottoms)
            y = bottoms[0] * bottoms[1]
            for x in bottoms[2:]:
                y = y * x
            return y
        if self.operation == "SUM":
            coeffs = self.coeffs or (1.0,) * len(bottoms)
            y = bottoms[0] * coeffs[0] if coeffs[0] != 1 else bottoms[0]
            for x, c in zip(bottoms[1:], coeffs[1:]):
                y = y + (x * c if c != 1 else x)
            return y
        # MAX: torch.where routes each element's gradient to exactly one bottom
        y = bottoms[0]
        for x in bottoms[1:]:
            y = torch.where(x >= y, x, y)
        return y

    def extra_repr(self):
        parts = [f"operation={self.operation}"]
        if self.coeffs is not None:
            parts.append(f"coeffs={self.coeffs}")
        if not self.stable_prod_grad:
            parts.append("stable_prod_grad=False")
        return ", ".join(parts)
