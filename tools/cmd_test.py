"""segaware-caffe test --model M --weights W [--iterations N]: `caffe test` on PyTorch.

Runs N forward passes of the net in the TEST phase (data layers read their next batch each
time; nets with Input layers are fed the same --input BLOB=FILE.npy arrays every pass) and logs,
like caffe, every output element per batch ("Batch 3, accuracy = 0.75"), the mean loss
("Loss: 0.69") and the mean of every output ("accuracy = 0.7", "loss = 0.69 (* 1 = 0.69 loss)").

Scoring a segmentation net in one go: `--png DIR` writes a VOC-palette label PNG per image of the
data layer's list (arg-max of the score map MatWrite writes, or of --png-blob), cropped to the
image's own size (the released test nets pad each image bottom/right to crop_size), named by the
image's file stem; `segaware-caffe eval --pred DIR` scores them. MatWrite's folders are created,
and `--force` replaces the .mat files and PNGs of an earlier run (without it nothing is replaced).
"""
import logging
import sys
import time

from segaware_caffe.tools.common import (UsageError, add_device_arguments, add_force_argument,
                                         add_input_shape_argument, add_max_seconds_argument,
                                         add_variable_arguments, check_iterations,
                                         device_from_args, int32, parse_input_shapes,
                                         parse_variables, sized_net)

log = logging.getLogger("segaware_caffe.cli")


def add_net_run_arguments(parser, *, phase, iterations_help, input_help, iterations_default="50"):
    """Options shared by `test` and `time`: the net, its weights, state, inputs, sizes, device."""
    parser.add_argument("--model", required=True, help="net .prototxt")
    parser.add_argument("--weights", metavar="W", help=".caffemodel with the learned parameters")
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help=f"{iterations_help} (default {iterations_default})")
    parser.add_argument("--phase", choices=("train", "test"), default=phase,
                        help=f"net phase (default {phase}, like caffe)")
    parser.add_argument("--stage", action="append", default=[], help="net stage (repeatable)")
    parser.add_argument("--level", type=int32, default=0, help="net level")
    parser.add_argument("--input", action="append", default=[], metavar="BLOB=FILE.npy",
                        help=input_help)
    add_input_shape_argument(parser)
    add_variable_arguments(parser)
    add_device_arguments(parser)
    parser.add_argument("--progress", action="store_true",
                        help="draw a progress bar with speed and time left (only on a terminal)")
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
                                     "layers)",
                          iterations_default="50; with --png, one pass over the data layer's "
                                             "list, or 1 for a net fed with --input")
    parser.add_argument("--png", metavar="DIR",
                        help="write a VOC-palette label PNG of every image into DIR (<id>.png, the "
                             "id being the image's file stem), cropped to the image's own size")
    parser.add_argument("--png-blob", metavar="BLOB",
                        help="score map the PNGs show, arg-max over channels (default: the bottom "
                             "of the first MatWrite layer, else the first net output at the input's "
                             "size)")
    add_force_argument(parser, "existing MatWrite .mat files and PNGs (so a test can be re-run)")


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


def net_from_args(args, *, fuse=True, overwrite=False):
    """(Net, device) for the options of add_net_run_arguments (--iterations defaults to 50)."""
    import torch
    from segaware_caffe.net import Net

    if args.iterations is not None:
        check_iterations(args.iterations)
    device = torch.device(device_from_args(args) or "cpu")
    variables = parse_variables(args.set, args.vars)
    source = sized_net(args.model, variables, parse_input_shapes(args.input_shape))
    net = Net(source, weights=args.weights, phase=args.phase, variables=variables, device=device,
              stages=tuple(args.stage), level=args.level, fuse=fuse, overwrite=overwrite)
    if args.iterations is None:
        args.iterations = 50
    return net, device


def prepare_mat_folders(net):
    """Create the folders MatWrite layers write into (Caffe aborts on a missing one); their paths
    were checked to lie inside the output folder when the net was built."""
    import os
    for record in net.records:
        if record.type != "MatWrite":
            continue
        module = record.module
        count = len(module.names) if module.names is not None else 1
        folders = {os.path.dirname(module.file_name(k, 0)) for k in range(count)}
        for folder in sorted(f for f in folders if f and not os.path.isdir(f)):
            os.makedirs(folder)
            log.info(f"Created folder {folder} for {record.name} (MatWrite)")


def run(args):
    import warnings

    import torch
    from segaware_caffe.solvers.glog import ProgressBar, Rate, fmt, glog_to, loss_note
    from segaware_caffe.tools.common import prepare_output_dir
    from segaware_caffe.tools.predictions import PngWriter, default_png_blob

    if args.png_blob and not args.png:
        raise UsageError("--png-blob names the blob of the PNGs: give --png DIR too")
    if args.png:
        prepare_output_dir(args.png, args.force)
    iterations_given = args.iterations is not None
    with glog_to(sys.stderr):
        with warnings.catch_warnings():
            # test creates MatWrite's folders itself (prepare_mat_folders)
            warnings.filterwarnings("ignore", message=r".*\(MatWrite\): output directory .* does "
                                                      r"not exist \(yet\)")
            net, device = net_from_args(args, overwrite=args.force)
        prepare_mat_folders(net)
        feed = feed_from_args(net, args.input, device)
        writer = None
        if args.png:
            writer = PngWriter(net, args.png_blob or default_png_blob(net), args.png,
                               overwrite=args.force)
            if not iterations_given and writer.passes() is not None:
                args.iterations = writer.passes()
                log.info(f"--png without --iterations: one pass over the list, "
                         f"{args.iterations} batch(es)")
            elif not iterations_given:     # fed inputs: every pass would give the same PNGs
                args.iterations = 1
        outputs = sorted(set(net.outputs) | set(net.loss_weights) | ({writer.blob} if writer else set()))
        log.info(f"Running for {args.iterations} iterations.")
        totals, loss, done = {}, 0.0, 0
        clock = Clock(args.max_seconds)
        bar = ProgressBar(args.iterations, enabled=None if args.progress else False, unit="batch")
        rate, step = Rate(args.iterations), max(args.iterations // 10, 1)
        bar.update(0)
        rate.update(0)
        try:
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
                    if writer is not None:
                        writer.write(out[writer.blob])
                    bar.update(i + 1)
                    rate.update(i + 1)
                    if not bar.shown and ((i + 1) % step == 0 or i + 1 == args.iterations):
                        speed = rate.text("batch")
                        log.info(f"Batch {i + 1}/{args.iterations} done" + (f" ({speed})" if speed else ""))
        finally:
            bar.close()
        log.info(f"Loss: {fmt(loss / done)}")
        for name in net.outputs:
            weight = net.loss_weights.get(name, 0.0)
            for value in (totals[name] / done).tolist():
                log.info(f"{name} = {fmt(value)}{loss_note(weight, value)}")
        if writer is not None:
            repeated = f" ({writer.repeated} repeated item(s) of the wrapped list skipped)" \
                if writer.repeated else ""
            log.info(f"Wrote {len(writer.written)} label PNG(s) of {writer.blob} to {args.png}"
                     f"{repeated}")
    return 0
