"""Build a torch module from a Caffe NetParameter, the way Caffe's Net::Init does.

Order of work (SEMANTICS §11): read and upgrade the prototxt, filter layers by phase/stage/level,
declare the inputs (legacy net-level inputs and Input layers), then for each layer in order:
check its bottoms exist and its blob counts, build its module (`from_proto`), attach
parameter specs (lr/decay multipliers, sharing by name), and infer its top shapes. The result runs
as a `torch.fx.GraphModule` per requested output set: one placeholder per input blob, one
`call_module` per layer, in-place tops renamed to fresh graph values.
"""
import operator
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from segaware_caffe import caffe_proto
from segaware_caffe.caffe_proto import caffe_pb2

from .errors import NetBuildError, NoBackwardError
from .layer import BuildContext, CaffeLayer, layer_class, register_layer

PHASES = {"train": caffe_pb2.TRAIN, "test": caffe_pb2.TEST}
# layers whose backward writes every bottom diff whatever propagate_down says (SEMANTICS §2.1,
# §4.2): an upstream layer that needs backward still reads those diffs, so they are not cut
WRITES_BOTTOM_DIFFS_ALWAYS = frozenset({"Im2dist", "NormConvMeanfield"})


@register_layer("Input")
class Input(CaffeLayer):
    """BVLC's Input layer: tops are fed by the caller. The builder turns its tops into graph
    inputs; the module only records the declared (default) shapes."""
    BOTTOMS = (0, 0)
    TOPS = (1, None)

    def __init__(self, *, shapes):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]

    @classmethod
    def from_proto(cls, layer_param, ctx):
        declared = [tuple(int(d) for d in s.dim) for s in layer_param.input_param.shape]
        tops = len(ctx.top_names)
        if len(declared) not in (1, tops):
            raise ctx.error(f"input_param has {len(declared)} shapes for {tops} tops "
                            f"(expected 1 shared shape or one per top)")
        if len(declared) == 1:
            declared = declared * tops
        return cls(shapes=declared)

    def output_shapes(self, bottom_shapes):
        return list(self.shapes)

    def forward(self):  # never called: the builder wires Input tops to graph placeholders
        raise RuntimeError("Input layers are fed through Net.forward(**inputs)")


@dataclass
class LayerRecord:
    """One layer of the built net (after filtering), in Caffe order."""
    name: str
    type: str
    key: str                 # attribute name of the module under Net.layers
    bottoms: list
    tops: list
    module: CaffeLayer
    param: caffe_pb2.LayerParameter
    loss_weights: list = field(default_factory=list)


@dataclass
class WeightsReport:
    """What `load_weights` did: layers copied, net layers left at their fillers, and source layers
    that have no layer of that name in the net (Caffe ignores those silently; we report them)."""
    loaded: list
    not_in_weights: list
    not_in_net: list

    def __str__(self):
        lines = [f"loaded {len(self.loaded)} layer(s)"]
        if self.not_in_net:
            lines.append(f"ignored {len(self.not_in_net)} layer(s) of the weights file that the net "
                         f"does not have: {', '.join(self.not_in_net)}")
        if self.not_in_weights:
            lines.append(f"{len(self.not_in_weights)} net layer(s) with parameters kept their "
                         f"filler values: {', '.join(self.not_in_weights)}")
        return "; ".join(lines)


def _state_meets_rule(state, rule):
    if rule.HasField("phase") and rule.phase != state["phase"]:
        return False
    if rule.HasField("min_level") and state["level"] < rule.min_level:
        return False
    if rule.HasField("max_level") and state["level"] > rule.max_level:
        return False
    if any(s not in state["stages"] for s in rule.stage):
        return False
    if any(s in state["stages"] for s in rule.not_stage):
        return False
    return True


def filter_layers(net_param, phase, level=None, stages=()):
    """The layers Caffe keeps for this NetState (Net::FilterNet). The prototxt's own `state`
    counts, as in Caffe's Net(param_file, phase, level, stages): the given stages add to its
    stages, a given level replaces its level."""
    level = net_param.state.level if level is None else level
    state = {"phase": phase, "level": level, "stages": set(net_param.state.stage) | set(stages)}
    kept = []
    for lp in net_param.layer:
        if len(lp.include) and len(lp.exclude):
            raise NetBuildError(f"{lp.name} ({lp.type}): specify either include or exclude rules, not both")
        if len(lp.include):
            keep = any(_state_meets_rule(state, r) for r in lp.include)
        else:
            keep = not any(_state_meets_rule(state, r) for r in lp.exclude)
        if keep:
            kept.append(lp)
    return kept


