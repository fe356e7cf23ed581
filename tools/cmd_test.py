"""segaware-caffe test --model M --weights W [--iterations N]: `caffe test` on PyTorch.

Runs N forward passes of the net in the TEST phase (data layers read their next batch each
time; nets with Input layers are fed the same --input BLOB=FILE.npy arrays every pass) and logs,
like caffe, every output element per batch ("Batch 3, accuracy = 0.75"), the mean loss
("Loss: 0.69") and the mean of every output ("accuracy = 0.7", "loss = 0.69 (* 1 = 0.69 loss)").
"""
import logging
import sys

from segaware_caffe.tools.common import (UsageError, add_device_arguments, add_variable_arguments,
                                         device_from_args, int32, parse_variables)

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


def add_arguments(parser):
    add_net_run_arguments(parser, phase="test", iterations_help="number of batches",
                          input_help="array fed to a net input on every pass (nets with Input "
                                     "layers)")


def feed_from_args(net, items, device, zeros_for_missing=False):
    """{input blob: tensor} from --input BLOB=FILE.npy items; every net input must be given
    (or, with zeros_for_missing, gets zeros of its declared shape)."""
    import torch
    from segaware_caffe.data.arrays import read_npy

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
    import torch
    from segaware_caffe.net import Net

    if args.iterations <= 0:
        raise UsageError(f"--iterations must be > 0, got {args.iterations}")
    device = torch.device(device_from_args(args) or "cpu")
    net = Net(args.model, weights=args.weights, phase=args.phase,
              variables=parse_variables(args.set, args.vars), device=device,
              stages=tuple(args.stage), level=args.level, fuse=fuse)
    return net, device


def run(args):
    import torch
    from segaware_caffe.solvers.glog import fmt, glog_to, loss_note

    with glog_to(sys.stderr):
        net, device = net_from_args(args)
        feed = feed_from_args(net, args.input, device)
        outputs = sorted(set(net.outputs) | set(net.loss_weights))
        log.info(f"Running for {args.iterations} iterations.")
        totals, loss = {}, 0.0
        with torch.no_grad():
            for i in range(args.iterations):
                out = net.forward(outputs=outputs, **feed)
                total = net.loss(out)
                loss += float(total) if total is not None else 0.0
                for name in net.outputs:
                    values = out[name].detach().to(torch.float64).reshape(-1).cpu()
                    totals[name] = values if name not in totals else totals[name] + values
                    for value in values.tolist():
                        log.info(f"Batch {i}, {name} = {fmt(value)}")
        log.info(f"Loss: {fmt(loss / args.iterations)}")
        for name in net.outputs:
            weight = net.loss_weights.get(name, 0.0)
            for value in (totals[name] / args.iterations).tolist():
                log.info(f"{name} = {fmt(value)}{loss_note(weight, value)}")
    return 0
