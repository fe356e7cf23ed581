"""Where a training pass went non-finite: the first layer whose output, or whose diff, is NaN/inf.

The solver's normal path only looks at two things per pass: the loss (a float it has anyway) and
one sum per learnable blob's diff. When either is not finite, `locate` replays that pass once,
layer by layer, with an fx.Interpreter over the net's unfused graph:

- the data layers' tops are the ones the failed pass read (`DataCapture` keeps the last batch
  of every bottom-less layer with a forward hook), and torch's random state is the one the pass
  started from, so dropout and random fillers draw the same numbers;
- forward: after each layer, its tops are checked; the first layer in net order with a
  non-finite top is reported, with whether its bottoms and its learnable blobs are finite;
- backward: a hook on every top and learnable blob sees each diff as autograd computes it (from
  the loss down); the first non-finite one in that order names the layer whose backward
  produced it.

Parameters, buffers and diffs are put back afterwards, so a run that only warns goes on from the
state the failed pass left.
"""
import torch
from torch import fx


def all_finite(tensors):
    """Whether every floating-point tensor in `tensors` is finite: one sum per tensor (an
    infinity or NaN anywhere makes the sum non-finite), checked exactly only when a sum is not
    (a finite tensor whose sum overflows)."""
    tensors = [t for t in tensors if t is not None and t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    sums = torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def describe_values(tensor):
    """'3 NaN and 1 infinite of 24 values' for a non-finite tensor."""
    tensor = tensor.detach()
    nans = int(torch.isnan(tensor).sum())
    infs = int(torch.isinf(tensor).sum())
    counts = " and ".join(f"{n} {what}" for n, what in ((nans, "NaN"), (infs, "infinite")) if n)
    return f"{counts} of {tensor.numel()} values"


class DataCapture:
    """Keeps the last output of every bottom-less layer of a net (data layers, DummyData,
    Parameter) so that a pass can be replayed with the same data."""

    def __init__(self, net):
        self.outputs = {}
        self.handles = []
        for index, record in enumerate(net.records):
            if record.bottoms or record.module.NET_INPUT:
                continue
            self.handles.append(record.module.register_forward_hook(self._keeper(index)))

    def _keeper(self, index):
        def keep(module, inputs, output):
            self.outputs[index] = output
        return keep

    def close(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _Replay(fx.Interpreter):
    """Runs the unfused graph node by node, feeding data layers their captured tops, checking
    every layer's tops and hooking their diffs."""

    def __init__(self, net, graph_module, captured):
        super().__init__(graph_module)
        self.net, self.captured = net, captured
        self.first_output = None      # (record index, top name, tensor, note on the bottoms)
        self.diffs = []               # (record index, top name, values) of non-finite diffs, in order
        self.values = {}              # blob name -> its current tensor

    def run_node(self, node):
        index = node.meta.get("record") if node.op == "call_module" else None
        if index is not None and index in self.captured:
            result = self.captured[index]
        else:
            result = super().run_node(node)
        if node.op == "placeholder":
            self.values[node.meta.get("blob")] = result
        if index is None:
            return result
        record = self.net.records[index]
        tops = [result] if isinstance(result, torch.Tensor) else list(result)
        for name, top in zip(record.tops, tops):
            if not isinstance(top, torch.Tensor) or not top.is_floating_point():
                continue
            if self.first_output is None and not all_finite([top]):
                self.first_output = (index, name, top, self._bottom_note(record))
            if top.requires_grad:
                top.register_hook(self._diff_hook(index, name))
        self.values.update(zip(record.tops, tops))
        return result

    def _bottom_note(self, record):
        """'; its bottoms are finite', or which bottoms are not (a fed input can be the cause)."""
        present = [b for b in record.bottoms if isinstance(self.values.get(b), torch.Tensor)]
        if not present:
            return ""
        bad = [b for b in present if not all_finite([self.values[b]])]
        if bad:
            return f"; its bottom(s) {', '.join(repr(b) for b in bad)} are not finite either"
        return "; its bottoms are finite"

    def _diff_hook(self, index, name):
        def check(grad):
            if not all_finite([grad]):
                self.diffs.append((index, name, describe_values(grad)))
        return check


def _label(record):
    return f"{record.name} ({record.type})"


def _blob_notes(record):
    bad = [i for i, blob in enumerate(record.module.caffe_blobs()) if not all_finite([blob])]
    return f"; its learnable blob(s) {', '.join(map(str, bad))} hold non-finite values" if bad \
        else ""


def locate(net, feed, outputs, captured, rng_state, backward=True):
    """Replay one pass of `net` (inputs `feed`, the tops of `captured` data layers, torch's random
    state `rng_state`) and say where it went non-finite: a sentence naming the first layer whose
    output (or, when every output is finite, whose diff) is not finite, or None when the replay
    finds nothing (the values were not reproduced)."""
    params = list(net.parameters())
    saved_values = [t.detach().clone() for t in params + list(net.buffers())]
    saved_grads = [p.grad for p in params]
    hooks, param_diffs = [], []
    for record in net.records:
        for i, blob in enumerate(record.module.caffe_blobs()):
            if blob.requires_grad:
                def check(grad, record=record, i=i):
                    if not all_finite([grad]):
                        param_diffs.append((record, i, describe_values(grad)))
                hooks.append(blob.register_hook(check))
    rng_now = torch.random.get_rng_state()
    try:
        for p in params:
            p.grad = None
        if rng_state is not None:
            torch.random.set_rng_state(rng_state)
        replay = _Replay(net, net.graph_module(outputs, fuse=False), captured)
        with torch.enable_grad():
            out = replay.run(*net.feed(feed))
            if replay.first_output is not None:
                index, name, top, note = replay.first_output
                record = net.records[index]
                return (f"the first layer (in net order) whose output is not finite is "
                        f"{_label(record)}: top {name!r} holds {describe_values(top)}"
                        f"{note}{_blob_notes(record)}")
            if not backward:
                return None
            total = net.loss(out)
            if total is None or not total.requires_grad:
                return None
            if not all_finite([total]):
                return "every layer's output is finite but the weighted sum of the loss tops is not"
            total.backward()
        if replay.diffs:
            index, name, what = replay.diffs[0]
            writer = net.records[index]
            readers = [r for r in net.records[index + 1:] if name in r.bottoms]
            by = f", computed by the backward of {_label(readers[-1])}" if readers else ""
            return (f"every output is finite; the first diff (in backward order) that is not is "
                    f"that of top {name!r} of {_label(writer)}{by}: {what}")
        if param_diffs:
            record, i, what = param_diffs[0]
            return (f"every output is finite; the first diff (in backward order) that is not is "
                    f"that of learnable blob {i} of {_label(record)}: {what}")
        return None
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            # only what the replay changed (batch statistics): a write to an unchanged parameter
            # would invalidate the failed pass's own autograd graph, which a warning run goes on with
            for t, value in zip(params + list(net.buffers()), saved_values):
                if not torch.equal(t, value):
                    t.copy_(value)
        for p, grad in zip(params, saved_grads):
            p.grad = grad
        torch.random.set_rng_state(rng_now)

