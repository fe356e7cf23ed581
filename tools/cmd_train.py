"""segaware-caffe train --solver S [--weights W | --snapshot S] [--set VAR=value] [--vars FILE]
[--gpu ID] [--iterations N] [--max-seconds S] [--nonfinite stop|warn|ignore]: `caffe train` on
PyTorch.

Fine-tuning: `--weights a.caffemodel,b.caffemodel` loads the files in order (a later file's layers
replace an earlier one's, as in caffe); `--rename FROM=TO` after a file maps the names of its
layers (a snapshot of another net), and the log names the layers each file set, the layers left
at their fillers and, loudly, the layers that start with all-zero weights.

Logs go to stderr as glog lines (BVLC's tools/extra/parse_log.py reads them). Like caffe:
Ctrl-C (SIGINT) stops after the current iteration and snapshots; SIGHUP snapshots and goes on
(--sigint-effect / --sighup-effect: stop, snapshot or none). Without --gpu the solver's
solver_mode decides (GPU when CUDA is available). Several GPUs or processes:
`torchrun --nproc_per_node N -m tools.cli train ...` (see segaware_caffe.solver).
"""
import argparse
import contextlib
import logging
import re
import signal
import sys

from segaware_caffe.tools.common import (UsageError, add_device_arguments, add_max_seconds_argument,
                                         add_variable_arguments, device_from_args, parse_variables)

log = logging.getLogger("segaware_caffe.cli")
EFFECTS = ("stop", "snapshot", "none")


class _WeightsFiles(argparse.Action):
    """--weights a.caffemodel,b.caffemodel (repeatable): [[path, [rename rules]], ...] in order."""

    def __call__(self, parser, namespace, values, option_string=None):
        plan = list(getattr(namespace, self.dest, None) or [])
        plan += [[path, []] for path in values.split(",") if path]
        setattr(namespace, self.dest, plan)


class _Rename(argparse.Action):
    """--rename FROM=TO: renames layers of the --weights file given before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        plan = getattr(namespace, "weights", None) or []
        if not plan:
            parser.error(f"--rename {values}: give it after the --weights file whose layers it "
                         f"renames")
        pattern, sep, replacement = values.partition("=")
        if not sep or not pattern:
            parser.error(f"--rename expects FROM=TO (a regular expression and its replacement), "
                         f"got {values!r}")
        plan[-1][1].append((pattern, replacement))


def add_arguments(parser):
    parser.add_argument("--solver", required=True, help="solver .prototxt")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--weights", action=_WeightsFiles, default=[], metavar="W",
                       help=".caffemodel(s) to fine-tune from, loaded in order (repeatable, or "
                            "comma-separated, like caffe): a later file's layers replace an "
                            "earlier one's")
    parser.add_argument("--rename", action=_Rename, metavar="FROM=TO",
                        help="rename layers of the --weights file given before it (the last one "
                             "of a comma-separated list): a layer whose "
                             "whole name matches the regular expression FROM loads as TO (\\1 "
                             "for its groups), e.g. 'conv(.*)=emb\\1' puts an embs snapshot's "
                             "convolutions into the vgg net's emb layers (repeatable)")
    start.add_argument("--snapshot", metavar="S", help=".solverstate to resume training from")
    add_variable_arguments(parser)
    add_device_arguments(parser)
    parser.add_argument("--iterations", type=int, metavar="N",
                        help="stop after iteration N instead of max_iter (the learning-rate "
                             "schedule still uses max_iter)")
    parser.add_argument("--progress", action="store_true",
                        help="draw a progress bar (only on a terminal)")
    add_max_seconds_argument(parser, "checked before every pass; an unfinished iteration is "
                                     "dropped, and the run ends as after Ctrl-C: snapshot and exit 0")
    parser.add_argument("--nonfinite", choices=("stop", "warn", "ignore"), default="stop",
                        help="when the loss or a gradient becomes NaN/inf: stop with a message "
                             "naming the iteration and the first layer where it appeared "
                             "(default), warn once and go on (as caffe does), or do not check")
    parser.add_argument("--sigint-effect", choices=EFFECTS, default="stop")
    parser.add_argument("--sighup-effect", choices=EFFECTS, default="snapshot")


@contextlib.contextmanager
def signal_requests(solver, sigint_effect, sighup_effect):
    """Turn SIGINT/SIGHUP into solver requests ("stop"/"snapshot") checked after each iteration."""
    pending = []

    def handler(effect):
        def record(signum, frame):
            if effect != "none":
                log.info(f"Received signal {signal.Signals(signum).name}: will {effect} after "
                         f"this iteration")
                pending.append(effect)
        return record

    def request():
        if not pending:
            return None
        effect = "stop" if "stop" in pending else pending[0]
        pending.clear()
        return effect

    previous = {}
    for signum, effect in ((signal.SIGINT, sigint_effect), (getattr(signal, "SIGHUP", None), sighup_effect)):
        if signum is not None:
            previous[signum] = signal.signal(signum, handler(effect))
    solver.action_request = request
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        solver.action_request = None


def run(args):
    from segaware_caffe.solver import Solver
    from segaware_caffe.solvers.glog import glog_to

    if args.iterations is not None and args.iterations < 0:
        raise UsageError(f"--iterations must be >= 0, got {args.iterations}")
    if args.iterations:
        from segaware_caffe import limits
        limits.check(args.iterations, "iterations", "--iterations", "command line")
    from segaware_caffe.weights import WeightsFile, renamed

    variables = parse_variables(args.set, args.vars)
    weights = []
    for path, rules in args.weights:
        for pattern, _ in rules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UsageError(f"--rename {pattern!r}: not a regular expression ({e})") from None
        weights.append(renamed(path, rules) if rules else WeightsFile(path))
    with glog_to(sys.stderr):
        solver = Solver(args.solver, weights=weights or None, variables=variables,
                        device=device_from_args(args), progress=args.progress,
                        max_seconds=args.max_seconds, nonfinite=args.nonfinite)
        log.info("Starting Optimization")
        with signal_requests(solver, args.sigint_effect, args.sighup_effect):
            solver.solve(resume_file=args.snapshot, stop_iter=args.iterations)
    return 0
