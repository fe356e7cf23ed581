"""BVLC Caffe's recurrent layers (RNN, LSTM): what they share.

BVLC builds these as an unrolled inner net, one set of layers per time step, whose learnable
blobs become the layer's blobs in the order the inner net first uses them. Here the same
computation is written directly: one matrix product for the input of all time steps, then a
loop over time, vectorised over streams and gates.

Caffe behaviour kept:
- bottoms x (T, N, ...), cont (T, N), optional static input x_static (N, ...), then with
  expose_hidden the initial states (1, N, H) (h0, and c0 for the LSTM); tops the output
  (T, N, H), then with expose_hidden the final states (1, N, H).
- h_{t-1} is multiplied by cont_t before it enters step t (cont_t = 0 starts a new sequence).
- without expose_hidden the layer keeps state across forwards: each forward starts from the
  final states of the previous one (zero at first, or after reset()). The states live in one
  growing buffer, as in Caffe's blob memory: a forward with fewer streams starts from the first
  values of that buffer, one needing more memory than it has starts from zero.
- gradients do not cross forwards, nor flow through exposed states: Caffe shares only the data
  of the h0/c0 bottoms and hT/cT tops with the inner net, so h0/c0 get no gradient and the
  diffs of hT/cT are dropped. The continuation indicators cannot be backpropagated into.
- recurrent_param.debug_info (the inner net's debug log) has no effect.

Not kept: BVLC fixes the number of time steps when the layer is set up and aborts if a later
forward brings another; here any T runs (the blobs do not depend on it).
"""
import math
from typing import ClassVar

import torch

from ..fillers import fill
from ..layer import CaffeLayer
from .convolution import optional_filler


def _is_fake(tensor):
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(tensor, FakeTensor)


