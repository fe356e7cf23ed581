"""segaware-caffe test --model M --weights W [--iterations N]: `caffe test` on PyTorch.

Runs N forward passes of the net in the TEST phase (data layers read their next batch each
time; nets with Input layers are fed the same --input BLOB=FILE.npy arrays every pass) and logs,
like caffe, every output element per batch ("Batch 3, accuracy = 0.75"), the mean loss
("Loss: 0.69") and the mean of every output ("accuracy = 0.7", "loss = 0.69 (* 1 = 0.69 loss)").
"""
import logging
import sys
import time

import numpy as np
import torch

from segaware_caffe.net import Net
from segaware_caffe.solvers.glog import fmt, glog_to, loss_note
from segaware_caffe.data.arrays import read_npy
from segaware_caffe.tools.common import (UsageError, add_device_arguments, add_max_seconds_argument,
                                         add_variable_arguments, check_iterations, device_from_args,
                                         int32, parse_variables)

log = logging.getLogger("segaware_caffe.cli")


def add_net_run_arguments(parser, *, phase, iterations_help, input_help):
    """Options shared by `test` and `time`: the net, its weights, state, inputs and device."""
    parser.add_argument("--model", required=True, help="net .prototxt")
    parser.add_argument("--weights", metavar="W", help=".caffemodel with the learned parameters")
    parser.add_argument("--iterations", type=int, default=50, metavar="N",
                        help=f"{iterations_help} (default 50)")
    parser.add_argument("--phase", choices=("train", "test"), default=phase,
                        help=f"net phase (default {phase}, like caffe)")
    parser.add_argument("--stage", action="append", default=[], help="net stage (repeatable)")
    parser.add_argument("--level", type=int32, default=0, help="net level")
    parser.add_argument("--input", action="append", default=[], metavar="BLOB=FILE.npy",
                        help=input_help)
    add_variable_arguments(parser)
    add_device_arguments(parser)
    add_max_seconds_argument(parser, "checked between passes; the figures then cover the "
                                     "passes run")


class Clock:
    """--max-seconds between passes: `expired()` once the time is up (never without it)."""

    def __init__(self, max_seconds):
        self.max_seconds = max_seconds
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds

    def expired(self):
        return self.deadline is not None and time.monotonic() > self.deadline

    def note(self, done, planned):
        return (f"Stopped after {self.max_seconds:g} s (--max-seconds): {done} of {planned} "
                f"iterations run")


def add_arguments(parser):
    add_net_run_arguments(parser, phase="test", iterations_help="number of batches",
                          input_help="array fed to a net input on every pass (nets with Input "
                                     "layers)")


def feed_from_args(net, items, device, zeros_for_missing=False):
    """{input blob: tensor} from --input BLOB=FILE.npy items; every net input must be given
    (or, with zeros_for_missing, gets zeros of its declared shape)."""
    feed = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--input expects BLOB=FILE.npy, got {item!r}")
        if name not in net.input_names:
            raise UsageError(f"--input {name}: the net has no input {name!r} "
                             f"(inputs: {', '.join(net.input_names) or 'none'})")
        feed[name] = torch.from_numpy(read_npy(path)).to(device)
    for name in net.input_names:
        if name not in feed:
            if not zeros_for_missing:
                raise UsageError(f"the net has input {name!r}: give it with --input {name}=FILE.npy "
                                 f"(inputs: {', '.join(net.input_names)})")
            feed[name] = torch.zeros(net.input_shapes[name], device=device)
    return feed


def net_from_args(args, *, fuse=True):
    """(Net, device) for the options of add_net_run_arguments."""
    check_iterations(args.iterations)
    device = torch.device(device_from_args(args) or "cpu")
    net = Net(args.model, weights=args.weights, phase=args.phase,
              variables=parse_variables(args.set, args.vars), device=device,
              stages=tuple(args.stage), level=args.level, fuse=fuse)
    return net, device


def run(args):
    with glog_to(sys.stderr):
        net, device = net_from_args(args)
        feed = feed_from_args(net, args.input, device)
        outputs = sorted(set(net.outputs) | set(net.loss_weights))
        log.info(f"Running for {args.iterations} iterations.")
        totals, loss, done = {}, 0.0, 0
        clock = Clock(args.max_seconds)
        with torch.no_grad():
            for i in range(args.iterations):
                if i and clock.expired():
                    log.info(clock.note(i, args.iterations))
                    break
                done = i + 1
                out = net.forward(outputs=outputs, **feed)
                total = net.loss(out)
                loss += float(total) if total is not None else 0.0
                for name in net.outputs:
                    values = out[name].detach().to(torch.float64).reshape(-1).cpu()
                    totals[name] = values if name not in totals else totals[name] + values
                    for value in values.tolist():
                        log.info(f"Batch {i}, {name} = {fmt(value)}")
        log.info(f"Loss: {fmt(loss / done)}")
        for name in net.outputs:
            weight = net.loss_weights.get(name, 0.0)
            for value in (totals[name] / done).tolist():
                log.info(f"{name} = {fmt(value)}{loss_note(weight, value)}")
    return 0
