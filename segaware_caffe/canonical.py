"""From what a user gives to the NetParameter that Caffe's Net::Init builds, in Caffe's order.

    source = read_net_source("deploy.prototxt", variables={...})     # or text, or a NetParameter
    canonical = canonical_net(source, phase="test", input_shapes={"data": (1, 3, 321, 321)})
    canonical.param            # the layers to build, Split layers included

The steps, each in one function below:

1. read (`read_net_source`): a path (str or PathLike) or prototxt text, decided by the prototxt
   reader's one rule, with `${VAR}` template variables substituted and V0/V1 layers upgraded; or a
   NetParameter, copied. The source remembers where it came from (error messages, the directory
   that relative paths of data layers start from).
2. inputs (`legacy_inputs_as_layer`): net-level `input:` blobs with `input_shape` or `input_dim`
   become one Input layer named "input" at the front, as BVLC's upgrade does; its tops keep their
   index, so split names (`data_input_0_split_1`) are those the fork gives its legacy inputs.
3. input shapes (`override_input_shapes`): the caller's shapes replace declared ones.
4. filter (`filter_net`): the layers the NetState selects (Net::FilterNet); every layer without a
   `phase` takes the net's.
5. splits (`insert_splits`): Caffe's InsertSplits: a top read by more than one bottom (a top with
   a non-zero loss_weight counts as one more reader) gets a Split layer
   `<blob>_<layer>_<top index>_split` right after its producer, with tops
   `<blob>_<layer>_<top index>_split_<k>`, one per reader in net order. A loss weight moves to the
   Split's first top and the producer's own loss_weight list is cleared (so a loss layer's default
   weight 1 applies again).
6. single sources (`check_single_sources`): a top that names an existing blob is an error unless
   the layer is in place on it (Net::Init's "produced by multiple sources").

Every builder starts here: Net (and so Solver's nets, `run`, `test`, `time`, `inspect`, `export`,
`convert`), and resize works on the result of steps 1-2.
"""
import os
from collections import OrderedDict
from dataclasses import dataclass, field

from segaware_caffe import caffe_proto
from segaware_caffe.caffe_proto import caffe_pb2
from segaware_caffe.caffe_proto.text import load_text

from .errors import NetBuildError

PHASES = {"train": caffe_pb2.TRAIN, "test": caffe_pb2.TEST}

# where a layer of the canonical net comes from
FROM_PROTOTXT, FROM_LEGACY_INPUTS, FROM_SPLITS = "prototxt", "legacy inputs", "splits"
LEGACY_INPUT_LAYER = "input"   # the name BVLC's upgrade (and the fork's split names) use


@dataclass
class NetSource:
    """A net definition as read: V0/V1 layers upgraded, legacy inputs still as written."""
    param: caffe_pb2.NetParameter
    where: str                       # for messages: the file, or "net NAME"
    base_dir: str = "."              # where relative paths of data layers start
    path: str = None                 # the prototxt file, when read from one


def read_net_source(model, variables=None):
    """A NetSource from a path, prototxt text, bytes, a NetParameter or a NetSource (returned
    as it is). Whether a str names a file or holds prototxt text is the prototxt reader's rule."""
    if isinstance(model, NetSource):
        return model
    if isinstance(model, caffe_pb2.NetParameter):
        param = caffe_pb2.NetParameter()
        param.CopyFrom(model)
        return NetSource(param, f"net {model.name or '<NetParameter>'}")
    _, _, path = load_text(model)
    param = caffe_proto.read_net(path if path is not None else model, variables=variables)
    if path is None:
        return NetSource(param, f"net {param.name or '<text>'}")
    return NetSource(param, path, os.path.dirname(os.path.abspath(path)), path)


def phase_of(phase, where):
    """caffe_pb2.TRAIN / TEST from "train"/"test" (any case) or the enum value."""
    if phase in (caffe_pb2.TRAIN, caffe_pb2.TEST) and not isinstance(phase, str):
        return phase
    key = str(phase).lower()
    if key not in PHASES:
        raise NetBuildError(f"{where}: phase must be 'train' or 'test', got {phase!r}")
    return PHASES[key]


# ---------------------------------------------------------------------------- inputs
def legacy_inputs_as_layer(param, where):
    """Net-level inputs -> an Input layer named "input" at the front (in place). Checks them
    first, with the net named in the message: one input_shape per input or four input_dim
    values per input, not both, and every input with a shape."""
    names = list(param.input)
    if len(param.input_shape) and len(param.input_dim):
        raise NetBuildError(f"{where}: give net inputs either as input_shape or as input_dim, not both")
    if len(param.input_shape) and len(param.input_shape) != len(names):
        raise NetBuildError(f"{where}: {len(names)} inputs but {len(param.input_shape)} "
                            f"input_shape entries")
    if len(param.input_dim) and len(param.input_dim) != 4 * len(names):
        raise NetBuildError(f"{where}: {len(names)} inputs need {4 * len(names)} input_dim values, "
                            f"got {len(param.input_dim)}")
    if names and not len(param.input_shape) and not len(param.input_dim):
        raise NetBuildError(f"{where}: net inputs {names} have no input_shape or input_dim")
    had_inputs = bool(names)
    caffe_proto.upgrade_net_input(param, where)
    return had_inputs