class RecurrentLayer(CaffeLayer):
    """Base of RNN and LSTM (BVLC's abstract RecurrentLayer; not a layer type of its own).

    Subclasses set STATES (names of the recurrent states, in Caffe's bottom/top order),
    CAFFE_BLOBS, BOTTOMS/TOPS (the widest counts; from_proto checks the exact ones) and implement
    `blob_shapes` and `unroll`."""
    STATES: ClassVar[tuple] = ()
    NO_GRAD_BOTTOMS = (1,)

    def __init__(self, *, num_output, input_size, static_size=None, expose_hidden=False,
                 where="Recurrent"):
        super().__init__()
        self.num_output = int(num_output)
        self.input_size = int(input_size)
        self.static_size = None if static_size is None else int(static_size)
        self.expose_hidden = bool(expose_hidden)
        self.where = where
        for name, shape in self.blob_shapes().items():
            self.register_parameter(name, None if shape is None else self.new_parameter(shape, name))
        for state in self.STATES:
            self.register_buffer(f"carried_{state}", torch.zeros(0), persistent=False)
        if not self.expose_hidden:
            self.HAS_SIDE_EFFECTS = True   # the final states carry over to the next forward

    def blob_shapes(self):
        """{blob attribute: shape, or None where the variant has no such blob}, Caffe order."""
        raise NotImplementedError

    @property
    def has_static_input(self):
        return self.static_size is not None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.recurrent_param
        if p.num_output <= 0:
            raise ctx.error(f"recurrent_param.num_output is required and must be > 0, got "
                            f"{p.num_output}")
        expose = bool(p.expose_hidden)
        shapes = [tuple(s) for s in ctx.bottom_shapes]
        names = ctx.bottom_names
        n_states = len(cls.STATES)
        fixed = 2 + (n_states if expose else 0)
        state_list = " and ".join(f"{s}0" for s in cls.STATES)
        if len(shapes) not in (fixed, fixed + 1):
            wants = (f"x, cont, an optional x_static and the initial states {state_list} "
                     f"(expose_hidden is true)" if expose else
                     "x, cont and an optional x_static (expose_hidden is false)")
            raise ctx.error(f"takes {fixed} or {fixed + 1} bottoms ({wants}), got {len(shapes)}")
        top_count = 1 + (n_states if expose else 0)
        if len(ctx.top_names) != top_count:
            wants = (f"the output and the final states {' and '.join(f'{s}T' for s in cls.STATES)}"
                     if expose else "the output only; expose_hidden: true adds the final states")
            raise ctx.error(f"takes {top_count} top(s) ({wants}), got {len(ctx.top_names)}")
        x, cont = shapes[0], shapes[1]
        if len(x) < 2:
            raise ctx.error(f"bottom {names[0]!r} must have at least 2 axes (time steps, streams, "
                            f"...), got {x}")
        steps, streams = x[0], x[1]
        if cont != (steps, streams):
            raise ctx.error(f"bottom {names[1]!r} (the continuation indicators) must have shape "
                            f"(T, N) = {(steps, streams)} to match {names[0]!r} {x}, got {cont}")
        static_size = None
        if len(shapes) == fixed + 1:
            static = shapes[2]
            if len(static) < 1 or static[0] != streams:
                raise ctx.error(f"bottom {names[2]!r} (the static input) must have the {streams} "
                                f"streams of {names[0]!r} on its first axis, got {static}")
            static_size = math.prod(static[1:])
        hidden = int(p.num_output)
        if expose:
            first = 3 if static_size is not None else 2
            for state, name, shape in zip(cls.STATES, names[first:], shapes[first:]):
                if shape != (1, streams, hidden):
                    raise ctx.error(f"bottom {name!r} (the initial state {state}0) must have "
                                    f"shape (1, N, num_output) = {(1, streams, hidden)}, got {shape}")
        layer = cls(num_output=hidden, input_size=math.prod(x[2:]), static_size=static_size,
                    expose_hidden=expose, where=f"{ctx.name} ({ctx.type})")
        weight_filler = optional_filler(p, "weight_filler")
        bias_filler = optional_filler(p, "bias_filler")
        with torch.no_grad():
            for name in layer.CAFFE_BLOBS:
                blob = getattr(layer, name)
                if blob is not None:
                    filler = bias_filler if name.startswith("b_") else weight_filler
                    blob.copy_(fill(filler, blob.shape, ctx))
        return layer

    def output_shapes(self, bottom_shapes):
        steps, streams = bottom_shapes[0][:2]
        state = (1, streams, self.num_output)
        return [(steps, streams, self.num_output)] + ([state] * len(self.STATES) if self.expose_hidden else [])

    # ------------------------------------------------------------------ running
    def forward(self, x, cont, *rest):
        steps, streams = x.shape[:2]
        self._check_runtime(x, cont, rest)
        static = rest[0].reshape(streams, -1) if self.has_static_input else None
        if self.expose_hidden:
            exposed = rest[1:] if self.has_static_input else rest
            initial = [s.detach().reshape(streams, self.num_output) for s in exposed]
        else:
            initial = self._carried_states(streams, x)
        output, final = self.unroll(x.reshape(steps, streams, -1), cont.to(x.dtype), static, initial)
        if not self.expose_hidden:
            if not _is_fake(x):
                self._carry(final)
            return output
        return (output, *[s.detach().unsqueeze(0) for s in final])

    def unroll(self, x, cont, static, initial):
        """(output (T, N, H), [final states (N, H)]) from x (T, N, D), cont (T, N), the flat static
        input (N, Ds) or None, and the initial states [(N, H)]."""
        raise NotImplementedError

    @staticmethod
    def recurrence(x, static, w_x, b_x, w_static, w_h):
        """step(t, h, cont_t) = (cont_t * h) W_h^T + (x_t W_x^T + b_x) [+ static W_static^T], the
        pre-activation of step t, summed in that order; the input and static products are taken
        once for all steps."""
        inputs = torch.nn.functional.linear(x, w_x, b_x)
        static_term = None if static is None else static @ w_static.t()

        def step(t, h, cont_t):
            pre = (cont_t.unsqueeze(-1) * h) @ w_h.t() + inputs[t]
            return pre if static_term is None else pre + static_term
        return step

    def _check_runtime(self, x, cont, rest):
        if x.dim() < 2 or math.prod(x.shape[2:]) != self.input_size:
            raise ValueError(f"{self.where}: bottom x must be (T, N, ...) with {self.input_size} "
                             f"values per stream and step, got shape {tuple(x.shape)}")
        if tuple(cont.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{self.where}: cont must have shape (T, N) = {tuple(x.shape[:2])}, "
                             f"got {tuple(cont.shape)}")
        if self.has_static_input:
            static = rest[0]
            if static.dim() < 1 or static.shape[0] != x.shape[1] or \
                    math.prod(static.shape[1:]) != self.static_size:
                raise ValueError(f"{self.where}: x_static must have the {x.shape[1]} streams on its "
                                 f"first axis and {self.static_size} values each, got shape "
                                 f"{tuple(static.shape)}")
        if self.expose_hidden:
            want = (1, x.shape[1], self.num_output)
            for state, s in zip(self.STATES, rest[1:] if self.has_static_input else rest):
                if tuple(s.shape) != want:
                    raise ValueError(f"{self.where}: the initial state {state}0 must have shape "
                                     f"{want}, got {tuple(s.shape)}")

    def _carried_states(self, streams, like):
        count = streams * self.num_output
        states = []
        for name in self.STATES:
            buffer = getattr(self, f"carried_{name}")
            if buffer.numel() < count:
                states.append(like.new_zeros(streams, self.num_output))
            else:
                states.append(buffer[:count].to(like).reshape(streams, self.num_output).clone())
        return states

    def _carry(self, final):
        with torch.no_grad():
            for name, state in zip(self.STATES, final):
                values = state.detach().reshape(-1)
                buffer = getattr(self, f"carried_{name}")
                if buffer.numel() < values.numel():
                    buffer = values.new_zeros(values.numel())   # Caffe's blob grows: fresh memory
                else:
                    buffer = buffer.to(values).clone()
                buffer[:values.numel()] = values
                setattr(self, f"carried_{name}", buffer)

    def reset(self):
        """Forget the carried states (Caffe's RecurrentLayer::Reset): the next forward starts from
        zero states."""
        for name in self.STATES:
            getattr(self, f"carried_{name}").zero_()

    def extra_repr(self):
        parts = [f"num_output={self.num_output}", f"input_size={self.input_size}"]
        if self.has_static_input:
            parts.append(f"static_size={self.static_size}")
        if self.expose_hidden:
            parts.append("expose_hidden=True")
        return ", ".join(parts)
