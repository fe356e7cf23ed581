"""Which diffs Caffe computes: Net::Init's backward analysis, and what the graph does with it.

Caffe decides once, while it builds a net, which layers run Backward and which bottoms get a diff:

1. forward, in layer order: a blob needs backward when its producer does; a layer needs backward
   when one of its bottom blobs does or one of its parameters has lr_mult != 0; a bottom needs a
   diff when its blob needs backward and its propagate_down entry (if any) is true.
2. backward, in reverse order: a layer that contributes to no loss, or whose every top is read
   only by bottoms that get no diff, needs no backward, and its bottoms get no diff.
3. force_backward: every layer runs Backward and every bottom gets a diff, except those the layer
   does not allow (AllowForceBackward: the label of a loss); every parameter gets a diff.

`analyse` computes Caffe's three flag sets (blob_need_backward, layer_need_backward,
bottom_need_backward) from the built records. Two points are the caller's under PyTorch, decided
at run time, and the graph's analysis leaves them to the caller:

* a fed input needs backward when the caller's tensor requires grad (Caffe: never, without
  force_backward): the analysis counts every input as needing it unless force_backward is set;
* which tops contribute to a loss is what `backward()` is called on: the analysis counts every
  top as contributing.

`exact=True` applies Caffe's own rules to both (inputs need no backward without force_backward;
a layer contributes when a top has a non-zero loss weight or a contributing layer reads it):
those are the flags Caffe itself logs (`Net.backward_flags`).

From the flags each bottom edge of the graph gets one treatment (`edges`):

* "detach": Caffe computes no diff there, or computes one that no backward reads (a layer that
  ignores propagate_down writes the diff, but its producer runs no backward);
* "refuse": Caffe would ask the layer's Backward for that bottom's diff and the original refuses
  it (no backward at all, or a label/index bottom): once the bottom requires grad, a backward
  that reaches the layer raises NoBackwardError;
* "keep": the gradient flows as autograd computes it.
"""
from dataclasses import dataclass

DETACH, REFUSE, KEEP = "detach", "refuse", "keep"


@dataclass
class BackwardFlags:
    """Caffe's flags, per layer of `Net.records` (and per bottom), and per blob version
    ((record index, top index); inputs are the tops of their Input layer)."""
    layer_need: list
    bottom_need: list
    blob_need: dict
    edges: list = None      # per layer, per bottom: DETACH, REFUSE or KEEP


def _param_need(record):
    """Caffe: a parameter needs backward when its own ParamSpec has lr_mult != 0 (default 1)."""
    specs = list(record.param.param)
    count = len(record.module.caffe_blobs())
    return [(specs[i].lr_mult if i < len(specs) and specs[i].HasField("lr_mult") else 1.0) != 0
            for i in range(count)]


def analyse(records, force_backward, exact=False):
    """The flags of the three passes above for built records (each with .bottoms, .tops,
    .module, .param, .loss_weights); `exact` as described in the module docstring."""
    version = {}                 # blob name -> (record index, top index) now holding it
    sources = []                 # per record, per bottom: the version it reads
    blob_need = {}
    layer_need, bottom_need = [], []
    for index, record in enumerate(records):
        cls = type(record.module)
        reads = [version[b] for b in record.bottoms]
        sources.append(reads)
        propagate = list(record.param.propagate_down) or [True] * len(reads)
        bottom_need.append([blob_need[v] and p for v, p in zip(reads, propagate)])
        if cls.NET_INPUT:
            need = not force_backward and not exact    # the caller's requires_grad decides
        else:
            need = any(blob_need[v] for v in reads) or any(_param_need(record))
        layer_need.append(need)
        for i, top in enumerate(record.tops):
            version[top] = (index, i)
            blob_need[(index, i)] = need

    under_loss, skipped = set(), set()
    for index in range(len(records) - 1, -1, -1):
        record = records[index]
        tops = [(index, i) for i in range(len(record.tops))]
        contributes = not exact or any(
            record.loss_weights[i] != 0 or tops[i] in under_loss for i in range(len(tops)))
        if layer_need[index] and all(t in skipped for t in tops):
            layer_need[index] = False
            bottom_need[index] = [False] * len(record.bottoms)
        if not contributes:
            layer_need[index] = False
        for i, source in enumerate(sources[index]):
            if contributes:
                under_loss.add(source)
            else:
                bottom_need[index][i] = False
            if not bottom_need[index][i]:
                skipped.add(source)

    if force_backward:
        for index, record in enumerate(records):
            cls = type(record.module)
            layer_need[index] = True
            n = len(record.bottoms)
            for i, source in enumerate(sources[index]):
                bottom_need[index][i] = bottom_need[index][i] or cls.allow_force_backward(i, n)
                blob_need[source] = blob_need[source] or bottom_need[index][i]

    flags = BackwardFlags(layer_need, bottom_need, blob_need)
    flags.edges = [_edges(index, record, sources[index], flags, records)
                   for index, record in enumerate(records)]
    return flags


def _edges(index, record, sources, flags, records):
    cls = type(record.module)
    out = []
    for i, (producer, _) in enumerate(sources):
        computed = flags.bottom_need[index][i] or (
            flags.layer_need[index] and i in _ignored_propagate_down(cls, len(sources)))
        # a fed input's diff is the caller's to read; a layer's is read by its own Backward
        read = type(records[producer].module).NET_INPUT or flags.layer_need[producer]
        if not (computed and read):
            out.append(DETACH)
        elif record.module.refuses_gradient(i, len(sources)):
            out.append(REFUSE)
        else:
            out.append(KEEP)
    return out


def _ignored_propagate_down(cls, num_bottoms):
    return {i % num_bottoms for i in cls.IGNORES_PROPAGATE_DOWN} if num_bottoms else set()