def _legacy_inputs(net_param, where):
    names = list(net_param.input)
    if len(net_param.input_shape) and len(net_param.input_dim):
        raise NetBuildError(f"{where}: give net inputs either as input_shape or as input_dim, not both")
    if len(net_param.input_shape):
        if len(net_param.input_shape) != len(names):
            raise NetBuildError(f"{where}: {len(names)} inputs but {len(net_param.input_shape)} input_shape entries")
        shapes = [tuple(int(d) for d in s.dim) for s in net_param.input_shape]
    elif len(net_param.input_dim):
        if len(net_param.input_dim) != 4 * len(names):
            raise NetBuildError(f"{where}: {len(names)} inputs need {4 * len(names)} input_dim values, "
                                f"got {len(net_param.input_dim)}")
        dims = [int(d) for d in net_param.input_dim]
        shapes = [tuple(dims[4 * i:4 * i + 4]) for i in range(len(names))]
    else:
        if names:
            raise NetBuildError(f"{where}: net inputs {names} have no input_shape or input_dim")
        shapes = []
    return list(zip(names, shapes))


def _module_key(name, taken):
    key = re.sub(r"\W", "_", name) or "layer"
    if key[0].isdigit():
        key = "_" + key
    base, i = key, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    taken.add(key)
    return key


def _count_consumers(records_spec, input_names):
    """For Caffe's split naming: how many bottoms read each produced blob version."""
    producer = {name: ("input", i) for i, name in enumerate(input_names)}
    consumers = {}
    for lname, bottoms, tops, loss_weights in records_spec:
        for b in bottoms:
            key = (b, producer.get(b))
            consumers[key] = consumers.get(key, 0) + 1
        for i, t in enumerate(tops):
            producer[t] = (lname, i)
            if i < len(loss_weights) and loss_weights[i] != 0:
                consumers[(t, producer[t])] = consumers.get((t, producer[t]), 0) + 1
    return consumers


def first_records_by_name(net):
    """Caffe copies or shares a layer's blobs into the first layer of that name
    (CopyTrainedLayersFrom, ShareTrainedLayersWith): {name: that LayerRecord}, net order."""
    records = OrderedDict()
    for record in net.records:
        records.setdefault(record.name, record)
    return records


def _split_top(x):
    """One top of Caffe's Split: the same values, its own node in the autograd graph."""
    return x.view_as(x)


def _track_grad(x):
    """Make a data layer's top a leaf that records its gradient (for force_backward nets)."""
    if torch.is_grad_enabled() and x.is_floating_point() and not x.requires_grad:
        x = x.detach().requires_grad_(True)
    return x


class _RefuseGradient(torch.autograd.Function):
    """Identity forward; backward raises: the original Caffe cannot backpropagate there."""

    @staticmethod
    def forward(ctx, x, message):
        ctx.message = message
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise NoBackwardError(ctx.message)


