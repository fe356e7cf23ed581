"""segaware-caffe plot LOG [-o curves.png] [--csv curves.csv]: training curves from a Caffe-format
log (what `segaware-caffe train` writes to stderr, or the original caffe binary's glog output).

It reads what BVLC's tools/extra/parse_log.py reads: "Iteration N, loss = X" (the smoothed train
loss), "Iteration N, lr = X", "Train net output #k: NAME = X" and, after "Iteration N, Testing
net (#k)", "Test net output #k: NAME = X"; an output line belongs to the last iteration named
before it. The PNG has one panel for the losses (train and test, the outputs with a loss
weight), one for the learning rate and one for the other outputs (accuracy, ...). Drawing needs
matplotlib (`pip install segaware-caffe[plot]`); --csv writes the numbers without it.
"""
import csv
import io
import os
import re
from collections import OrderedDict

from segaware_caffe.errors import SegawareError
from segaware_caffe.tools.common import UsageError, add_force_argument, check_new_file

ITERATION = re.compile(r"\bIteration (\d+)")
LOSS = re.compile(r"\bIteration (\d+)(?: \([^)]*\))?, loss = ([-+\w.]+)")
LEARNING_RATE = re.compile(r"\bIteration (\d+), lr = ([-+\w.]+)")
TESTING = re.compile(r"\bIteration (\d+), Testing net \(#(\d+)\)")
OUTPUT = re.compile(r"\b(Train|Test) net output #(\d+): (\S+) = ([-+\w.]+)( \(\* [^)]* loss\))?")


SMOOTHED = "train loss (smoothed)"


class LogError(SegawareError, ValueError):
    """A log with nothing to plot (the message names the file)."""


def parse_log(text):
    """{series name: [(iteration, value)]} of a Caffe log, in the order the series first appear;
    and the set of series that are losses. Series: "train loss (smoothed)" (the "Iteration N,
    loss" lines, averaged over average_loss iterations), "lr", "train NAME",
    "test NAME" (with " #k" for test nets after the first)."""
    series, losses = OrderedDict(), {SMOOTHED}
    iteration, test_net = None, 0

    def add(name, it, value):
        try:
            number = float(value)
        except ValueError:
            return
        series.setdefault(name, []).append((it, number))

    for line in text.splitlines():
        match = LOSS.search(line)
        if match:
            add(SMOOTHED, int(match.group(1)), match.group(2))
        match = LEARNING_RATE.search(line)
        if match:
            add("lr", int(match.group(1)), match.group(2))
        match = TESTING.search(line)
        if match:
            test_net = int(match.group(2))
        match = ITERATION.search(line)
        if match:
            iteration = int(match.group(1))
        match = OUTPUT.search(line)
        if match and iteration is not None:
            phase, _, name, value, loss = match.groups()
            label = f"{phase.lower()} {name}" + (f" #{test_net}" if phase == "Test" and test_net else "")
            add(label, iteration, value)
            if loss:
                losses.add(label)
    return series, losses


def write_csv(series, path, overwrite):
    from segaware_caffe.files import CLI_HINT, write_new

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["series", "iteration", "value"])
    for name, points in series.items():
        for iteration, value in points:
            writer.writerow([name, iteration, repr(value)])
    write_new(path, buffer.getvalue(), overwrite=overwrite, hint=CLI_HINT)


def load_pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a LogError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plot draws with matplotlib, which is not installed: pip install "
                         "'segaware-caffe[plot]' (or matplotlib); --csv FILE writes the curves "
                         "without it") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw(series, losses, path, title, overwrite):
    from segaware_caffe.files import CLI_HINT, open_new

    plt = load_pyplot()
    panels = [("loss", [n for n in series if n in losses]),
              ("learning rate", [n for n in series if n == "lr"]),
              ("outputs", [n for n in series if n not in losses and n != "lr"])]
    panels = [(label, names) for label, names in panels if names]
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True,
                                squeeze=False)
    for axis, (label, names) in zip(axes[:, 0], panels):
        for name in names:
            points = series[name]
            style = "-" if name.startswith("train") or name == "lr" else "o-"
            style = ":" if name.startswith("train") and name != SMOOTHED and name in losses else style
            axis.plot([p[0] for p in points], [p[1] for p in points], style, label=name,
                      markersize=3, drawstyle="steps-post" if name == "lr" else "default")
        if label == "learning rate" and all(v > 0 for _, v in series["lr"]):
            axis.set_yscale("log")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    axes[-1, 0].set_xlabel("iteration")
    axes[0, 0].set_title(title, fontsize=10)
    figure.tight_layout()
    with open_new(path, overwrite=overwrite, hint=CLI_HINT) as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)


def add_arguments(parser):
    parser.add_argument("log", metavar="LOG", help="a Caffe-format training log")
    parser.add_argument("-o", "--output", metavar="FILE.png",
                        help="where to draw the curves (default: LOG with .png)")
    parser.add_argument("--csv", metavar="FILE",
                        help="also (or, with --no-png, only) write the curves as series,iteration,"
                             "value rows")
    parser.add_argument("--no-png", action="store_true", help="write only the --csv file")
    add_force_argument(parser, "existing output files")


def run(args):
    if args.no_png and not args.csv:
        raise UsageError("--no-png leaves nothing to write: give --csv FILE")
    output = None if args.no_png else (args.output or os.path.splitext(args.log)[0] + ".png")
    for path in (output, args.csv):
        if path:
            check_new_file(path, args.force)
    if output:
        load_pyplot()                   # before reading a long log: say now if it cannot draw
    with open(args.log, encoding="utf-8", errors="replace") as f:
        series, losses = parse_log(f.read())
    if not series:
        raise LogError(f"{args.log}: no 'Iteration N, loss = ...', lr or net output lines (is it "
                       f"the log of a Caffe or segaware-caffe training run?)")
    if args.csv:
        write_csv(series, args.csv, args.force)
        print(f"wrote {args.csv}")
    if output:
        draw(series, losses, output, os.path.basename(args.log), args.force)
        print(f"wrote {output}: " + ", ".join(f"{name} ({len(points)} points)"
                                              for name, points in series.items()))
    return 0
