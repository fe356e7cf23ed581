"""LSTMUnit (BVLC Caffe): one LSTM time step, the cell of the unrolled LSTM layer."""
import torch

from ..layer import CaffeLayer, register_layer


def lstm_step(c_prev, gates, cont):
    """(c, h) of one step for N streams: c_prev (..., N, H), gates (..., N, 4H) laid out as
    [i, f, o, g] pre-activations, cont (..., N) the continuation indicators.

    i, f, o = sigmoid, g = tanh; c = cont * f * c_prev + i * g; h = o * tanh(c). A stream with
    cont 0 starts afresh (its forget gate is cut). Autograd gives the original's GPU backward
    (the true derivative, also for cont values other than 0 and 1)."""
    hidden = c_prev.shape[-1]
    i, f, o = torch.sigmoid(gates[..., :3 * hidden]).split(hidden, dim=-1)
    g = torch.tanh(gates[..., 3 * hidden:])
    c = cont.unsqueeze(-1) * f * c_prev + i * g
    return c, o * torch.tanh(c)


@register_layer("LSTMUnit")
class LSTMUnit(CaffeLayer):
    """Bottoms c_prev (1, N, H), gate inputs (1, N, 4H) in the order i, f, o, g, cont (1, N);
    tops c (1, N, H) and h (1, N, H) (see lstm_step). The original cannot backpropagate into
    the continuation indicators."""
    BOTTOMS = (3, 3)
    TOPS = (2, 2)
    NO_GRAD_BOTTOMS = (2,)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        c_prev, gates, cont = (tuple(s) for s in ctx.bottom_shapes)
        names = ctx.bottom_names
        for name, shape, axes in ((names[0], c_prev, 3), (names[1], gates, 3), (names[2], cont, 2)):
            if len(shape) != axes or shape[0] != 1:
                raise ctx.error(f"bottom {name!r} must have {axes} axes with a first axis of 1 "
                                f"(one time step), got {shape}")
        if not c_prev[1] == gates[1] == cont[1]:
            raise ctx.error(f"the bottoms must agree on the number of streams (axis 1): got "
                            f"{c_prev}, {gates} and {cont}")
        if gates[2] != 4 * c_prev[2]:
            raise ctx.error(f"bottom {names[1]!r} must hold 4 gates of the cell size "
                            f"{c_prev[2]}: axis 2 of {gates} should be {4 * c_prev[2]}")
        return cls()

    def forward(self, c_prev, gates, cont):
        return lstm_step(c_prev, gates, cont.to(c_prev.dtype))