def refuse_gradient(x, message):
    """x unchanged; a gradient flowing back into it raises NoBackwardError(message)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _RefuseGradient.apply(x, message)
    return x


class _ZeroFirstElement(torch.autograd.Function):
    """Element 0 set to 0, the gradient passed unchanged (Caffe's backward never sees it)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        if y.numel():
            y.view(-1)[0] = 0
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad


def zero_first_element(x):
    """The fork's Net::Forward sets element 0 of every net output to 0 before the layers run
    (SEMANTICS §11.6). Producers overwrite it; where no layer writes that memory (a fed input, a
    constant DummyData top, a Reshape of either) the 0 stays and every reader sees it."""
    return _ZeroFirstElement.apply(x)


class Net(nn.Module):
    """A Caffe net as a torch module.

    net = Net("deploy.prototxt", weights="model.caffemodel", phase="test", variables={...})
    out = net.forward(data=x)                       # {blob: tensor} for the net outputs
    out = net.forward(outputs=["fc8"], data=x)      # any blobs by name
    out = net.forward(outputs=["conv1@conv1"], data=x)
        # conv1 as layer conv1 wrote it, before an in-place ReLU rewrote it: its gradient is
        # what Caffe keeps as conv1's diff
    """

    def __init__(self, model, weights=None, *, phase="test", variables=None, device="cpu",
                 stages=(), level=None, fuse=True, dtype=torch.float32, overwrite=False):
        super().__init__()
        if isinstance(model, caffe_pb2.NetParameter):
            net_param, where, base_dir = model, f"net {model.name or '<NetParameter>'}", "."
        else:
            net_param = caffe_proto.read_net(model, variables=variables)
            is_path = isinstance(model, os.PathLike) or (isinstance(model, str) and "\n" not in model
                                                         and os.path.exists(model))
            where = os.fspath(model) if is_path else f"net {net_param.name or '<text>'}"
            base_dir = os.path.dirname(os.path.abspath(os.fspath(model))) if is_path else "."
        phase_key = str(phase).lower()
        if phase_key not in PHASES:
            raise NetBuildError(f"{where}: phase must be 'train' or 'test', got {phase!r}")
        self.name = net_param.name
        self.phase = phase_key.upper()
        self.force_backward = net_param.force_backward
        self.net_param = net_param
        self.layers = nn.ModuleDict()
        self.records = []
        self.input_names = []
        self.input_shapes = OrderedDict()
        self.blob_shapes = OrderedDict()      # shapes at build time (final value of each blob)
        self.loss_weights = OrderedDict()
        self.params = OrderedDict()           # Caffe layer name -> [Parameter] (first layer of a name)
        self.learnable_params = []            # owners, Caffe order
        self._graph_cache = {}
        self.fused = nn.ModuleDict()          # fused segaware convolutions (no params of their own)
        self.fused_groups = []
        self._build(net_param, where, base_dir, PHASES[phase_key], level, stages, overwrite)
        self.to(device=device, dtype=dtype)
        if fuse:
            from .fusion import fuse_segaware_convs
            fuse_segaware_convs(self)
        if weights is not None:
            report = self.load_weights(weights)
            if report.not_in_net:
                warnings.warn(str(report), stacklevel=2)

    # ------------------------------------------------------------------ building
    def _build(self, net_param, where, base_dir, phase, level, stages, overwrite):
        layer_params = filter_layers(net_param, phase, level, stages)
        shapes = OrderedDict()                 # current shape of every blob name
        for name, shape in _legacy_inputs(net_param, where):
            self._declare_input(name, shape, shapes, where)
        spec = [(lp.name, list(lp.bottom), list(lp.top), list(lp.loss_weight)) for lp in layer_params]
        self._consumers = _count_consumers(spec, list(self.input_names))
        self.loss_splits = {}                  # (layer, top index) -> name of its loss Split top
        self._auto_tops = set()                # anonymous tops: never net outputs (Caffe)
        owners = {}                            # shared param name -> (Parameter, explicit lr, explicit decay)
        taken = set()
        phase_name = caffe_pb2.Phase.Name(phase)
        for lp in layer_params:
            lname, ltype = lp.name, lp.type
            cls = layer_class(ltype, lname)
            if (cls.AUTO_TOPS or cls.IS_LOSS) and len(lp.top) < cls.TOPS[0]:
                named = lp
                lp = caffe_pb2.LayerParameter()
                lp.CopyFrom(named)
                auto = [f"(automatic) {lname} top {i}" for i in range(len(lp.top), cls.TOPS[0])]
                lp.top.extend(auto)
                self._auto_tops.update(auto)
            self._check_counts(cls, lp)
            if len(lp.propagate_down) and len(lp.propagate_down) != len(lp.bottom):
                raise NetBuildError(f"{lname} ({ltype}): propagate_down must be given for every "
                                    f"bottom or none ({len(lp.propagate_down)} given, "
                                    f"{len(lp.bottom)} bottoms)")
            missing = [b for b in lp.bottom if b not in shapes]
            if missing:
                raise NetBuildError(
                    f"{lname} ({ltype}): bottom blob {missing[0]!r} is not produced by any earlier "
                    f"layer or net input (known blobs: {', '.join(shapes) or 'none'})")
            layer_phase = caffe_pb2.Phase.Name(lp.phase) if lp.HasField("phase") else phase_name
            ctx = BuildContext(name=lname, type=ltype, phase=layer_phase,
                               bottom_shapes=[shapes[b] for b in lp.bottom],
                               bottom_names=list(lp.bottom), top_names=list(lp.top),
                               base_dir=base_dir, overwrite=overwrite)
            module = cls.from_proto(lp, ctx)
            if not isinstance(module, CaffeLayer):
                raise NetBuildError(f"{lname} ({ltype}): from_proto returned {type(module).__name__}, "
                                    f"expected a CaffeLayer")
            key = _module_key(lname, taken)
            self.layers[key] = module
            self._attach_params(lp, module, owners)
            loss_weights = self._loss_weights(lp, cls)
            # Caffe's InsertSplits: a top with an explicit loss_weight that another layer also
            # reads gets a Split whose first top carries the loss (so the loss sees the value before
            # any in-place rewrite), and the layer's own loss_weight list is cleared (defaults)
            split_weights = {i: w for i, (t, w) in enumerate(zip(lp.top, lp.loss_weight))
                             if w != 0 and self._consumers.get((t, (lname, i)), 0) > 1}
            if split_weights:
                loss_weights = [1.0 if (cls.IS_LOSS and i == 0) else 0.0 for i in range(len(lp.top))]
            record = LayerRecord(lname, ltype, key, list(lp.bottom), list(lp.top), module, lp, loss_weights)
            self.records.append(record)
            if ltype == "Input":
                for top, shape in zip(lp.top, module.shapes):
                    self._declare_input(top, shape, shapes, where)
                continue
            try:
                top_shapes = module.output_shapes(ctx.bottom_shapes)
            except NetBuildError:
                raise
            except Exception as e:  # shape errors surface here, at build time
                raise NetBuildError(f"{lname} ({ltype}): cannot compute its outputs for bottom shapes "
                                    f"{[tuple(s) for s in ctx.bottom_shapes]}: {e}") from None
            if len(top_shapes) != len(lp.top):
                raise NetBuildError(f"{lname} ({ltype}): produced {len(top_shapes)} tops, "
                                    f"the prototxt names {len(lp.top)}")
            for top, shape, w in zip(lp.top, top_shapes, loss_weights):
                shapes[top] = tuple(shape)
                self.blob_shapes[top] = tuple(shape)
                if w != 0:
                    self.loss_weights[top] = w
            for i, w in split_weights.items():
                split_top = f"{lp.top[i]}_{lname}_{i}_split_0"
                self.loss_splits[(lname, i)] = split_top
                self.blob_shapes[split_top] = tuple(top_shapes[i])
                self.loss_weights[split_top] = float(w)
        # after every layer: a sharer may have set its owner's lr_mult
        for p in self.learnable_params:
            p.requires_grad_(self.force_backward or p.lr_mult != 0)
        self.outputs = self._net_outputs()
        self._zeroed_by_forward = self._unwritten_outputs()

    def _unwritten_outputs(self):
        """Where Caffe's element-0 zeroing of net outputs survives (see zero_first_element): the
        inputs and constant-DummyData tops (as (layer, top index)) whose memory a net output is,
        following in-place layers and Reshape (which shares its bottom's memory from setup)."""
        memory = {name: name for name in self.input_names}
        unwritten = set(self.input_names)
        for r in self.records:
            if r.type == "Input":
                continue
            for i, t in enumerate(r.tops):
                if r.type == "Reshape":
                    memory[t] = memory[r.bottoms[0]]
                elif not (i < len(r.bottoms) and r.bottoms[i] == t):   # in place: same memory
                    memory[t] = (r.name, i)
                    if r.type == "DummyData" and r.module.fillers[i].type == "constant":
                        unwritten.add((r.name, i))
        return {memory[o] for o in self.outputs if o in memory} & unwritten

    def _declare_input(self, name, shape, shapes, where):
        if name in shapes:
            raise NetBuildError(f"{where}: input blob {name!r} is declared twice")
        if any(int(d) < 0 for d in shape):
            raise NetBuildError(f"{where}: input blob {name!r} is declared with a negative "
                                f"dimension, shape {tuple(shape)}")
        self.input_names.append(name)
        self.input_shapes[name] = tuple(shape)
        self.blob_shapes[name] = tuple(shape)
        shapes[name] = tuple(shape)

    @staticmethod
    def _check_counts(cls, lp):
        for what, have, (lo, hi) in (("bottom", len(lp.bottom), cls.BOTTOMS), ("top", len(lp.top), cls.TOPS)):
            if have < lo or (hi is not None and have > hi):
                want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
                raise NetBuildError(f"{lp.name} ({lp.type}): takes {want} {what} blob(s), got {have}")

    @staticmethod
    def _loss_weights(lp, cls):
        if len(lp.loss_weight):
            if len(lp.loss_weight) != len(lp.top):
                raise NetBuildError(f"{lp.name} ({lp.type}): loss_weight must be given for every top "
                                    f"or none ({len(lp.loss_weight)} given, {len(lp.top)} tops)")
            return [float(w) for w in lp.loss_weight]
        weights = [0.0] * len(lp.top)
        if cls.IS_LOSS and weights:
            weights[0] = 1.0
        return weights

    def _attach_params(self, lp, module, owners):
        blobs = module.caffe_blobs()
        if len(lp.param) > len(blobs):
            raise NetBuildError(f"{lp.name} ({lp.type}): {len(lp.param)} param {{}} specs given but the "
                                f"layer has {len(blobs)} learnable blob(s)")
        for i, blob in enumerate(blobs):
            spec = lp.param[i] if i < len(lp.param) else caffe_pb2.ParamSpec()
            lr = float(spec.lr_mult) if spec.HasField("lr_mult") else None
            decay = float(spec.decay_mult) if spec.HasField("decay_mult") else None
            if spec.name and spec.name in owners:
                owner, owner_lr, owner_decay, owner_layer = owners[spec.name]
                if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
                    ok = owner.numel() == blob.numel() and owner.shape == blob.shape
                    # a permissive share of a differently shaped blob would need a view; Caffe allows
                    # it, we do not (no released net uses it)
                    if owner.numel() == blob.numel() and owner.shape != blob.shape:
                        raise NetBuildError(f"{lp.name} ({lp.type}): sharing param {spec.name!r} with "
                                            f"shape {tuple(owner.shape)} as shape {tuple(blob.shape)} "
                                            f"(PERMISSIVE reshaping) is not supported")
                else:
                    ok = owner.shape == blob.shape
                if not ok:
                    raise NetBuildError(f"{lp.name} ({lp.type}): cannot share param {spec.name!r}: "
                                        f"owner {owner_layer} has shape {tuple(owner.shape)}, this "
                                        f"blob {i} has {tuple(blob.shape)}")
                for mine, theirs, what in ((lr, owner_lr, "lr_mult"), (decay, owner_decay, "decay_mult")):
                    if mine is not None and theirs is not None and mine != theirs:
                        raise NetBuildError(f"{lp.name} ({lp.type}): shared param {spec.name!r} has "
                                            f"{what} {mine} here but {theirs} in {owner_layer}")
                if owner_lr is None and lr is not None:
                    owner.lr_mult = lr
                if owner_decay is None and decay is not None:
                    owner.decay_mult = decay
                owners[spec.name] = (owner, owner_lr if owner_lr is not None else lr,
                                     owner_decay if owner_decay is not None else decay, owner_layer)
                module.set_caffe_blob(i, owner)
                continue
            blob.lr_mult = 1.0 if lr is None else lr
            blob.decay_mult = 1.0 if decay is None else decay
            if spec.name:
                owners[spec.name] = (blob, lr, decay, lp.name)
            self.learnable_params.append(blob)
        self.params.setdefault(lp.name, module.caffe_blobs())

    def _net_outputs(self):
        """Blobs no later layer consumes (Caffe's available-blob walk: each layer removes its
        bottoms, then adds its tops, so an in-place last layer's blob is an output), sorted;
        anonymous (automatic) tops are left out, as Caffe does."""
        available = set(self.input_names)
        for r in self.records:
            available.difference_update(r.bottoms)
            available.update(r.tops)
            available.update(self.loss_splits.get((r.name, i)) for i in range(len(r.tops))
                             if (r.name, i) in self.loss_splits)
        return sorted(available - self._auto_tops)

    # ------------------------------------------------------------------ running
    @property
    def blob_names(self):
        return list(self.blob_shapes)

    def graph_module(self, outputs=None):
        """The fx.GraphModule computing `outputs` (default: the net outputs) from the inputs."""
        outputs = tuple(self.outputs if outputs is None else outputs)
        cached = self._graph_cache.get(outputs)
        if cached is not None:
            return cached
        graph = fx.Graph()
        env = {}
        for name in self.input_names:
            env[name] = graph.placeholder(re.sub(r"\W", "_", name))
            if name in self._zeroed_by_forward:
                env[name] = graph.call_function(zero_first_element, (env[name],))
        aliases = {}
        producer = {name: ("input", i) for i, name in enumerate(self.input_names)}
        seen = {}
        # a fused group runs unfused when one of its intermediate blobs is asked for
        requested = {name.rsplit("@", 1)[0] for name in outputs}
        active = [g for g in self.fused_groups if not g.intermediates & requested]
        skipped = {k for g in active for k in g.record_keys}
        anchors = {g.key: g for g in active}
        for r in self.records:
            if r.type == "Input":
                for i, t in enumerate(r.tops):
                    producer[t] = (r.name, i)
                continue
            args = []
            for b in r.bottoms:
                key = (b, producer.get(b))
                arg = env.get(b)
                if b in env and self._consumers.get(key, 0) > 1:   # Caffe inserts a Split here
                    src_layer, idx = producer[b]
                    k = seen.get(key, 0)
                    seen[key] = k + 1
                    # a view per consumer: its gradient is that consumer's share, Caffe's split diff
                    arg = graph.call_function(_split_top, (env[b],))
                    aliases[f"{b}_{src_layer}_{idx}_split_{k}"] = arg
                args.append(arg)
            if r.key in skipped:
                group = anchors.get(r.key)
                if group is not None:
                    env[group.conv_top] = graph.call_module(
                        f"fused.{group.key}", (env[group.x_blob], env[group.mask_blob]))
                    producer[group.conv_top] = (r.name, 0)
                    aliases[f"{group.conv_top}@{r.name}"] = env[group.conv_top]
                    self._alias_loss_split(graph, r, 0, env, aliases, seen)
                continue
            if not self.force_backward and r.type not in WRITES_BOTTOM_DIFFS_ALWAYS:
                # propagate_down: false gives that bottom no diff (force_backward overrides it)
                args = [a if keep else graph.call_function(torch.detach, (a,))
                        for a, keep in zip(args, list(r.param.propagate_down) or [True] * len(args))]
            args = [self._refusing(graph, r, i, a) for i, a in enumerate(args)]
            node = graph.call_module(f"layers.{r.key}", tuple(args))
            if len(r.tops) == 1:
                env[r.tops[0]] = node
            else:
                for i, t in enumerate(r.tops):
                    env[t] = graph.call_function(operator.getitem, (node, i))
            for i, t in enumerate(r.tops):
                if (r.name, i) in self._zeroed_by_forward:
                    env[t] = graph.call_function(zero_first_element, (env[t],))
            if self.force_backward and not r.bottoms:
                # force_backward: every blob gets a diff, also those of data layers (DummyData)
                for t in r.tops:
                    env[t] = graph.call_function(_track_grad, (env[t],))
            for i, t in enumerate(r.tops):
                producer[t] = (r.name, i)
                aliases[f"{t}@{r.name}"] = env[t]   # this version, before in-place rewrites
                self._alias_loss_split(graph, r, i, env, aliases, seen)
        result = {}
        for name in outputs:
            if name in env:
                result[name] = env[name]
            elif name in aliases:
                result[name] = aliases[name]
            else:
                raise KeyError(f"net {self.name or ''}: no blob named {name!r} (or BLOB@LAYER: "
                               f"a blob as LAYER wrote it); blobs are {', '.join(self.blob_names)}")
        graph.output(result)
        graph.lint()
        gm = fx.GraphModule(self, graph, class_name=re.sub(r"\W", "_", self.name or "CaffeNet"))
        self._graph_cache[outputs] = gm
        return gm

    def _refusing(self, graph, record, index, arg):
        """A bottom the original cannot backpropagate into gets a node that raises if a gradient
        reaches it (propagate_down: false has already detached it where the prototxt says so)."""
        cls = type(record.module)
        if not cls.refuses_gradient(index, len(record.bottoms)):
            return arg
        pd = list(record.param.propagate_down)
        if pd and not pd[index] and not self.force_backward:
            return arg
        if self.force_backward and record.bottoms[index] in self.input_names:
            # a fed input only needs a gradient because of force_backward, which Caffe does not
            # force into the bottoms a layer refuses (LossLayer::AllowForceBackward)
            return graph.call_function(torch.detach, (arg,))
        what = ("has no backward in the original Caffe" if not cls.HAS_BACKWARD else
                f"cannot backpropagate into bottom {index} ({record.bottoms[index]!r}) in the "
                f"original Caffe")
        message = (f"{record.name} ({record.type}) {what}, but a gradient was asked of "
                   f"{record.bottoms[index]!r}; set propagate_down: false for that bottom, or keep "
                   f"learnable layers from feeding it")
        return graph.call_function(refuse_gradient, (arg, message))

    def _alias_loss_split(self, graph, record, index, env, aliases, seen):
        """The loss Split of a top (if any) holds the value just produced; readers get split 1.."""
        split_top = self.loss_splits.get((record.name, index))
        if split_top is not None:
            aliases[split_top] = graph.call_function(_split_top, (env[record.tops[index]],))
            seen[(record.tops[index], (record.name, index))] = 1

    def forward(self, outputs=None, **inputs):
        unknown = [k for k in inputs if k not in self.input_names]
        if unknown:
            raise KeyError(f"net {self.name or ''}: {unknown[0]!r} is not an input of this net "
                           f"(inputs: {', '.join(self.input_names) or 'none'})")
        missing = [k for k in self.input_names if k not in inputs]
        if missing:
            raise KeyError(f"net {self.name or ''}: input {missing[0]!r} not given "
                           f"(inputs: {', '.join(self.input_names)})")
        param = next(self.parameters(), None)
        args = []
        for name in self.input_names:
            x = inputs[name]
            if not isinstance(x, torch.Tensor):
                x = torch.as_tensor(np.asarray(x))
            if param is not None and x.is_floating_point():
                x = x.to(device=param.device, dtype=param.dtype)
            args.append(x)
        return self.graph_module(outputs)(*args)

    def loss(self, outputs):
        """Caffe's net loss: sum over loss tops of weight * sum(top)."""
        total = None
        for top, w in self.loss_weights.items():
            term = w * outputs[top].sum()
            total = term if total is None else total + term
        return total

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights):
        """Copy blobs from a .caffemodel (path, bytes or NetParameter) into layers of the same
        name (the first one, like Caffe). Shapes must match exactly, or after right-aligning into
        4-D for legacy num/channels/height/width blobs. Returns a WeightsReport."""
        source = weights if isinstance(weights, caffe_pb2.NetParameter) else caffe_proto.read_weights(weights)
        where = weights if isinstance(weights, (str, os.PathLike)) else "weights"
        by_name = first_records_by_name(self)
        loaded, not_in_net = [], []
        for src in list(source.layer) + list(source.layers):
            target = by_name.get(src.name)
            if target is None:
                if len(src.blobs):
                    not_in_net.append(src.name)
                continue
            params = target.module.caffe_blobs()
            if len(src.blobs) == 0 and not params:
                continue
            if len(src.blobs) != len(params):
                raise NetBuildError(f"{where}: layer {src.name} ({target.type}) has {len(src.blobs)} "
                                    f"blob(s) in the weights file, the net expects {len(params)}")
            for i, (blob, p) in enumerate(zip(src.blobs, params)):
                arr = caffe_proto.blob_to_array(blob)
                legacy = not blob.HasField("shape")
                want = tuple(p.shape)
                if arr.shape != want:
                    padded = (1,) * (4 - len(want)) + want if len(want) <= 4 else want
                    if not (legacy and arr.shape == padded):
                        raise NetBuildError(
                            f"{where}: layer {src.name} ({target.type}) blob {i} has shape "
                            f"{arr.shape} in the weights file, the net expects {want}")
                with torch.no_grad():
                    p.copy_(torch.from_numpy(arr.reshape(want)))
            if src.name not in loaded:   # a repeated name in the file overwrites, as in Caffe
                loaded.append(src.name)
        # only the first net layer of a name is loaded (Caffe); later namesakes keep their fillers
        not_in_weights = [r.name for r in self.records
                          if r.module.caffe_blobs() and (r.name not in loaded or by_name[r.name] is not r)]
        return WeightsReport(loaded, not_in_weights, not_in_net)

    def to_weights_proto(self):
        """A NetParameter like Caffe's Net::ToProto: every layer (with its definition) and its
        blobs in Caffe order."""
        out = caffe_pb2.NetParameter()
        out.name = self.name
        for r in self.records:
            lp = out.layer.add()
            lp.CopyFrom(r.param)
            del lp.blobs[:]
            for p in r.module.caffe_blobs():
                arr = p.detach().to("cpu", torch.float32).numpy()
                lp.blobs.add().CopyFrom(caffe_proto.array_to_blob(arr))
        return out

    def save_weights(self, path, overwrite=False):
        caffe_proto.write_weights(self.to_weights_proto(), path, overwrite=overwrite)

    def extra_repr(self):
        return f"name={self.name!r}, phase={self.phase}, layers={len(self.records)}"
