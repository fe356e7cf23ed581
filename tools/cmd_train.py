"""segaware-caffe train --solver S [--weights W | --snapshot S] [--set VAR=value] [--vars FILE]
[--gpu ID] [--iterations N]: `caffe train` on PyTorch.

Logs go to stderr as glog lines (BVLC's tools/extra/parse_log.py reads them). Like caffe:
Ctrl-C (SIGINT) stops after the current iteration and snapshots; SIGHUP snapshots and goes on
(--sigint-effect / --sighup-effect: stop, snapshot or none). Without --gpu the solver's
solver_mode decides (GPU when CUDA is available). Several GPUs or processes:
`torchrun --nproc_per_node N -m tools.cli train ...` (see segaware_caffe.solver).
"""
import contextlib
import logging
import signal
import sys

from segaware_caffe.tools.common import (UsageError, add_device_arguments, add_variable_arguments,
                                         device_from_args, parse_variables)

log = logging.getLogger("segaware_caffe.cli")
EFFECTS = ("stop", "snapshot", "none")


def add_arguments(parser):
    parser.add_argument("--solver", required=True, help="solver .prototxt")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--weights", action="append", default=[], metavar="W",
                       help=".caffemodel to fine-tune from (repeatable, or comma-separated)")
    start.add_argument("--snapshot", metavar="S", help=".solverstate to resume training from")
    add_variable_arguments(parser)
    add_device_arguments(parser)
    parser.add_argument("--iterations", type=int, metavar="N",
                        help="stop after iteration N instead of max_iter (the learning-rate "
                             "schedule still uses max_iter)")
    parser.add_argument("--progress", action="store_true",
                        help="draw a progress bar (only on a terminal)")
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
    variables = parse_variables(args.set, args.vars)
    weights = [w for item in args.weights for w in item.split(",") if w]
    with glog_to(sys.stderr):
        solver = Solver(args.solver, weights=weights or None, variables=variables,
                        device=device_from_args(args), progress=args.progress)
        log.info("Starting Optimization")
        with signal_requests(solver, args.sigint_effect, args.sighup_effect):
            solver.solve(resume_file=args.snapshot, stop_iter=args.iterations)
    return 0
