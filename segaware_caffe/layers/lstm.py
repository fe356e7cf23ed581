"""LSTM (BVLC Caffe): a long short-term memory layer over T time steps of N streams."""
import torch

from ..layer import register_layer
from .lstm_unit import lstm_step
from .recurrent import RecurrentLayer


@register_layer("LSTM")
class LSTM(RecurrentLayer):
    """gates_t = W_hc (cont_t * h_{t-1}) + (W_xc x_t + b_c) [+ W_xc_static x_static], laid out
    [i, f, o, g] (4H rows); c_t, h_t = LSTMUnit(c_{t-1}, gates_t, cont_t) (see lstm_step). The top
    is h (T, N, H); with expose_hidden, bottoms h0, c0 and tops hT, cT (each (1, N, H)).

    Blobs, Caffe order: W_xc (4H, D), b_c (4H), W_xc_static (4H, Ds) with a static input, W_hc
    (4H, H); D = prod(x.shape[2:]), Ds = prod(x_static.shape[1:])."""
    STATES = ("h", "c")
    BOTTOMS = (2, 5)
    TOPS = (1, 3)
    CAFFE_BLOBS = ("W_xc", "b_c", "W_xc_static", "W_hc")

    def blob_shapes(self):
        rows = 4 * self.num_output
        return {"W_xc": (rows, self.input_size), "b_c": (rows,),
                "W_xc_static": None if self.static_size is None else (rows, self.static_size),
                "W_hc": (rows, self.num_output)}

    def unroll(self, x, cont, static, initial):
        h, c = initial
        gates_of = self.recurrence(x, static, self.W_xc, self.b_c, self.W_xc_static, self.W_hc)
        outputs = []
        for t in range(x.shape[0]):
            c, h = lstm_step(c, gates_of(t, h, cont[t]), cont[t])          # gates (N, 4H)
            outputs.append(h)
        return torch.stack(outputs), [h, c]
