"""segaware-caffe inspect NET.prototxt [--weights W] [--set VAR=value ...] [--vars FILE] [--phase P]

A table of the net's layers: name, type, bottoms -> tops (with shapes when the net can be built),
learnable blobs with shapes, lr/decay multipliers, the phase rules of each layer, and for a built
net each layer's forward FLOPs (2 x the multiply-adds of the GEMM-shaped layers: Convolution,
Deconvolution, InnerProduct, NormConv) and the memory of the tops it creates (in-place tops and
Split tops share memory in Caffe and count nothing), with totals. Layers
whose type segaware-caffe does not implement are marked "(unsupported)" before anything is
built (a net with one is then not built at all).
"""
import math
import os

from segaware_caffe import caffe_proto
from segaware_caffe.caffe_proto import caffe_pb2
from segaware_caffe.canonical import FROM_PROTOTXT, net_state, phase_of, read_net_source, selected
from segaware_caffe.tools.common import add_variable_arguments, int32, parse_variables


def add_arguments(parser):
    parser.add_argument("prototxt", help="net definition (.prototxt, may be a ${VAR} template)")
    parser.add_argument("--weights", metavar="W", help=".caffemodel whose blobs to show")
    add_variable_arguments(parser)
    parser.add_argument("--phase", choices=("train", "test"), default="test",
                        help="phase whose layers are listed (default: test)")
    parser.add_argument("--stage", action="append", default=[], help="net stage (repeatable)")
    parser.add_argument("--level", type=int32, default=0, help="net level (default 0)")
    parser.add_argument("--all-phases", action="store_true",
                        help="list every layer, whatever its include/exclude rules")


def rule_text(layer):
    """The include/exclude rules (and explicit phase) of a layer, in a few characters."""
    def one(rule):
        parts = []
        if rule.HasField("phase"):
            parts.append(caffe_pb2.Phase.Name(rule.phase))
        if rule.HasField("min_level"):
            parts.append(f"level>={rule.min_level}")
        if rule.HasField("max_level"):
            parts.append(f"level<={rule.max_level}")
        parts += [f"stage={s}" for s in rule.stage] + [f"not_stage={s}" for s in rule.not_stage]
        return " ".join(parts) or "always"
    texts = [one(r) for r in layer.include] + [f"not {one(r)}" for r in layer.exclude]
    if layer.HasField("phase"):
        texts.append(f"phase={caffe_pb2.Phase.Name(layer.phase)}")
    return ", ".join(texts) or "all"


def _shape_text(shape):
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _number(value):
    return f"{value:g}"


def _build_net(source, args):
    """segaware_caffe.Net for the shapes, or (None, reason) when it cannot be built here."""
    try:
        from segaware_caffe import Net
    except Exception as e:  # the net builder is optional for this tool
        return None, f"net builder unavailable ({type(e).__name__}: {e})"
    try:
        net = Net(source, phase=args.phase, stages=tuple(args.stage), level=args.level,
                  fuse=False)
    except Exception as e:  # e.g. a data layer whose list file is not on this machine
        reason = str(e).split(". ")[0]
        return None, f"{type(e).__name__}: {reason[:300]}"
    return net, None


def _filter(net_param, args):
    """The prototxt's layers the NetState selects (what Net would build, before splits)."""
    state = net_state(net_param, phase_of(args.phase, "inspect"), args.level, tuple(args.stage))
    return [layer for layer in net_param.layer if selected(layer, state)]


def _supported_types():
    """The layer types segaware-caffe can build, or None when the builder cannot be loaded."""
    try:
        from segaware_caffe import supported_layer_types
        return set(supported_layer_types())
    except Exception:  # the net builder (torch) is optional for this tool
        return None


def unsupported_layers(layers):
    """[(layer name, type)] of the layers whose type is not implemented (none if unknown)."""
    supported = _supported_types()
    if supported is None:
        return []
    return [(layer.name, _type_name(layer)) for layer in layers
            if _type_name(layer) not in supported]


def _type_name(layer):
    return layer.type if isinstance(layer.type, str) else str(layer.type)