def declared_inputs(param):
    """{input blob: declared shape} of the Input layers of a (canonical) NetParameter."""
    shapes = OrderedDict()
    for layer in param.layer:
        if layer.type != "Input":
            continue
        declared = [tuple(int(d) for d in s.dim) for s in layer.input_param.shape]
        for i, top in enumerate(layer.top):
            if declared:
                shapes[top] = declared[i] if len(declared) > 1 else declared[0]
    return shapes


def override_input_shapes(param, shapes, where):
    """Replace the declared shapes of the Input tops named in `shapes` (in place). An Input layer
    whose tops share one declared shape gets one shape per top."""
    remaining = OrderedDict((name, tuple(int(d) for d in dims)) for name, dims in shapes.items())
    for layer in param.layer:
        if layer.type != "Input" or not any(t in remaining for t in layer.top):
            continue
        declared = [list(s.dim) for s in layer.input_param.shape]
        if len(declared) == 1:
            declared = declared * len(layer.top)
        if len(declared) != len(layer.top):
            continue   # the layer reports this mismatch itself when it is built
        del layer.input_param.shape[:]
        for top, dims in zip(layer.top, declared):
            layer.input_param.shape.add().dim.extend(remaining.pop(top, dims))
    if remaining:
        raise NetBuildError(f"{where}: no input named {', '.join(map(repr, remaining))} "
                            f"(inputs: {', '.join(declared_inputs(param)) or 'none'})")


# ---------------------------------------------------------------------------- NetState
def _state_meets_rule(state, rule):
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    if any(s in state.stage for s in rule.not_stage):
        return False
    return True


def net_state(param, phase, level=None, stages=()):
    """The NetState a net is built in: the prototxt's own `state` with the given phase, the given
    stages added to its stages and a given level replacing its level."""
    state = caffe_pb2.NetState()
    state.CopyFrom(param.state)
    state.phase = phase
    if level is not None:
        if not -2**31 <= int(level) < 2**31:
            raise NetBuildError(f"the net's level must be a 32-bit integer (NetState.level), "
                                f"got {level}")
        state.level = int(level)
    state.stage.extend(s for s in stages if s not in state.stage)
    return state


def selected(layer, state):
    """Whether Net::FilterNet keeps `layer` in `state`: with include rules, when it meets one of
    them; otherwise unless it meets one of its exclude rules. Rules of both kinds are an error."""
    if len(layer.include) and len(layer.exclude):
        raise NetBuildError(f"{layer.name} ({layer.type}): specify either include or exclude "
                            f"rules, not both")
    if len(layer.include):
        return any(_state_meets_rule(state, r) for r in layer.include)
    return not any(_state_meets_rule(state, r) for r in layer.exclude)


def filter_net(param, state):
    """Net::FilterNet in place: keep the layers `state` selects; `param.state` becomes `state`.
    Returns the indices of the kept layers."""
    kept = [i for i, layer in enumerate(param.layer) if selected(layer, state)]
    layers = [param.layer[i] for i in kept]
    del param.layer[:]
    param.layer.extend(layers)
    param.state.CopyFrom(state)
    return kept


# ---------------------------------------------------------------------------- InsertSplits
def split_layer_name(blob, layer, top_index):
    return f"{blob}_{layer}_{top_index}_split"


def split_blob_name(blob, layer, top_index, k):
    return f"{blob}_{layer}_{top_index}_split_{k}"


