"""LayerTimer: a net's fx graph run node by node, each layer's forward and backward timed on its
own (what `segaware-caffe time` reports)."""
import time

import torch
from torch import fx


class LayerTimer(fx.Interpreter):
    """Runs a Net's graph (unfused) node by node, timing each layer's forward and backward.

    Every node gets its inputs as fresh autograd leaves, so one node's backward can be timed on
    its own; the graph's helper nodes (propagate_down cuts, refusals, the element-0 zeroing, split
    tops) run as in Net.forward, untimed, so the gradients are those the net computes."""

    def __init__(self, net, device):
        self.net, self.device = net, device
        outputs = sorted(set(net.outputs) | set(net.loss_weights))
        super().__init__(net.graph_module(outputs, fuse=False))
        self.records = [r for r in net.records if not r.module.NET_INPUT]
        self.forward_ms = {id(r): 0.0 for r in self.records}
        self.backward_ms = {id(r): 0.0 for r in self.records}
        self._steps = []

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def run_node(self, node):
        if node.op in ("placeholder", "output", "get_attr"):
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        sources, leaves = [], []

        def leaf(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                sources.append(value)
                leaves.append(value.detach().requires_grad_(value.requires_grad))
                return leaves[-1]
            return value
        args = fx.node.map_aggregate(args, leaf)
        record = self._record(node)
        start = self._now()
        result = getattr(self, node.op)(node.target, args, kwargs)
        if record is not None:
            self.forward_ms[id(record)] += (self._now() - start) * 1e3
        self._steps.append((record, leaves, sources, list(_tensors(result))))
        return result

    def _record(self, node):
        index = node.meta.get("record")
        return self.net.records[index] if node.op == "call_module" and index is not None else None

    def forward_backward(self, feed):
        """One pass; returns (forward ms, backward ms)."""
        self._steps = []
        start = self._now()
        out = self.run(*self.net.feed(feed))
        forward = (self._now() - start) * 1e3
        grads = {}        # id(tensor) -> accumulated diff
        for name, weight in self.net.loss_weights.items():
            grads[id(out[name])] = torch.full_like(out[name], weight)
        start = self._now()
        for record, leaves, sources, tops in reversed(self._steps):
            live = [(t, grads.pop(id(t))) for t in tops if id(t) in grads and t.requires_grad]
            if not live:
                continue
            t0 = self._now()
            # the node's whole backward (its inputs are leaves, so it stops there): diffs land in
            # the leaves' .grad and accumulate in the parameters' .grad, as Caffe's Backward
            torch.autograd.backward([t for t, _ in live], [g for _, g in live])
            if record is not None:
                self.backward_ms[id(record)] += (self._now() - t0) * 1e3
            for x, source in zip(leaves, sources):
                if x.grad is not None:
                    key = id(source)
                    grads[key] = x.grad if key not in grads else grads[key] + x.grad
        return forward, (self._now() - start) * 1e3


def _tensors(value):
    """The tensors in a node's (possibly nested) arguments or result, in order."""
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, torch.Tensor) else v)
    return found
