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

from segaware_caffe.net import Net
from segaware_caffe.solvers.glog import glog_to
from segaware_caffe.tools.common import UsageError, device_from_args, parse_variables
from segaware_caffe.tools.cmd_test import add_net_run_arguments, feed_from_args

log = logging.getLogger("segaware_caffe.cli")


def add_arguments(parser):
    add_net_run_arguments(parser, phase="train", iterations_help="timed forward-backward passes",
                          input_help="array fed to a net input (default: zeros of the declared "
                                     "shape)")


class LayerTimer:
    """Runs a Net one Caffe layer at a time, timing each layer's forward and backward."""

    def __init__(self, net, device):
        self.net, self.device = net, device
        self.records = [r for r in net.records if r.type != "Input"]
        self.forward_ms = {r.name: 0.0 for r in self.records}
        self.backward_ms = {r.name: 0.0 for r in self.records}

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def forward_backward(self, feed):
        """One pass; returns (forward ms, backward ms)."""
        blobs = dict(feed)
        steps = []        # (record, leaf bottoms, their source tensors, tops)
        start = self._now()
        for r in self.records:
            sources = [blobs[b] for b in r.bottoms]
            # a bottom gets a diff only when it depends on learnable blobs (as Caffe decides)
            leaves = [s.detach().requires_grad_(s.requires_grad) for s in sources]
            t0 = self._now()
            tops = r.module(*leaves)
            self.forward_ms[r.name] += (self._now() - t0) * 1e3
            tops = (tops,) if isinstance(tops, torch.Tensor) else tuple(tops)
            for i, (name, top) in enumerate(zip(r.tops, tops)):
                blobs[name] = top
                split = self.net.loss_splits.get((r.name, i))
                if split is not None:   # the loss Split of a top other layers also read
                    blobs[split] = top
            steps.append((r, leaves, sources, tops))
        forward = (self._now() - start) * 1e3
        grads = {}        # id(tensor) -> accumulated diff
        for name, weight in self.net.loss_weights.items():
            top = blobs[name]
            grads[id(top)] = torch.full_like(top, weight)
        start = self._now()
        for r, leaves, sources, tops in reversed(steps):
            live = [(t, grads.pop(id(t))) for t in tops if id(t) in grads and t.requires_grad]
            wrt = [x for x in leaves if x.requires_grad] + \
                  [p for p in r.module.caffe_blobs() if p.requires_grad]
            if not live or not wrt:
                continue
            t0 = self._now()
            diffs = torch.autograd.grad([t for t, _ in live], wrt, [g for _, g in live],
                                        allow_unused=True)
            self.backward_ms[r.name] += (self._now() - t0) * 1e3
            for leaf, source, diff in zip(leaves, sources, diffs):
                if diff is not None and leaf.requires_grad:
                    key = id(source)
                    grads[key] = diff if key not in grads else grads[key] + diff
        return forward, (self._now() - start) * 1e3


def run(args):
    if args.iterations <= 0:
        raise UsageError(f"--iterations must be > 0, got {args.iterations}")
    variables = parse_variables(args.set, args.vars)
    device = torch.device(device_from_args(args) or "cpu")
    with glog_to(sys.stderr):
        net = Net(args.model, weights=args.weights, phase=args.phase, variables=variables,
                  device=device, stages=tuple(args.stage), level=args.level, fuse=False)
        feed = feed_from_args(net, args.input, device, zeros_for_missing=True)
        timer = LayerTimer(net, device)
        log.info("Performing Forward")
        timer.forward_backward(feed)          # warm-up (not counted), like caffe's initial pass
        timer = LayerTimer(net, device)
        log.info("*** Benchmark begins ***")
        log.info(f"Testing for {args.iterations} iterations.")
        forward_total = backward_total = 0.0
        start = time.perf_counter()
        for i in range(args.iterations):
            forward, backward = timer.forward_backward(feed)
            forward_total, backward_total = forward_total + forward, backward_total + backward
            log.info(f"Iteration: {i + 1} forward-backward time: {forward + backward:.3f} ms.")
        total = (time.perf_counter() - start) * 1e3
        log.info("Average time per layer: ")
        width = max((len(r.name) for r in timer.records), default=0)
        for r in timer.records:
            log.info(f"{r.name:>{width}}\tforward: {timer.forward_ms[r.name] / args.iterations:.5g} ms.")
            log.info(f"{r.name:>{width}}\tbackward: {timer.backward_ms[r.name] / args.iterations:.5g} ms.")
        n = args.iterations
        log.info(f"Average Forward pass: {forward_total / n:.5g} ms.")
        log.info(f"Average Backward pass: {backward_total / n:.5g} ms.")
        log.info(f"Average Forward-Backward: {(forward_total + backward_total) / n:.5g} ms.")
        log.info(f"Total Time: {total:.5g} ms.")
        log.info("*** Benchmark ends ***")
    return 0