def insert_splits(param):
    """Caffe's InsertSplits on `param`'s layers (a new NetParameter; see the module docstring).
    Returns (new param, origin of each layer: FROM_SPLITS for the inserted ones, None for the
    others)."""
    source_of = {}          # (layer, bottom index) -> (producer layer, top index)
    readers = {}            # (producer, top index) -> readers, a loss counting as one
    loss_of = {}            # (producer, top index) -> loss weight
    last_writer = {}        # blob name -> (producer, top index)
    for i, name in enumerate(param.input):    # legacy inputs, when a caller left them
        last_writer[name] = (-1, i)
    layer_names = {-1: LEGACY_INPUT_LAYER}
    for i, lp in enumerate(param.layer):
        layer_names[i] = lp.name
        for j, blob in enumerate(lp.bottom):
            if blob not in last_writer:
                raise NetBuildError(f"{lp.name} ({lp.type}): bottom blob {blob!r} is not produced "
                                    f"by any earlier layer or net input (known blobs: "
                                    f"{', '.join(last_writer) or 'none'})")
            source_of[(i, j)] = last_writer[blob]
            readers[last_writer[blob]] = readers.get(last_writer[blob], 0) + 1
        for j, blob in enumerate(lp.top):
            last_writer[blob] = (i, j)
        for j in range(min(len(lp.loss_weight), len(lp.top))):
            top = last_writer[lp.top[j]]
            loss_of[top] = lp.loss_weight[j]
            if loss_of[top]:
                readers[top] = readers.get(top, 0) + 1

    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    origins = []
    next_split = {}         # (producer, top index) -> k of its next reader

    def add_split(producer, top_index, blob):
        count = readers.get((producer, top_index), 0)
        if count <= 1:
            return False
        weight = loss_of.get((producer, top_index), 0.0)
        name = layer_names[producer]
        split = out.layer.add(name=split_layer_name(blob, name, top_index), type="Split")
        split.bottom.append(blob)
        for k in range(count):
            split.top.append(split_blob_name(blob, name, top_index, k))
            split.loss_weight.append(weight if k == 0 and weight else 0.0)
        origins.append(FROM_SPLITS)
        return bool(weight)

    for i, name in enumerate(param.input):
        add_split(-1, i, name)
    for i, lp in enumerate(param.layer):
        layer = out.layer.add()
        layer.CopyFrom(lp)
        origins.append(None)
        for j, blob in enumerate(layer.bottom):
            top = source_of[(i, j)]
            if readers.get(top, 0) > 1:
                k = next_split.get(top, 0)
                next_split[top] = k + 1
                layer.bottom[j] = split_blob_name(blob, layer_names[top[0]], top[1], k)
        for j, blob in enumerate(lp.top):
            if add_split(i, j, blob):
                del layer.loss_weight[:]      # the loss now sits on the Split's first top
                next_split[(i, j)] = next_split.get((i, j), 0) + 1
    return out, origins


def check_single_sources(param, origins, before_splits, where):
    """Net::Init's "Top blob produced by multiple sources": a layer may name as its top a blob
    that already exists only in place, top j named like its bottom j. Checked on the net with
    its Split layers (`param`, `origins` from insert_splits), as Caffe does; `before_splits` (the
    same net without them) says when the Split layers are what took a layer out of place."""
    written = {}                      # blob name -> index of the layer that created it
    prototxt_layers = iter(before_splits.layer)
    for index, (lp, origin) in enumerate(zip(param.layer, origins)):
        original = lp if origin == FROM_SPLITS else next(prototxt_layers)
        for j, blob in enumerate(lp.top):
            if j < len(lp.bottom) and lp.bottom[j] == blob:
                continue                  # in place
            if blob not in written:
                written[blob] = index
                continue
            first = param.layer[written[blob]]
            if written[blob] == index and origin == FROM_LEGACY_INPUTS:
                raise NetBuildError(f"{where}: input blob {blob!r} is declared twice")
            what = (f"{lp.name} ({lp.type}): top blob {blob!r} is produced by multiple sources: "
                    + ("this layer names it twice" if written[blob] == index else
                       f"layer {first.name!r} ({first.type}) already produces it"))
            if j < len(original.bottom) and original.bottom[j] == blob:
                raise NetBuildError(
                    f"{what}. The layer is in place on {blob!r} in the prototxt, but that "
                    f"version of {blob!r} has other readers too, so Caffe's InsertSplits feeds "
                    f"this layer a Split top ({lp.bottom[j]!r}) and it is no longer in place; give "
                    f"its top another name")
            raise NetBuildError(f"{what}; a layer may write an existing blob only in place (top "
                                f"{j} named like bottom {j}): give this top another name")


# ---------------------------------------------------------------------------- the pipeline
@dataclass
class CanonicalNet:
    """The NetParameter Net::Init builds (filtered, inputs as Input layers, Split layers in), with
    the origin of each layer (FROM_PROTOTXT, FROM_LEGACY_INPUTS or FROM_SPLITS)."""
    param: caffe_pb2.NetParameter
    source: NetSource
    origins: list = field(default_factory=list)

    @property
    def where(self):
        return self.source.where

    @property
    def phase(self):
        return caffe_pb2.Phase.Name(self.param.state.phase)

    def inputs(self):
        return declared_inputs(self.param)


def canonical_net(model, *, variables=None, phase="test", level=None, stages=(), input_shapes=None):
    """Steps 1-6 of the module docstring for `model` (anything read_net_source takes)."""
    source = read_net_source(model, variables)
    param = caffe_pb2.NetParameter()
    param.CopyFrom(source.param)
    state = net_state(param, phase_of(phase, source.where), level, stages)
    legacy = legacy_inputs_as_layer(param, source.where)
    origins = [FROM_LEGACY_INPUTS if legacy and i == 0 else FROM_PROTOTXT
               for i in range(len(param.layer))]
    origins = [origins[i] for i in filter_net(param, state)]
    if input_shapes:
        override_input_shapes(param, input_shapes, source.where)
    before_splits = param
    param, inserted = insert_splits(param)
    rest = iter(origins)
    origins = [origin or next(rest) for origin in inserted]
    check_single_sources(param, origins, before_splits, source.where)
    for layer in param.layer:      # Net::Init: a layer without a phase runs in the net's
        if not layer.HasField("phase"):
            layer.phase = state.phase
    return CanonicalNet(param, source, origins)
