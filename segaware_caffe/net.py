"""Build a torch module from a Caffe net, the way Caffe's Net::Init does, and run it as an fx graph.

Building (`Net.__init__`): `canonical.canonical_net` turns what the caller gave into the
NetParameter Caffe builds (upgraded, legacy inputs as an Input layer, filtered by the NetState,
Split layers inserted); then for each of its layers in order: check its blob counts and that its
bottoms exist, add anonymous tops where the type creates them (Caffe's AutoTopBlobs), build its
module (`from_proto`, the only reader of its `*_param`), attach parameter specs (lr/decay
multipliers, sharing by name) and infer its top shapes. After the last layer: the net outputs
(Caffe's available-blob walk), which diffs Caffe computes (`backward.analyse`) and where the
fork's element-0 zeroing of net outputs survives.

Running (`Net.graph_module`): one `torch.fx.GraphModule` per requested output set, the only
interpreter of a net: `forward` calls it, `export --python` writes its nodes out as source and
`segaware-caffe time` runs it node by node. Its nodes: one placeholder per input blob; one
`call_module` per layer (Split layers included: each of their tops is a view of its own, so each
top's gradient is its reader's share, Caffe's split diff); `getitem` for layers with several tops;
and the helper functions below, each a rule of the original: `zero_first_element`,
`torch.detach` (no diff computed there), `refuse_gradient` (on the tops of a layer whose
Backward would be asked a diff it refuses), `track_grad` (force_backward gives data layers' tops
a diff); a fused segmentation-aware
convolution (see fusion.py) is one `call_module` of `fused.<key>`.
"""
import keyword
import operator
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from segaware_caffe.caffe_proto import caffe_pb2

from . import backward, budget as _budget, layers as _layers  # noqa: F401  (importing layers registers every type)
from .canonical import FROM_PROTOTXT, canonical_net
from .errors import NetBuildError
from .fillers import deferred_fills
from .layer import BuildContext, CaffeLayer, layer_class
from .layers.input import Input  # noqa: F401  (where it lived before: segaware_caffe.net.Input)
from .weights import WeightsFile, WeightsReport, blob_attributes, copy_weights, \
    first_records_by_name, net_layers_proto, parameter_blobs

__all__ = ["LayerRecord", "Net", "WeightsReport", "first_records_by_name", "refuse_gradient",
           "track_grad", "zero_first_element"]


@dataclass
class LayerRecord:
    """One layer of the built net, in Caffe order (Split layers and the Input layer of legacy
    inputs included; `origin` says where a layer comes from, see canonical.py)."""
    name: str
    type: str
    key: str                 # attribute name of the module under Net.layers
    bottoms: list
    tops: list               # the prototxt's tops, then any anonymous (automatic) ones
    module: CaffeLayer
    param: caffe_pb2.LayerParameter     # the layer as Caffe builds it (canonical NetParameter)
    loss_weights: list = field(default_factory=list)
    origin: str = FROM_PROTOTXT


def _identifier(name, taken):
    """A unique Python identifier from a Caffe name (fx writes module attributes and
    placeholders into generated code): other characters become `_`, a keyword gets a `_`."""
    key = re.sub(r"\W", "_", name) or "layer"
    if key[0].isdigit():
        key = "_" + key
    if keyword.iskeyword(key):
        key += "_"
    base, i = key, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    taken.add(key)
    return key


# ---------------------------------------------------------------------------- graph helpers
# track_grad, _RefuseGradient and refuse_gradient use torch only: `export --python` writes their
# source into exported modules, which must run without segaware_caffe.
def track_grad(x):
    """A data layer's top as a leaf that records its gradient (force_backward nets)."""
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
        try:   # segaware_caffe's own error where it is installed (an exported module's copy)
            from segaware_caffe.errors import NoBackwardError
        except ImportError:
            NoBackwardError = RuntimeError
        raise NoBackwardError(ctx.message)