def inspect_rows(source, args, weights=None):
    """(rows, notes): one dict per listed layer of the prototxt, and lines to print under the
    table. `source`: a canonical.NetSource (or anything Net takes)."""
    source = read_net_source(source)
    net_param = source.param
    notes = []
    listed = list(net_param.layer) if args.all_phases else _filter(net_param, args)
    unsupported = unsupported_layers(listed)
    if unsupported:
        kinds = sorted({kind for _, kind in unsupported})
        notes.append(f"{len(unsupported)} layer(s) of type(s) segaware-caffe does not implement: "
                     + ", ".join(f"{kind} ({', '.join(n for n, k in unsupported if k == kind)})"
                                 for kind in kinds)
                     + "; register one with @segaware_caffe.register_layer (the implemented "
                       "types: segaware_caffe.supported_layer_types())")
    if args.all_phases:
        net, reason = None, "--all-phases lists layers without building"
    elif unsupported:
        net, reason = None, f"not built: {len(unsupported)} layer(s) of unsupported types"
    else:
        net, reason = _build_net(source, args)
    if reason:
        notes.append(f"shapes from the prototxt/weights only: {reason}")
    weight_shapes = {}
    if weights is not None:
        for layer in list(weights.layer):
            weight_shapes.setdefault(layer.name, [caffe_proto.blob_shape(b) for b in layer.blobs])
        if net is not None:
            report = net.load_weights(weights)
            notes.append(f"weights: {report}")
    rows = []
    if net is not None:
        from segaware_caffe.flops import record_flops

        # the rules as the prototxt writes them (the built layers carry the phase they run in)
        written = iter(_filter(net_param, args))
        item = next(net.parameters(), None)
        item_bytes = item.element_size() if item is not None else 4
        for record in net.records:
            if record.origin != FROM_PROTOTXT:
                continue    # Split layers and the legacy inputs' Input layer: Caffe's additions
            layer = next(written)
            params = net.params.get(record.name, []) if record.module.caffe_blobs() else []
            rows.append(dict(
                name=record.name, type=record.type,
                flow=_flow(record.bottoms, record.tops, net.blob_shapes),
                params=[tuple(p.shape) for p in params],
                mults=[(getattr(p, "lr_mult", 1.0), getattr(p, "decay_mult", 1.0)) for p in params],
                rule=rule_text(layer), ids=[id(p) for p in params],
                flops=record_flops(record, net.blob_shapes),
                memory=_top_bytes(record, net.blob_shapes, item_bytes)))
        notes.append(f"activations of the whole net: {_bytes(_net_bytes(net, item_bytes))} "
                     f"(every blob once, the inputs included; the table's column counts the tops "
                     f"each layer creates); FLOPs are one forward pass at the declared batch")
        return rows, notes
    marked = {name for name, _ in unsupported}
    for layer in listed:
        shapes = weight_shapes.get(layer.name, [])
        if not shapes and len(layer.blobs):
            shapes = [caffe_proto.blob_shape(b) for b in layer.blobs]
        count = max(len(shapes), len(layer.param))
        mults = [(layer.param[i].lr_mult, layer.param[i].decay_mult) if i < len(layer.param)
                 else (1.0, 1.0) for i in range(count)]
        kind = f"{layer.type} (unsupported)" if layer.name in marked else layer.type
        rows.append(dict(name=layer.name, type=kind,
                         flow=_flow(layer.bottom, layer.top, {}),
                         params=shapes or [None] * len(layer.param), mults=mults,
                         rule=rule_text(layer), ids=None))
    return rows, notes


def _top_bytes(record, shapes, item_bytes):
    """Bytes of the blobs a layer creates: its tops, less in-place ones (a top that is also a
    bottom) and Split tops (they share their bottom's data in Caffe)."""
    if record.type == "Split":
        return 0
    return sum(math.prod(shapes[t]) * item_bytes for t in dict.fromkeys(record.tops)
               if t not in record.bottoms and t in shapes)


def _net_bytes(net, item_bytes):
    split_tops = {t for r in net.records if r.type == "Split" for t in r.tops}
    return sum(math.prod(shape) * item_bytes for name, shape in net.blob_shapes.items()
               if name not in split_tops)


def _bytes(count):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _flops(count):
    for unit, size in (("T", 10 ** 12), ("G", 10 ** 9), ("M", 10 ** 6), ("k", 10 ** 3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return str(count)


def _flow(bottoms, tops, shapes):
    def blob(name):
        return f"{name}[{_shape_text(shapes[name])}]" if name in shapes else name
    return f"{', '.join(map(blob, bottoms)) or '-'} -> {', '.join(map(blob, tops)) or '-'}"


def format_table(rows, title):
    built = bool(rows) and "flops" in rows[0]
    header = ("#", "name", "type", "bottoms -> tops", "params", "lr/decay", "phase")
    if built:
        header += ("FLOPs", "top memory")
    lines = []
    for index, row in enumerate(rows):
        params = ", ".join("?" if s is None else _shape_text(s) for s in row["params"]) or "-"
        mults = ", ".join(f"{_number(lr)}/{_number(decay)}" for lr, decay in row["mults"]) or "-"
        line = (str(index), row["name"], row["type"], row["flow"], params, mults, row["rule"])
        if built:
            line += (_flops(row["flops"]) if row["flops"] else "-",
                     _bytes(row["memory"]) if row["memory"] else "-")
        lines.append(line)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    widths[3] = min(widths[3], 70)
    right = {7, 8}   # numbers: right-aligned

    def render(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [title, render(header), render(["-" * w for w in widths])]
    out += [render(line) for line in lines]
    blobs = 0
    values = 0
    seen = set()
    for row in rows:
        for i, shape in enumerate(row["params"]):
            key = row["ids"][i] if row["ids"] else (row["name"], i)
            if key in seen:
                continue  # a shared parameter counts once
            seen.add(key)
            blobs += 1
            if shape is not None:
                values += math.prod(shape)
    total = f"total: {len(rows)} layers, {blobs} learnable blobs, {values:,} parameters"
    if built:
        total += (f", {_flops(sum(r['flops'] for r in rows))}FLOPs forward, "
                  f"{_bytes(sum(r['memory'] for r in rows))} of layer tops")
    out.append(total)
    return "\n".join(out)


def run(args):
    variables = parse_variables(args.set, args.vars)
    source = read_net_source(args.prototxt, variables=variables or None)
    net_param = source.param
    weights = caffe_proto.read_weights(args.weights) if args.weights else None
    rows, notes = inspect_rows(source, args, weights)
    phase = "all phases" if args.all_phases else f"phase {args.phase.upper()}"
    title = f"{net_param.name or os.path.basename(os.fspath(args.prototxt))} ({phase})"
    print(format_table(rows, title))
    for note in notes:
        print(f"note: {note}")
    return 0
