"""Caffe's Solver on a segaware_caffe.Net: solver.prototxt in, the original's trajectory out.

    solver = Solver("solver.prototxt", weights="init.caffemodel", variables={"EXP": "/exp"})
    solver.step(1, inputs={"data": x, "label": y})     # nets with Input layers
    solver.solve()                                     # nets with data layers: run to max_iter

What one iteration does is Caffe's `Solver::Step` (BVLC fe0f44112, unchanged by the fork): clear the
parameter diffs (`param.grad`), run `iter_size` forward/backward passes (diffs accumulate),
all-reduce the diffs across processes (torchrun), then `ApplyUpdate`: learning rate for the
current iteration, gradient clipping on the summed raw diffs, and per learnable blob the division
by iter_size, weight decay and the solver type's rule (`solvers/rules.py`), finally
`data -= diff`. The update runs under `torch.no_grad()` on `param.data`, never through
torch.optim (whose SGD applies the learning rate after momentum, whose Adam has no coupled decay
and puts eps elsewhere). After an update `param.grad` holds what Caffe leaves in the diff: the
value that was subtracted.

Paths: `net`, `train_net` and `test_net` names are looked up from the current working directory
first (as Caffe does) and then from the solver file's directory. `snapshot_prefix` is relative to
the working directory, like Caffe; when it is unset we use the solver file's path without its
extension (BVLC's later default). A .solverstate's `learned_net` is looked up from the working
directory, then from the .solverstate's own directory.

Several processes (`torchrun --nproc_per_node N segaware-caffe train ...`): with WORLD_SIZE > 1 the
solver joins the process group from the environment (NCCL on CUDA, gloo on CPU), each rank uses
cuda:LOCAL_RANK when it runs on CUDA, seeds with random_seed + rank, and after each iteration's
passes the diffs are summed over ranks and divided by the number of ranks, like Caffe's P2PSync
(effective batch = ranks x batch_size x iter_size). Before the first step every rank takes rank
0's parameters, history and iteration (segaware_caffe.distributed), so random fillers and
resumed states agree; every rank applies the same update; a checksum of all parameters is logged
at the start and at each snapshot, after checking that every rank has the same (an error names
the ranks and the first differing layer); only rank 0 logs, tests and writes snapshots. Each
rank's data layers must read different data (their shuffles differ through the seed).
"""
import logging
import math
import os
import time

import numpy as np
import torch

from segaware_caffe import caffe_proto
from segaware_caffe.caffe_proto import caffe_pb2
from segaware_caffe.caffe_proto.text import load_text

from . import limits
from .budget import MemoryBudget
from .canonical import read_net_source
from .net import Net
from .nonfinite import DataCapture, all_finite, locate
from .distributed import agree_on_request, broadcast_state, check_ranks_agree
from .filler_report import report_fillers
from .weights import WeightsFile, first_records_by_name, history_fits
from .errors import NonFiniteError, SolverError, UnsupportedError
from .files import atomic_write
from .inference import parameters_changed
from .solvers.glog import ProgressBar, fmt, loss_note
from .solvers.rules import check_policy, learning_rate, make_rule, regularize

log = logging.getLogger("segaware_caffe.solver")

TRAIN_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")
NONFINITE_MODES = ("stop", "warn", "ignore")


class _OutOfTime(Exception):
    """max_seconds ran out; carries the sentence saying where the run stopped."""


def _where_of(source):
    """(name for messages, directory of the solver file or None); path or text is decided by the
    prototxt reader's rule."""
    if isinstance(source, caffe_pb2.SolverParameter):
        return "<SolverParameter>", None
    try:
        _, _, path = load_text(source)
    except caffe_proto.CaffeFormatError as e:
        raise SolverError(f"{os.fspath(source)}: solver file not found ({e})") from None
    if path is None:
        return "<solver text>", None
    return path, os.path.dirname(os.path.abspath(path))


def _net_state(phase, *states):
    """NetState merged like Caffe: phase, then each later state's set fields override, stages add."""
    merged = caffe_pb2.NetState(phase=phase)
    for state in states:
        merged.MergeFrom(state)
    return merged


def _learnable_labels(net):
    """'layer blob i' for each entry of net.learnable_params (owners, Caffe order)."""
    owner_ids = {id(p): k for k, p in enumerate(net.learnable_params)}
    labels = [None] * len(net.learnable_params)
    for record in net.records:
        for i, blob in enumerate(record.module.caffe_blobs()):
            k = owner_ids.get(id(blob))
            if k is not None and labels[k] is None:
                labels[k] = f"{record.name} blob {i}"
    return labels