def refuse_gradient(top, refusals):
    """A top of a layer that refuses some bottoms' gradients, `refusals` = ((bottom, message),
    ...). When a refused bottom requires grad, Caffe's Backward of the layer would be asked for
    its diff and abort: the top then carries a node whose backward raises NoBackwardError(that
    bottom's message) -- also when the layer's forward gives the top no autograd history (an
    index or comparison), since Caffe calls the layer's Backward all the same."""
    if not (torch.is_grad_enabled() and top.is_floating_point()):
        return top
    for bottom, message in refusals:
        if isinstance(bottom, torch.Tensor) and bottom.requires_grad:
            source = top if top.requires_grad else top.detach().requires_grad_(True)
            return _RefuseGradient.apply(source, message)
    return top


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
    """The fork's Net::Forward sets element 0 of every net output to 0 before the layers run.
    Producers overwrite it; where no layer writes that memory (a fed input, a constant DummyData
    top, a Reshape of either) the 0 stays and every reader of the memory sees it.

    What the builder reproduces is Caffe's first pass. Split and Flatten tops take their bottom's
    memory only when their Forward runs, after the zeroing, so on the first pass the 0 lands in
    memory they then drop; on later passes Caffe's outputs that share an input's memory through
    them would show the 0 too (a Net keeps no state between passes)."""
    return _ZeroFirstElement.apply(x)


def refusal_message(record, index):
    """What refuse_gradient says when bottom `index` of `record` would be asked for a diff."""
    module = record.module
    if module.has_backward():
        what = (f"cannot backpropagate into bottom {index} ({record.bottoms[index]!r}) in the "
                f"original Caffe")
    else:
        what = _no_backward(module)
    return (f"{record.name} ({record.type}) {what}, but a gradient was asked of "
            f"{record.bottoms[index]!r}; set propagate_down: false for that bottom, or keep "
            f"learnable layers from feeding it")


def blob_refusal_message(record):
    """What refuse_gradient says when a learnable blob of a layer without backward trains."""
    return (f"{record.name} ({record.type}) {_no_backward(record.module)}, but a gradient was "
            f"asked of its learnable blobs; set their lr_mult to 0, or keep the loss from "
            f"depending on the layer")


def _no_backward(module):
    if module.HAS_BACKWARD:          # the type has a backward, this configuration has none
        return f"has no backward in the original Caffe as configured ({module.extra_repr()})"
    return "has no backward in the original Caffe"


