"""segaware-caffe time --model M [--iterations N] [--weights W] [--phase train|test]: `caffe time`
on PyTorch: the average forward and backward time of every layer, then of the whole net.

Like caffe, each layer runs on its own, in net order, timed around its forward and (in reverse
order) its backward, so the figures add up to the forward-backward pass. The net is built
unfused (one Caffe layer = one timed step). Net inputs are fed with --input BLOB=FILE.npy, or
zeros of the declared shapes. On CUDA the device is synchronised around every timed call.
"""
import logging
import sys
import time

import torch
from torch import fx

from segaware_caffe.solvers.glog import glog_to
from segaware_caffe.tools.cmd_test import Clock, add_net_run_arguments, feed_from_args, net_from_args

log = logging.getLogger("segaware_caffe.cli")


def add_arguments(parser):
    add_net_run_arguments(parser, phase="train", iterations_help="timed forward-backward passes",
                          input_help="array fed to a net input (default: zeros of the declared "
                                     "shape)")


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


def run(args):
    with glog_to(sys.stderr):
        net, device = net_from_args(args, fuse=False)
        feed = feed_from_args(net, args.input, device, zeros_for_missing=True)
        timer = LayerTimer(net, device)
        log.info("Performing Forward")
        timer.forward_backward(feed)          # warm-up (not counted), like caffe's initial pass
        timer = LayerTimer(net, device)
        log.info("*** Benchmark begins ***")
        log.info(f"Testing for {args.iterations} iterations.")
        forward_total = backward_total = 0.0
        start = time.perf_counter()
        clock, n = Clock(args.max_seconds), 0
        for i in range(args.iterations):
            if i and clock.expired():
                log.info(clock.note(i, args.iterations))
                break
            n = i + 1
            forward, backward = timer.forward_backward(feed)
            forward_total, backward_total = forward_total + forward, backward_total + backward
            log.info(f"Iteration: {i + 1} forward-backward time: {forward + backward:.3f} ms.")
        total = (time.perf_counter() - start) * 1e3
        log.info("Average time per layer: ")
        width = max((len(r.name) for r in timer.records), default=0)
        for r in timer.records:
            log.info(f"{r.name:>{width}}\tforward: {timer.forward_ms[id(r)] / n:.5g} ms.")
            log.info(f"{r.name:>{width}}\tbackward: {timer.backward_ms[id(r)] / n:.5g} ms.")
        log.info(f"Average Forward pass: {forward_total / n:.5g} ms.")
        log.info(f"Average Backward pass: {backward_total / n:.5g} ms.")
        log.info(f"Average Forward-Backward: {(forward_total + backward_total) / n:.5g} ms.")
        log.info(f"Total Time: {total:.5g} ms.")
        log.info("*** Benchmark ends ***")
    return 0
