"""RNN (BVLC Caffe): a simple recurrent layer with a tanh hidden state and a tanh output."""
import torch

from ..layer import register_layer
from .recurrent import RecurrentLayer


@register_layer("RNN")
class RNN(RecurrentLayer):
    """h_t = tanh(W_hh (cont_t * h_{t-1}) + (W_xh x_t + b_h) [+ W_xh_static x_static]);
    the top is o_t = tanh(W_ho h_t + b_o), (T, N, H). With expose_hidden, bottom h0 and top hT
    (each (1, N, H)) are the hidden state h (not o).

    Blobs, Caffe order: W_xh (H, D), b_h (H), W_xh_static (H, Ds) with a static input, W_hh
    (H, H), W_ho (H, H), b_o (H); D = prod(x.shape[2:]), Ds = prod(x_static.shape[1:])."""
    STATES = ("h",)
    BOTTOMS = (2, 4)
    TOPS = (1, 2)
    CAFFE_BLOBS = ("W_xh", "b_h", "W_xh_static", "W_hh", "W_ho", "b_o")

    def blob_shapes(self):
        hidden = self.num_output
        return {"W_xh": (hidden, self.input_size), "b_h": (hidden,),
                "W_xh_static": None if self.static_size is None else (hidden, self.static_size),
                "W_hh": (hidden, hidden), "W_ho": (hidden, hidden), "b_o": (hidden,)}

    def unroll(self, x, cont, static, initial):
        (h,) = initial
        pre_of = self.recurrence(x, static, self.W_xh, self.b_h, self.W_xh_static, self.W_hh)
        hidden = []
        for t in range(x.shape[0]):
            h = torch.tanh(pre_of(t, h, cont[t]))
            hidden.append(h)
        output = torch.tanh(torch.nn.functional.linear(torch.stack(hidden), self.W_ho, self.b_o))
        return output, [h]