class Solver:
    """Caffe's SGDSolver family (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam).

    solver: solver .prototxt path (or its text, or a SolverParameter); weights: .caffemodel path(s)
    to start from (Caffe's --weights; loaded into the train and test nets); variables: template
    values for `${VAR}` in the solver and its nets (dict or KEY=value file); train_net: a net
    (path, text, NetParameter or built Net) replacing the solver's train net; device: torch
    device (default: solver_mode GPU -> cuda:device_id when CUDA is available, else CPU);
    test_inputs: for test nets with Input layers, callable(test_net_index, test_iteration) ->
    {input: array}; progress: draw a progress bar on a terminal during solve().
    max_seconds: stop a step()/solve() call that runs longer (checked before every forward pass
    and test pass; an iteration cut short is dropped, its update not applied), with
    `stopped_by` saying where. nonfinite: what a loss or diff that becomes NaN/inf does --
    "stop" (default: NonFiniteError naming the iteration and the first layer whose output or
    diff went non-finite), "warn" (log that once and go on, as Caffe does) or "ignore" (no
    checks). max_bytes: the memory budget of the nets, their diffs and the solver's history
    (see segaware_caffe.budget). Configured counts (iter_size, max_iter, test_iter) beyond any
    plausible run are refused (see segaware_caffe.limits).

    Attributes: net (TRAIN phase), test_nets, iter (completed updates), lr (rate of the next
    update), history (Caffe's history blobs, .solverstate order), param (SolverParameter).
    """

    def __init__(self, solver, weights=None, *, variables=None, train_net=None, device=None,
                 test_inputs=None, progress=False, max_seconds=None, nonfinite="stop",
                 max_bytes=None):
        self.where, self.solver_dir = _where_of(solver)
        if isinstance(solver, caffe_pb2.SolverParameter):
            param = caffe_pb2.SolverParameter()
            param.CopyFrom(solver)
        else:
            param = caffe_proto.read_solver(solver, variables)
        self.param, self.variables = param, variables
        self.rule = make_rule(param, self.where)
        check_policy(param, self.where)
        self._check_settings()
        if nonfinite not in NONFINITE_MODES:
            raise SolverError(f"nonfinite must be one of {', '.join(NONFINITE_MODES)}, got "
                              f"{nonfinite!r}")
        if max_seconds is not None and not (isinstance(max_seconds, (int, float))
                                            and not isinstance(max_seconds, bool)
                                            and max_seconds > 0):
            raise SolverError(f"max_seconds must be a number of seconds > 0, got {max_seconds!r}")
        self.nonfinite, self.max_seconds = nonfinite, max_seconds
        self._deadline, self.stopped_by, self._warned_nonfinite = None, None, False
        self.budget = MemoryBudget(max_bytes, where=f"solver {self.where}")
        self.rank, self.world_size = 0, 1
        self.device = self._init_device(device)
        if param.random_seed >= 0:
            seed = int(param.random_seed) + self.rank
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
        self.snapshot_prefix = self._snapshot_prefix()
        self.net = self._build_train_net(train_net)
        self._charge_training()
        self.test_nets = self._build_test_nets()
        self.test_inputs = test_inputs
        self.progress = progress
        self._synced = False       # ranks share rank 0's state (broadcast before the first step)
        self.weights_reports = []  # one WeightsReport (of the train net) per weights file loaded
        if weights is None:
            weights = list(param.weights)        # BVLC's solver-level `weights` field
        elif isinstance(weights, (str, os.PathLike, bytes, caffe_pb2.NetParameter, WeightsFile)):
            weights = [weights]
        for w in weights:
            self.load_weights(w)
        # which layers start from their fillers (rank 0 says so, loudly for all-zero ones)
        self.filler_layers = report_fillers(self.net, self.weights_reports,
                                            log if self.rank == 0 else None)
        self.iter = 0
        self.current_step = 0
        self.last_lr = None
        self.last_clip_norm = None
        self.requested_early_exit = False
        self.action_request = None   # callable -> None / "stop" / "snapshot" (signal handlers)
        self._labels = _learnable_labels(self.net)
        self.history = [torch.zeros_like(p.data) for _ in range(self.rule.HISTORY_SETS)
                        for p in self.net.learnable_params]
        # the last batch of each data layer, for replaying a pass that went non-finite
        self._capture = DataCapture(self.net) if nonfinite != "ignore" else None
        self._losses, self._smoothed_loss = [], 0.0
        log.info(f"Solver scaffolding done. {self.rule.TYPE} solver, {len(self.net.learnable_params)} "
                 f"learnable blobs, {len(self.test_nets)} test net(s), device {self.device}")

    # ------------------------------------------------------------------ set-up
    def _check_settings(self):
        p, where = self.param, self.where
        if p.regularization_type not in ("L1", "L2"):
            raise SolverError(f"{where}: unknown regularization_type {p.regularization_type!r} "
                              f"(L1 or L2)")
        for field, low in (("iter_size", 1), ("average_loss", 1)):
            if getattr(p, field) < low:
                raise SolverError(f"{where}: {field} must be >= {low}, got {getattr(p, field)}")
        if p.snapshot < 0 or p.display < 0 or p.test_interval < 0 or p.max_iter < 0:
            raise SolverError(f"{where}: snapshot, display, test_interval and max_iter must be >= 0")
        # counts that would keep a run going for days without a word (segaware_caffe.limits)
        limits.check(p.iter_size, "iter_size", "iter_size", where)
        limits.check(p.max_iter, "iterations", "max_iter", where)
        limits.check(p.average_loss, "iterations", "average_loss", where)
        for i, count in enumerate(p.test_iter):
            if count < 0:
                raise SolverError(f"{where}: test_iter must be >= 0, got {count} (test net #{i})")
            limits.check(count, "test_iter", f"test_iter (test net #{i})", where)
        if p.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            raise UnsupportedError(f"{where}: snapshot_format HDF5 is not supported (h5py-free "
                                   f"build); use BINARYPROTO (the default)")

    def _init_device(self, device):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            import torch.distributed as dist
            if device is None and self.param.solver_mode == caffe_pb2.SolverParameter.GPU \
                    and torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            if not dist.is_initialized():
                backend = "nccl" if str(device or "cpu").startswith("cuda") else "gloo"
                dist.init_process_group(backend=backend)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if device is None:
            wants_gpu = self.param.solver_mode == caffe_pb2.SolverParameter.GPU
            if wants_gpu and torch.cuda.is_available():
                device = f"cuda:{self.param.device_id}"
            else:
                if wants_gpu:
                    log.info("solver_mode GPU but no CUDA device is available: running on CPU")
                device = "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def _snapshot_prefix(self):
        if self.param.HasField("snapshot_prefix"):
            prefix = self.param.snapshot_prefix
        elif self.solver_dir is not None:
            prefix = os.path.splitext(self.where)[0]
        else:
            prefix = None
        if self.param.snapshot and self.rank == 0:
            if prefix is None:
                raise SolverError(f"{self.where}: snapshot is {self.param.snapshot} but "
                                  f"snapshot_prefix is not set")
            directory = os.path.dirname(os.path.abspath(prefix))
            if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                raise SolverError(f"{self.where}: cannot write snapshots with snapshot_prefix "
                                  f"{prefix!r}: directory {directory} does not exist or is not "
                                  f"writable")
        return prefix

    def _resolve(self, field, name):
        candidates = [name]
        if not os.path.isabs(name) and self.solver_dir is not None:
            candidates.append(os.path.join(self.solver_dir, name))
        for candidate in candidates:
            if os.path.isfile(candidate):
                return candidate
        raise SolverError(f"{self.where}: {field}: net file {name!r} not found (looked in "
                          f"{' and '.join(repr(os.path.abspath(c)) for c in candidates)})")

    def _make_net(self, source, state):
        phase = "train" if state.phase == caffe_pb2.TRAIN else "test"
        return Net(source, phase=phase, variables=self.variables, device=self.device,
                   stages=tuple(state.stage), level=state.level, max_bytes=self.budget)

    def _charge_training(self):
        """Training keeps a diff beside every top and learnable blob, and the solver's history
        beside every learnable blob: charged to the budget the nets were built in."""
        net = self.net
        params = sum(p.numel() * p.element_size() for p in net.learnable_params)
        self.budget.reserve(net.top_bytes + params * (1 + self.rule.HISTORY_SETS),
                            f"training the net {net.name!r} (a diff for each of its blobs and "
                            f"{self.rule.HISTORY_SETS} history blob(s) per learnable blob)")

    def _net_source(self, field, value):
        """The NetSource of a net file name (looked up like Caffe) or an inline NetParameter."""
        if isinstance(value, caffe_pb2.NetParameter):
            return read_net_source(value)
        return read_net_source(self._resolve(field, value), self.variables)

    def _build_train_net(self, train_net):
        p = self.param
        if isinstance(train_net, Net):
            if train_net.phase != "TRAIN":
                raise SolverError(f"{self.where}: train_net must be built with phase='train', "
                                  f"got phase {train_net.phase}")
            return train_net.to(self.device)
        if train_net is not None:
            source = read_net_source(train_net, self.variables)
        else:
            given = [f for f in TRAIN_NET_FIELDS if p.HasField(f)]
            if not given:
                raise SolverError(f"{self.where}: no train net: set one of "
                                  f"{', '.join(TRAIN_NET_FIELDS)} (or pass train_net=)")
            if len(given) > 1:
                raise SolverError(f"{self.where}: more than one train net given ({', '.join(given)}); "
                                  f"keep exactly one of {', '.join(TRAIN_NET_FIELDS)}")
            field = given[0]
            source = self._net_source(field, getattr(p, field))
        state = _net_state(caffe_pb2.TRAIN, source.param.state, p.train_state)
        log.info(f"Creating training net from {source.where}")
        return self._make_net(source, state)

    def _build_test_nets(self):
        p = self.param
        generic = [f for f in ("net", "net_param") if p.HasField(f)]
        if len(generic) > 1:
            raise SolverError(f"{self.where}: both net and net_param are given; keep one")
        sources = [("test_net_param", n) for n in p.test_net_param] + \
                  [("test_net", n) for n in p.test_net]
        named = len(sources)
        if generic:
            if len(p.test_iter) < len(sources):
                raise SolverError(f"{self.where}: test_iter must be given for each test net "
                                  f"({len(sources)} test nets, {len(p.test_iter)} test_iter)")
            sources += [(generic[0], getattr(p, generic[0]))] * (len(p.test_iter) - len(sources))
        elif len(p.test_iter) != len(sources):
            raise SolverError(f"{self.where}: test_iter must be given for each test net "
                              f"({len(sources)} test nets, {len(p.test_iter)} test_iter)")
        if len(p.test_state) and len(p.test_state) != len(sources):
            raise SolverError(f"{self.where}: test_state must be unset or given once per test net "
                              f"({len(sources)} test nets, {len(p.test_state)} test_state)")
        # Caffe requires test_interval only for test nets made from the generic net/net_param;
        # named test nets without it are built and never run during training
        if len(sources) > named and p.test_interval <= 0:
            raise SolverError(f"{self.where}: {len(sources) - named} test net(s) from "
                              f"{generic[0]} but test_interval is {p.test_interval} (must be > 0)")
        nets = []
        for i, (field, value) in enumerate(sources):
            source = self._net_source(field, value)
            states = [source.param.state] + ([p.test_state[i]] if len(p.test_state) else [])
            log.info(f"Creating test net (#{i}) specified by {field}")
            nets.append(self._make_net(source, _net_state(caffe_pb2.TEST, *states)))
        return nets

    def load_weights(self, weights):
        """Copy a .caffemodel (path, bytes, NetParameter or WeightsFile) into the train net and
        every test net (Caffe's CopyLayers); the file is read once. Returns the train net's
        WeightsReport (also kept in `weights_reports`)."""
        weights = WeightsFile.of(weights)
        log.info(f"Finetuning from {weights.where}")
        reports = []
        for net in [self.net] + self.test_nets:
            reports.append(net.load_weights(weights))
            for name in reports[-1].not_in_net:
                log.info(f"Ignoring source layer {name}")
        loaded = reports[0].loaded
        shown = ", ".join(loaded[:40]) + (f", ... ({len(loaded) - 40} more)" if len(loaded) > 40 else "")
        log.info(f"Copied {len(loaded)} layer(s) from {weights.where}" + (f": {shown}" if loaded else ""))
        self.weights_reports.append(reports[0])
        self._synced = False
        return reports[0]

    # ------------------------------------------------------------------ training
    @property
    def lr(self):
        """The learning rate the next update will use."""
        return learning_rate(self.param, self.iter, self.current_step)[0]

    def _feed(self, inputs):
        feed = inputs(self.iter) if callable(inputs) else inputs
        if feed is None and self.net.input_names:
            raise SolverError(f"{self.where}: the train net has inputs "
                              f"{', '.join(self.net.input_names)}: pass step(..., inputs={{...}})")
        return feed or {}

    def _forward_backward(self, feed):
        outputs = self._train_outputs()
        check = self.nonfinite != "ignore"
        rng = torch.random.get_rng_state() if check else None
        out = self.net.forward(outputs=outputs, **feed)
        total = self.net.loss(out)
        if total is None:
            return out, 0.0
        value = float(total.detach())
        if check and not math.isfinite(value):
            self._non_finite(f"the loss is {value}", feed, outputs, rng, backward=False)
        if total.requires_grad:
            total.backward()
            if check and not all_finite([p.grad for p in self.net.learnable_params]):
                self._non_finite("a gradient is not finite", feed, outputs, rng, backward=True)
        return out, value

    def _non_finite(self, what, feed, outputs, rng, backward):
        """Stop (NonFiniteError) or warn once, naming the iteration and where the pass went
        non-finite (found by replaying it, see segaware_caffe.nonfinite)."""
        if self.nonfinite == "warn" and self._warned_nonfinite:
            return
        captured = self._capture.outputs if self._capture is not None else {}
        found = locate(self.net, feed, outputs, captured, rng, backward=backward)
        message = (f"{self.where}: iteration {self.iter}: {what}; "
                   + (found or "replaying the pass did not reproduce it"))
        if self.nonfinite == "stop":
            raise NonFiniteError(message + " (training stopped; nonfinite='warn' or --nonfinite "
                                           "warn goes on, as Caffe does)")
        self._warned_nonfinite = True
        log.warning(message + "; going on (nonfinite='warn'; later non-finite values are not "
                              "reported)")

    # ------------------------------------------------------------------ time bound
    def _check_time(self, where):
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise _OutOfTime(f"stopped after {self.max_seconds:g} s (max_seconds) {where}")

    def _train_outputs(self):
        return sorted(set(self.net.outputs) | set(self.net.loss_weights))

    def _update_smoothed_loss(self, loss, start_iter):
        average = self.param.average_loss
        if len(self._losses) < average:
            self._losses.append(loss)
            self._smoothed_loss = (self._smoothed_loss * (len(self._losses) - 1) + loss) / len(self._losses)
        else:
            index = (self.iter - start_iter) % average
            self._smoothed_loss += (loss - self._losses[index]) / average
            self._losses[index] = loss

    def step(self, iters, inputs=None, *, _progress=None):
        """Run `iters` iterations. inputs: {Input blob: array} fed to every forward pass of these
        iterations, or callable(iteration) -> such a dict, or None for nets with data layers.
        Returns {loss top: value} of the last forward pass (before that iteration's update)."""
        iters = limits.check(iters, "iterations", "the number of iterations", self.where)
        if not self._synced:
            self.synchronize()
        start_iter, stop_iter = self.iter, self.iter + int(iters)
        self._losses, self._smoothed_loss = [], 0.0
        own_clock = self._deadline is None and self.max_seconds is not None
        if own_clock:
            self._deadline = time.monotonic() + self.max_seconds
        try:
            return self._steps(stop_iter, start_iter, inputs, _progress)
        except _OutOfTime as stop:
            for param in self.net.learnable_params:   # an unfinished iteration is dropped
                param.grad = None
            self.stopped_by, self.requested_early_exit = str(stop), True
            log.info(f"{self.where}: {stop}; {self.iter} iteration(s) completed")
            return {}
        finally:
            if own_clock:
                self._deadline = None

    def _steps(self, stop_iter, start_iter, inputs, _progress):
        p = self.param
        losses = {}
        while self.iter < stop_iter:
            for param in self.net.learnable_params:
                param.grad = None
            if p.test_interval and self.iter % p.test_interval == 0 \
                    and (self.iter > 0 or p.test_initialization) and self.rank == 0:
                self.test_all()
            display = p.display and self.iter % p.display == 0
            feed = self._feed(inputs)
            loss = 0.0
            for pass_index in range(p.iter_size):
                self._check_time(f"at iteration {self.iter}" + (
                    f", before pass {pass_index + 1} of {p.iter_size} (iter_size); the "
                    f"iteration's update was not applied" if pass_index else ""))
                out, pass_loss = self._forward_backward(feed)
                loss += pass_loss
            loss /= p.iter_size
            losses = {top: _value(out[top]) for top in self.net.loss_weights}
            self._update_smoothed_loss(loss, start_iter)
            if display and self.rank == 0:
                self._log_train_outputs(out)
            self._all_reduce_diffs()
            self.apply_update()
            self.iter += 1
            if _progress is not None:
                _progress.update(self.iter, self._smoothed_loss)
            request = self.action_request() if self.action_request is not None else None
            request = agree_on_request(request, self.world_size, self.device)
            if (p.snapshot and self.iter % p.snapshot == 0) or request == "snapshot":
                self.checked_snapshot()
            if request == "stop":
                self.requested_early_exit = True
                break
        return losses

    def synchronize(self):
        """Before the first step (and after restore or load_weights): every rank takes rank 0's
        blobs, history and iteration, as Caffe's multi-GPU sync does; then the ranks' parameters
        are checked to agree and their checksum is logged. Returns the checksum."""
        if self.world_size > 1:
            self.iter, self.current_step = broadcast_state(self.net, self.history,
                                                           [self.iter, self.current_step],
                                                           self.device)
        total = check_ranks_agree(self.net, self.world_size, f"at iteration {self.iter}")
        self._synced = True
        self._log_checksum(total)
        return total

    def _log_checksum(self, total):
        if self.rank == 0:
            same = f" (the same on all {self.world_size} processes)" if self.world_size > 1 else ""
            log.info(f"Iteration {self.iter}, parameter checksum = {total!r}{same}")

    def checked_snapshot(self):
        """snapshot() once every rank's parameters are found to agree (all ranks call this;
        rank 0 writes). Returns the two paths on rank 0, else None."""
        total = check_ranks_agree(self.net, self.world_size, f"at the snapshot of iteration {self.iter}")
        self._log_checksum(total)
        return self.snapshot() if self.rank == 0 else None

    def _log_train_outputs(self, out):
        log.info(f"Iteration {self.iter}, loss = {fmt(self._smoothed_loss)}")
        index = 0
        for name in self.net.outputs:
            weight = self.net.loss_weights.get(name, 0.0)
            for value in out[name].detach().reshape(-1).cpu().tolist():
                log.info(f"    Train net output #{index}: {name} = {fmt(value)}"
                         f"{loss_note(weight, value)}")
                index += 1

    def _diffs(self):
        """Every learnable blob's diff tensor (allocated as zeros where autograd left none)."""
        diffs = []
        for param in self.net.learnable_params:
            if param.grad is None:
                param.grad = torch.zeros_like(param.data)
            diffs.append(param.grad)
        return diffs

    def _all_reduce_diffs(self):
        if self.world_size == 1:
            return
        import torch.distributed as dist
        scale = 1.0 / self.world_size
        for diff in self._diffs():
            dist.all_reduce(diff, op=dist.ReduceOp.SUM)
            diff.mul_(scale)

    @torch.no_grad()
    def apply_update(self):
        """SGDSolver::ApplyUpdate for the diffs now in param.grad (uses and logs the rate of the
        current iteration; does not advance `iter`)."""
        p = self.param
        rate, self.current_step = learning_rate(p, self.iter, self.current_step)
        self.last_lr = rate
        if p.display and self.iter % p.display == 0 and self.rank == 0:
            log.info(f"Iteration {self.iter}, lr = {fmt(rate)}")
        params, diffs = self.net.learnable_params, self._diffs()
        self.clip_gradients(diffs)
        weight_decay = np.float32(p.weight_decay)
        count = len(params)
        for k, (param, diff) in enumerate(zip(params, diffs)):
            if p.iter_size > 1:
                diff.mul_(float(np.float32(1) / np.float32(p.iter_size)))
            local_decay = float(weight_decay * np.float32(param.decay_mult))
            regularize(diff, param.data, local_decay, p.regularization_type)
            local_rate = float(np.float32(rate) * np.float32(param.lr_mult))
            history = self.history[k::count]
            self.rule.update(diff, history, local_rate, self.iter)
            param.data.sub_(diff)
        parameters_changed()     # writes through .data: the inference graphs' folded copies

    def clip_gradients(self, diffs):
        """Scale all diffs by clip/norm when their global L2 norm exceeds clip_gradients; returns
        the norm when it clipped, else None."""
        clip = float(np.float32(self.param.clip_gradients))
        if clip < 0:
            return None
        norm = float(np.float32(np.sqrt(sum(float(d.double().pow(2).sum()) for d in diffs))))
        if norm <= clip:
            return None
        scale = float(np.float32(clip) / np.float32(norm))
        if self.rank == 0:
            log.info(f"Gradient clipping: scaling down gradients (L2 norm {fmt(norm)} > {fmt(clip)}) "
                     f"by scale factor {fmt(scale)}")
        for d in diffs:
            d.mul_(scale)
        self.last_clip_norm = norm
        return norm

    # ------------------------------------------------------------------ testing
    def test_all(self):
        """Run every test net (Solver::TestAll); returns one {output: mean} dict per test net."""
        return [self.test(i) for i in range(len(self.test_nets))]

    @torch.no_grad()
    def test(self, index=0):
        """Solver::Test: share the trained blobs, run test_iter[index] forward passes, log and
        return the mean of every output element ({name: float or array})."""
        net = self.test_nets[index]
        log.info(f"Iteration {self.iter}, Testing net (#{index})")
        self._share_trained_layers(net)
        iterations = self.param.test_iter[index]
        totals, loss = {}, 0.0
        outputs = sorted(set(net.outputs) | set(net.loss_weights))
        for i in range(iterations):
            self._check_time(f"while testing net #{index} at iteration {self.iter}, after {i} "
                             f"of {iterations} test passes")
            feed = {}
            if net.input_names:
                if self.test_inputs is None:
                    raise SolverError(f"{self.where}: test net #{index} has inputs "
                                      f"{', '.join(net.input_names)}: pass Solver(test_inputs=...)")
                feed = self.test_inputs(index, i)
            out = net.forward(outputs=outputs, **feed)
            if self.param.test_compute_loss:
                total = net.loss(out)
                loss += float(total) if total is not None else 0.0
            for name in net.outputs:
                value = out[name].detach().to(torch.float64).cpu()
                totals[name] = value if name not in totals else totals[name] + value
        if self.param.test_compute_loss:
            log.info(f"Test loss: {fmt(loss / max(iterations, 1))}")
        means, index_out = {}, 0
        for name in net.outputs:
            if name not in totals:
                continue
            mean = totals[name] / iterations
            weight = net.loss_weights.get(name, 0.0)
            for value in mean.reshape(-1).tolist():
                log.info(f"    Test net output #{index_out}: {name} = {fmt(value)}"
                         f"{loss_note(weight, value)}")
                index_out += 1
            means[name] = float(mean) if mean.numel() == 1 else mean.numpy()
        return means

    def _share_trained_layers(self, test_net):
        """Net::ShareTrainedLayersWith: each train layer, in order, gives its blobs' data to the
        first test layer of the same name (so with duplicate train names the last one wins)."""
        first_in_test = first_records_by_name(test_net)
        for source in self.net.records:
            target = first_in_test.get(source.name)
            if target is None:
                continue
            train_blobs, test_blobs = source.module.caffe_blobs(), target.module.caffe_blobs()
            if len(train_blobs) != len(test_blobs):
                raise SolverError(f"layer {source.name}: the test net has {len(test_blobs)} blobs, "
                                  f"the train net {len(train_blobs)}")
            for i, (mine, theirs) in enumerate(zip(test_blobs, train_blobs)):
                if mine.shape != theirs.shape:
                    raise SolverError(f"layer {source.name} blob {i}: shape {tuple(mine.shape)} in "
                                      f"the test net, {tuple(theirs.shape)} in the train net")
                mine.data = theirs.data
        parameters_changed()     # the test net now reads the train net's storage

    # ------------------------------------------------------------------ whole runs
    def solve(self, resume_file=None, inputs=None, stop_iter=None):
        """Solver::Solve: optionally restore, step to max_iter (testing, displaying and
        snapshotting as configured), snapshot after training, final display and test.
        inputs: as for step() (None for nets with data layers); stop_iter: stop there instead
        of at max_iter (the "poly" schedule still uses max_iter)."""
        log.info(f"Solving {self.net.name}")
        log.info(f"Learning Rate Policy: {self.param.lr_policy}")
        self.requested_early_exit, self.stopped_by = False, None
        if resume_file is not None:
            self.restore(resume_file)
        start_iter = self.iter
        stop_iter = self.param.max_iter if stop_iter is None else int(stop_iter)
        limits.check(stop_iter, "iterations", "the last iteration", self.where)
        bar = ProgressBar(stop_iter - start_iter, enabled=None if self.progress else False)
        bar.update(0)
        own_clock = self._deadline is None and self.max_seconds is not None
        if own_clock:
            self._deadline = time.monotonic() + self.max_seconds
        try:
            self.step(max(0, stop_iter - self.iter), inputs, _progress=_Offset(bar, start_iter))
        finally:
            bar.close()
            if own_clock:
                self._deadline = None
        p = self.param
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.checked_snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0 and self.rank == 0:
            with torch.no_grad():
                out = self.net.forward(outputs=self._train_outputs(), **self._feed(inputs))
                total = self.net.loss(out)
            self._update_smoothed_loss(float(total) if total is not None else 0.0, start_iter)
            log.info(f"Iteration {self.iter}, loss = {fmt(self._smoothed_loss)}")
        if p.test_interval and self.iter % p.test_interval == 0 and self.rank == 0:
            self.test_all()
        log.info("Optimization Done.")

    # ------------------------------------------------------------------ snapshots
    def snapshot(self):
        """Write <prefix>_iter_<iter>.caffemodel and .solverstate (each atomically); returns the
        two paths."""
        if self.snapshot_prefix is None:
            raise SolverError(f"{self.where}: cannot snapshot: snapshot_prefix is not set")
        base = f"{self.snapshot_prefix}_iter_{self.iter}"
        model_file, state_file = base + ".caffemodel", base + ".solverstate"
        log.info(f"Snapshotting to binary proto file {model_file}")
        weights = self.net.to_weights_proto()
        if self.param.snapshot_diff:
            self._add_diffs(weights)
        self._replace(model_file, weights.SerializeToString())
        log.info(f"Snapshotting solver state to binary proto file {state_file}")
        self._replace(state_file, self.solver_state(model_file).SerializeToString())
        return model_file, state_file

    @staticmethod
    def _replace(path, data):
        # Caffe replaces a snapshot of the same name (a rerun, a resumed run); we do too, but say so
        if atomic_write(path, data, overwrite=True):
            log.warning(f"Replaced the existing file {path}")

    def _add_diffs(self, weights):
        by_name = first_records_by_name(self.net)
        for layer in weights.layer:
            record = by_name.get(layer.name)
            blobs = record.module.caffe_blobs() if record is not None else []
            for blob, param in zip(layer.blobs, blobs):
                diff = param.grad if param.grad is not None else torch.zeros_like(param)
                blob.diff.extend(diff.detach().cpu().to(torch.float32).reshape(-1).tolist())

    def solver_state(self, learned_net=""):
        """The SolverState message (iter, learned_net, history, current_step)."""
        state = caffe_pb2.SolverState(iter=self.iter, learned_net=learned_net,
                                      current_step=self.current_step)
        for h in self.history:
            blob = caffe_proto.array_to_blob(h.detach().cpu().numpy())
            blob.shape.SetInParent()   # Caffe writes `shape {}` for a 0-axis blob too
            state.history.add().CopyFrom(blob)
        return state

    def restore(self, state_file):
        """Continue from a .solverstate (ours or the original Caffe's): iter, current_step,
        history, and the weights of its learned_net."""
        state_file = os.fspath(state_file)
        if state_file.endswith(".h5"):
            raise UnsupportedError(f"{state_file}: HDF5 solver states are not supported; "
                                   f"use the .solverstate (binary proto) snapshot")
        log.info(f"Restoring previous solver status from {state_file}")
        state = caffe_proto.read_solverstate(state_file)
        arrays = self._check_history(state, state_file)
        if state.learned_net:
            candidates = [state.learned_net]
            if not os.path.isabs(state.learned_net):
                candidates.append(os.path.join(os.path.dirname(os.path.abspath(state_file)),
                                               state.learned_net))
            found = next((c for c in candidates if os.path.isfile(c)), None)
            if found is None:
                raise SolverError(f"{state_file}: learned_net {state.learned_net!r} not found "
                                  f"(looked in {' and '.join(repr(os.path.abspath(c)) for c in candidates)})")
            report = self.net.load_weights(found)
            for name in report.not_in_net:
                log.info(f"Ignoring source layer {name}")
            _log_partial(report, self.net)
        with torch.no_grad():
            for h, array in zip(self.history, arrays):
                h.copy_(torch.from_numpy(array.reshape(tuple(h.shape))))
        self.iter, self.current_step = int(state.iter), int(state.current_step)
        self._synced = False   # with several ranks, rank 0's restored state is the one kept
        log.info(f"{self.rule.TYPE}Solver: restoring history")

    def _check_history(self, state, where):
        expected = len(self.history)
        count = len(self.net.learnable_params)
        if len(state.history) != expected:
            raise SolverError(
                f"{where}: holds {len(state.history)} history blobs, but the {self.rule.TYPE} solver "
                f"of net {self.net.name!r} keeps {expected} ({self.rule.HISTORY_SETS} x "
                f"{count} learnable blobs); is it a snapshot of another net or solver type?")
        arrays = []
        for k, (blob, h) in enumerate(zip(state.history, self.history)):
            array = caffe_proto.blob_to_array(blob)
            want = tuple(h.shape)
            if not history_fits(blob, want):
                raise SolverError(
                    f"{where}: history blob {k} ({self._labels[k % count]}) has shape "
                    f"{array.shape}, the net's blob has {want}; is it a snapshot of another net?")
            arrays.append(array)
        return arrays


def _log_partial(report, net):
    """Caffe keeps the fillers of layers a weights file lacks without a word; we say which."""
    if report.not_in_weights:
        cut = (f" (the file ends after layer {report.ends_at!r}: is it cut short?)"
               if report.ends_at is not None else "")
        log.warning(f"{report.where}: {len(report.not_in_weights)} layer(s) of net "
                    f"{net.name!r} ({net.phase}) with parameters are not in the weights file and "
                    f"keep their filler values{cut}: {', '.join(report.not_in_weights)}")


class _Offset:
    """Progress adapter: the bar counts iterations since solve() started."""

    def __init__(self, bar, start):
        self.bar, self.start = bar, start

    def update(self, iteration, loss):
        self.bar.update(iteration - self.start, loss)


def _value(tensor):
    tensor = tensor.detach()
    return float(tensor) if tensor.numel() == 1 else tensor.cpu().numpy()