class Net(nn.Module):
    """A Caffe net as a torch module.

    net = Net("deploy.prototxt", weights="model.caffemodel", phase="test", variables={...})
    out = net.forward(data=x)                       # {blob: tensor} for the net outputs
    out = net.forward(outputs=["fc8"], data=x)      # any blobs by name
    out = net.forward(outputs=["conv1@conv1"], data=x)
        # conv1 as layer conv1 wrote it, before an in-place ReLU rewrote it: its gradient is
        # what Caffe keeps as conv1's diff
    Net("deploy.prototxt", input_shapes={"data": (1, 3, 513, 513)})   # other declared shapes

    model: a .prototxt path, prototxt text, a NetParameter, or a canonical.NetSource.
    max_bytes: the memory budget of the build (bytes or a size such as "8G"; default: the
    command line's --max-memory, $SEGAWARE_MAX_BYTES, else half of the memory this process may
    use). Learnable blobs, every top blob and the layers' forward temporaries are counted
    before anything is allocated; a net that needs more raises MemoryBudgetError naming the
    layer and the shape (see segaware_caffe.budget); a MemoryBudget shares one budget between
    nets. `memory_bytes` is what the build counted (learnable blobs, buffers and top blobs,
    `top_bytes` of it the tops).
    """

    def __init__(self, model, weights=None, *, phase="test", variables=None, device="cpu",
                 stages=(), level=None, fuse=True, dtype=torch.float32, overwrite=False,
                 input_shapes=None, inference=True, max_bytes=None):
        super().__init__()
        self.inference = inference
        canonical = canonical_net(model, variables=variables, phase=phase, level=level,
                                  stages=stages, input_shapes=input_shapes)
        param = canonical.param
        self.name = param.name
        self.where = canonical.where
        self.phase = canonical.phase
        self.force_backward = param.force_backward
        self.net_param = param
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
        # the dtype and device floating inputs are cast to: an empty buffer, so that .to() moves
        # it with the parameters, also in a net that has none
        self.register_buffer("_feed_like", torch.zeros(0, dtype=dtype), persistent=False)
        # one budget may be shared by several nets (a solver's train and test nets)
        self.budget = max_bytes if isinstance(max_bytes, _budget.MemoryBudget) else \
            _budget.MemoryBudget(max_bytes, where=f"net {self.name!r}" if self.name else "net")
        self.top_bytes = 0                    # the top blobs' share of memory_bytes
        start = self.budget.used
        weights = self._read_weights(weights)
        self._build(canonical, overwrite, torch.empty((), dtype=dtype).element_size(), weights)
        self.memory_bytes = self.budget.used - start
        self.to(device=device, dtype=dtype)
        if fuse:
            from .fusion import fuse_segaware_convs
            fuse_segaware_convs(self)
        if weights is not None:
            report = self.load_weights(weights)
            if report.not_in_net or report.not_in_weights:
                # partial weights (net layers the file lacks) and ignored file layers: Caffe is
                # silent about both; a cut or mismatched file should not go unnoticed
                warnings.warn(str(report), stacklevel=2)

    # ------------------------------------------------------------------ building
    @staticmethod
    def _read_weights(weights):
        """The weights file parsed before the layers are set up, so that the fillers of the
        layers it sets need not run; a file that does not parse is left to load_weights, which
        reports it after the net is built (as before)."""
        if weights is None:
            return None
        try:
            return WeightsFile.of(weights)
        except Exception:   # noqa: BLE001  (re-raised by load_weights, with its own message)
            return weights

    def _build(self, canonical, overwrite, itemsize, weights=None):
        param, where = canonical.param, canonical.where
        # layers whose blobs the weights file sets (the first net layer of each name)
        loaded = ({layer.name for layer in weights.layers if len(layer.blobs)}
                  if isinstance(weights, WeightsFile) else set())
        seen_names = set()
        shapes = OrderedDict()                 # current shape of every blob name
        self._auto_tops = set()                # anonymous tops: never net outputs (Caffe)
        owners = {}                            # shared param name -> (Parameter, lr, decay, layer)
        # attribute keys: the prototxt's layers first, so inserted layers never take their names
        taken, keys = set(), {}
        for first in (True, False):
            for index, (lp, origin) in enumerate(zip(param.layer, canonical.origins)):
                if (origin == FROM_PROTOTXT) == first:
                    keys[index] = _identifier(lp.name, taken)
        for index, (lp, origin) in enumerate(zip(param.layer, canonical.origins)):
            lname, ltype = lp.name, lp.type
            cls = layer_class(ltype, lname)
            tops = list(lp.top)
            if (cls.AUTO_TOPS or cls.IS_LOSS) and len(tops) < cls.TOPS[0]:
                auto = [f"(automatic) {lname} top {i}" for i in range(len(tops), cls.TOPS[0])]
                tops += auto
                self._auto_tops.update(auto)
            self._check_counts(cls, lp, len(tops))
            if len(lp.propagate_down) and len(lp.propagate_down) != len(lp.bottom):
                raise NetBuildError(f"{lname} ({ltype}): propagate_down must be given for every "
                                    f"bottom or none ({len(lp.propagate_down)} given, "
                                    f"{len(lp.bottom)} bottoms)")
            missing = [b for b in lp.bottom if b not in shapes]
            if missing:
                raise NetBuildError(
                    f"{lname} ({ltype}): bottom blob {missing[0]!r} is not produced by any earlier "
                    f"layer or net input (known blobs: {', '.join(shapes) or 'none'})")
            ctx = BuildContext(name=lname, type=ltype, phase=caffe_pb2.Phase.Name(lp.phase),
                               bottom_shapes=[shapes[b] for b in lp.bottom],
                               bottom_names=list(lp.bottom), top_names=tops,
                               base_dir=canonical.source.base_dir, overwrite=overwrite,
                               weights_follow=lname in loaded and lname not in seen_names)
            seen_names.add(lname)
            label = f"{lname} ({ltype})"
            with deferred_fills() as fills:   # blobs are written once sharing is known
                with _budget.building(self.budget, label, lname, ltype):
                    module = cls.from_proto(lp, ctx)
                if not isinstance(module, CaffeLayer):
                    raise NetBuildError(f"{lname} ({ltype}): from_proto returned "
                                        f"{type(module).__name__}, expected a CaffeLayer")
                self.layers[keys[index]] = module
                self._attach_params(lp, module, owners)
                fills.materialise(module)
            loss_weights = self._loss_weights(lp, cls, len(tops))
            self.records.append(LayerRecord(lname, ltype, keys[index], list(lp.bottom), tops,
                                            module, lp, loss_weights, origin))
            if cls.NET_INPUT:
                top_shapes = module.output_shapes([])
                for top, shape in zip(tops, top_shapes):
                    if any(int(d) < 0 for d in shape):
                        raise NetBuildError(f"{where}: input blob {top!r} is declared with a "
                                            f"negative dimension, shape {tuple(shape)}")
                    self.input_names.append(top)
                    self.input_shapes[top] = tuple(shape)
            else:
                top_shapes = self._top_shapes(module, ctx, lname, ltype)
            if len(top_shapes) != len(tops):
                raise NetBuildError(f"{lname} ({ltype}): produced {len(top_shapes)} tops, "
                                    f"the prototxt names {len(tops)}")
            self._charge_tops(module, lp, tops, ctx.bottom_shapes, top_shapes, itemsize, label)
            for top, shape, w in zip(tops, top_shapes, loss_weights):
                shapes[top] = tuple(shape)
                self.blob_shapes[top] = tuple(shape)
                if w != 0:
                    self.loss_weights[top] = w
        # after every layer: a sharer may have set its owner's lr_mult
        for p in self.learnable_params:
            p.requires_grad_(self.force_backward or p.lr_mult != 0)
        self.outputs = self._net_outputs()
        self.backward_plan = backward.analyse(self.records, self.force_backward)
        self._zeroed = self._unwritten_outputs()

    def _charge_tops(self, module, lp, tops, bottom_shapes, top_shapes, itemsize, label):
        """Charge a layer's new top blobs to the budget (Caffe keeps every blob of a net at
        once), then check its forward temporaries against what is left. In-place tops and tops
        that are views of the bottom (Split, Reshape, Flatten) take no new memory."""
        for index, (top, shape) in enumerate(zip(tops, top_shapes)):
            if any(int(d) < 0 for d in shape):
                raise NetBuildError(f"{label}: top {top!r} would have shape {tuple(shape)}: a "
                                    f"negative dimension (the settings do not fit the bottom "
                                    f"shapes {[tuple(s) for s in bottom_shapes]})")
            if len(shape) >= 2 and any(int(d) == 0 for d in shape[1:]):
                # an empty batch is fine (every layer handles N = 0); other empty axes are not
                raise NetBuildError(f"{label}: top {top!r} would have shape {tuple(shape)}: an "
                                    f"empty axis other than the first (batch) axis is not "
                                    f"supported")
            shares = lp.type == "Split" or type(module).SHARES_BOTTOM_DATA or \
                lp.type == "Flatten" or top in lp.bottom
            if 0 in shape:
                # an empty batch takes no memory, but its layers' temporaries (and torch's
                # stride arithmetic) scale with the other axes: one item must fit
                one = tuple(max(int(d), 1) for d in shape)
                self.budget.check(_budget.nbytes(one, itemsize),
                                  f"top {top!r} of shape {tuple(shape)} (one item of it)", label)
            if not shares:
                self.budget.reserve_shape(shape, itemsize, f"top {top!r}", label)
                self.top_bytes += _budget.nbytes(shape, itemsize)
        extra = int(module.forward_workspace([tuple(s) for s in bottom_shapes],
                                             [tuple(s) for s in top_shapes], itemsize) or 0)
        if extra:
            self.budget.check(extra, "the temporaries of its forward pass", label)

    @staticmethod
    def _top_shapes(module, ctx, lname, ltype):
        try:
            return module.output_shapes(ctx.bottom_shapes)
        except NetBuildError:
            raise
        except Exception as e:  # shape errors surface here, at build time
            raise NetBuildError(f"{lname} ({ltype}): cannot compute its outputs for bottom shapes "
                                f"{[tuple(s) for s in ctx.bottom_shapes]}: {e}") from None

    def _unwritten_outputs(self):
        """Where the element-0 zeroing of net outputs survives (see zero_first_element): the
        memories no layer writes (fed inputs by name, constant tops as (record index, top
        index)) that some net output is when Net::Forward starts. A top is new memory, except in
        place (its bottom's) or where the layer shares its bottom's memory from set-up on
        (SHARES_BOTTOM_DATA)."""
        memory, unwritten = {}, set()
        for index, r in enumerate(self.records):
            for i, t in enumerate(r.tops):
                if r.module.NET_INPUT:
                    memory[t] = t
                    unwritten.add(t)
                elif r.bottoms and r.module.top_shares_bottom(i, len(r.bottoms)):
                    memory[t] = memory[r.bottoms[0]]
                elif not (i < len(r.bottoms) and r.bottoms[i] == t):   # in place: same memory
                    memory[t] = (index, i)
                    if r.module.constant_top(i):
                        unwritten.add((index, i))
        return {memory[o] for o in self.outputs if o in memory} & unwritten

    @staticmethod
    def _check_counts(cls, lp, num_tops):
        for what, have, (lo, hi) in (("bottom", len(lp.bottom), cls.BOTTOMS), ("top", num_tops, cls.TOPS)):
            if have < lo or (hi is not None and have > hi):
                want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
                raise NetBuildError(f"{lp.name} ({lp.type}): takes {want} {what} blob(s), got {have}")

    @staticmethod
    def _loss_weights(lp, cls, num_tops):
        """Caffe's Layer::SetLossWeights: the layer's loss_weight list (one per top, or none);
        by default 1 on a loss layer's first top and 0 elsewhere."""
        if len(lp.loss_weight):
            if len(lp.loss_weight) != num_tops:
                raise NetBuildError(f"{lp.name} ({lp.type}): loss_weight must be given for every top "
                                    f"or none ({len(lp.loss_weight)} given, {num_tops} tops)")
            return [float(w) for w in lp.loss_weight]
        weights = [0.0] * num_tops
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
        available = set()
        for r in self.records:
            available.difference_update(r.bottoms)
            available.update(r.tops)
        return sorted(available - self._auto_tops)

    @property
    def backward_flags(self):
        """Caffe's own backward flags for this net (backward.analyse, exact: the loss tops decide
        what contributes, fed inputs need no diff unless force_backward), per layer of
        `records`: what Caffe logs as "needs backward computation"."""
        return backward.analyse(self.records, self.force_backward, exact=True)

    # ------------------------------------------------------------------ running
    @property
    def blob_names(self):
        return list(self.blob_shapes)

    def graph_module(self, outputs=None, *, fuse=True, inference=False):
        """The fx.GraphModule computing `outputs` (default: the net outputs) from the inputs, as
        {name: tensor}. fuse=False runs the segmentation-aware convolutions layer by layer.
        inference=True: the same graph rewritten for forwards without gradients (folded
        BatchNorm/Scale, pooling without indices, ...; see segaware_caffe.inference)."""
        outputs = tuple(self.outputs if outputs is None else outputs)
        if inference:
            cached = self._graph_cache.get((outputs, fuse, "inference"))
            if cached is None:
                from .inference import inference_graph
                cached = inference_graph(self, self.graph_module(outputs, fuse=fuse))
                self._graph_cache[(outputs, fuse, "inference")] = cached
            return cached
        cached = self._graph_cache.get((outputs, fuse))
        if cached is not None:
            return cached
        graph = fx.Graph()
        env, aliases, taken = {}, {}, set()

        def helper(function, args, blob):
            node = graph.call_function(function, args)
            node.meta["blob"] = blob
            return node

        for name in self.input_names:
            env[name] = graph.placeholder(_identifier(name, taken))
            env[name].meta["blob"] = name
            if name in self._zeroed:
                env[name] = helper(zero_first_element, (env[name],), name)
        # a fused group runs unfused when one of its intermediate blobs is asked for
        requested = {name.rsplit("@", 1)[0] for name in outputs}
        active = [g for g in self.fused_groups if fuse and not g.intermediates & requested]
        folded = {k for g in active for k in g.record_keys}
        anchors = {g.key: g for g in active}
        edges = self.backward_plan.edges
        for index, r in enumerate(self.records):
            if r.module.NET_INPUT:
                continue
            if r.key in folded:
                group = anchors.get(r.key)
                if group is not None:
                    node = graph.call_module(f"fused.{group.key}",
                                             (env[group.x_blob], env[group.mask_blob]))
                    node.meta.update(record=index, blob=group.conv_top)
                    env[group.conv_top] = aliases[f"{group.conv_top}@{r.name}"] = node
                continue
            args = [helper(torch.detach, (env[b],), b) if edges[index][i] == backward.DETACH
                    else env[b] for i, b in enumerate(r.bottoms)]
            refusals = tuple((args[i], refusal_message(r, i)) for i in range(len(args))
                             if edges[index][i] == backward.REFUSE)
            node = graph.call_module(f"layers.{r.key}", tuple(args))
            node.meta.update(record=index, blob=r.tops[0] if len(r.tops) == 1 else None)
            if not r.module.has_backward():
                # Caffe runs the Backward of a layer whose blobs train (lr_mult != 0, or
                # force_backward), and this one has none: a gradient asked of them is refused
                # like one asked of a bottom (whether they train is read when the graph runs)
                message = blob_refusal_message(r)
                refusals += tuple((graph.get_attr(f"layers.{r.key}.{name}"), message)
                                  for name in blob_attributes(r.module))
            for i, t in enumerate(r.tops):
                env[t] = node if len(r.tops) == 1 else helper(operator.getitem, (node, i), t)
                if refusals:
                    env[t] = helper(refuse_gradient, (env[t], refusals), t)
                if (index, i) in self._zeroed:
                    env[t] = helper(zero_first_element, (env[t],), t)
                if self.force_backward and not r.bottoms:
                    # force_backward: every blob gets a diff, also those of data layers (DummyData)
                    env[t] = helper(track_grad, (env[t],), t)
                aliases[f"{t}@{r.name}"] = env[t]   # this version, before in-place rewrites
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
        self._graph_cache[(outputs, fuse)] = gm
        return gm

    def feed(self, inputs):
        """The input tensors in graph order, checked by name, moved to the net's device and (for
        floating point) dtype."""
        unknown = [k for k in inputs if k not in self.input_names]
        if unknown:
            raise KeyError(f"net {self.name or ''}: {unknown[0]!r} is not an input of this net "
                           f"(inputs: {', '.join(self.input_names) or 'none'})")
        missing = [k for k in self.input_names if k not in inputs]
        if missing:
            raise KeyError(f"net {self.name or ''}: input {missing[0]!r} not given "
                           f"(inputs: {', '.join(self.input_names)})")
        like = self._feed_like
        args = []
        for name in self.input_names:
            x = inputs[name]
            if not isinstance(x, torch.Tensor):
                x = torch.as_tensor(np.asarray(x))
            x = x.to(device=like.device, dtype=like.dtype if x.is_floating_point() else None)
            args.append(x)
        return args

    def uses_inference_graph(self):
        """Whether forward() now runs the inference graph: a TEST-phase net built with
        inference=True (the default), called while autograd is off (torch.no_grad() or
        torch.inference_mode())."""
        return self.inference and self.phase == "TEST" and not torch.is_grad_enabled()

    def forward(self, outputs=None, **inputs):
        if self.uses_inference_graph():
            graph = self.graph_module(outputs, inference=True)
        else:
            graph = self.autograd_graph_module(outputs)
        return graph(*self.feed(inputs))

    def autograd_graph_module(self, outputs=None):
        """What forward() runs with autograd on: graph_module(outputs) with each 1x1
        convolution of a concatenation of Interp resizes computed part by part, before the
        resizes (segaware_caffe.split_products; Caffe's values and gradients within float
        rounding)."""
        outputs = tuple(self.outputs if outputs is None else outputs)
        cached = self._graph_cache.get((outputs, True, "autograd"))
        if cached is None:
            from .split_products import split_concat_products
            cached = split_concat_products(self, self.graph_module(outputs))
            self._graph_cache[(outputs, True, "autograd")] = cached
        return cached

    def loss(self, outputs):
        """Caffe's net loss: sum over loss tops of weight * sum(top)."""
        total = None
        for top, w in self.loss_weights.items():
            term = w * outputs[top].sum()
            total = term if total is None else total + term
        return total

    def set_input_arrays(self, data, labels, layer=None):
        """pycaffe's Net.set_input_arrays: hand (data, labels) to the net's MemoryData layer (or
        the one named `layer`); see segaware_caffe.layers.memory_data.MemoryData."""
        from .layers.memory_data import set_input_arrays
        set_input_arrays(self, data, labels, layer)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights):
        """Copy blobs from a .caffemodel (path, bytes, NetParameter or weights.WeightsFile) into
        the first layer of each name, as Caffe does (see segaware_caffe.weights). Returns a
        WeightsReport."""
        return copy_weights(self, weights)

    def to_weights_proto(self):
        """A NetParameter like Caffe's Net::ToProto: every layer (with its definition) and its
        blobs in Caffe order."""
        return net_layers_proto(self, parameter_blobs)

    def save_weights(self, path, overwrite=False):
        from segaware_caffe import caffe_proto
        caffe_proto.write_weights(self.to_weights_proto(), path, overwrite=overwrite)

    def extra_repr(self):
        return f"name={self.name!r}, phase={self.phase}, layers={len(self.records)}"
