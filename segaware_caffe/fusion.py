"""Run the released segmentation-aware convolution pattern as one fused op.

config/vgg writes each segmentation-aware convolution as

    col  = Im2col(x)                       (N, C*K, Ho, Wo)   <- the big one
    m    = Tile(mask, tiles=C, axis=1)     (N, C*K, Ho, Wo)   mask = Exp(AbsVal(Scale(Im2dist(e))))
    hit  = Eltwise PROD(col, m)            (N, C*K, Ho, Wo)
    y    = Convolution(hit, bottom_is_im2col)

The mask chain is only K x Ho x Wo and stays as written (its layers carry Caffe's exact gradient
rules). The four layers above become one `kernels.masked_conv2d(x, mask, W, b)` call that never
stores a C*K x Ho*Wo tensor. The conv's own Parameters are used, so weights, solver state and
saving are unchanged. When a caller asks for `col`, `m` or `hit` by name, the net runs that group
unfused (see Net.graph_module).
"""
from dataclasses import dataclass

from torch import nn

from .backward import KEEP
from .params import ConvGeometry


@dataclass
class FusedGroup:
    """One fused chain: the records it replaces and the blobs only it produced."""
    key: str                 # attribute under Net.fused
    anchor: str              # name of the Convolution layer (its record is where the fused call goes)
    record_keys: frozenset   # Net.layers keys of the Im2col, Tile, Eltwise and Convolution records
    intermediates: frozenset  # im2col top, tile top, eltwise top
    x_blob: str
    mask_blob: str
    conv_top: str


class FusedMaskedConv(nn.Module):
    """y = Conv_im2col(Im2col(x) * Tile(mask)) without the intermediates."""

    def __init__(self, conv_layer, *, kernel_size, pad, stride, dilation, group):
        super().__init__()
        object.__setattr__(self, "conv", conv_layer)  # not a submodule: its params live in Net.layers
        self.kernel_size, self.pad, self.stride, self.dilation = kernel_size, pad, stride, dilation
        self.group = group

    def forward(self, x, mask):
        from segaware_caffe.kernels import masked_conv2d
        blobs = self.conv.caffe_blobs()
        weight = blobs[0]
        bias = blobs[1] if len(blobs) > 1 else None
        return masked_conv2d(x, weight, bias, mask=mask, kernel_size=self.kernel_size, pad=self.pad,
                             stride=self.stride, dilation=self.dilation, group=self.group)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, pad={self.pad}, stride={self.stride}, "
                f"dilation={self.dilation}, group={self.group}")


def find_masked_conv_groups(net):
    """Chains of `net.records` whose built modules match the pattern, checked field by field."""
    from .layers.convolution import Convolution
    from .layers.eltwise import Eltwise
    from .layers.im2col import Im2col
    from .layers.tile import Tile
    records = net.records
    producer, consumers, written = {}, {}, {}
    for index, r in enumerate(records):
        for b in r.bottoms:
            consumers[b] = consumers.get(b, 0) + 1
        for t in r.tops:
            producer[t] = index      # the last writer; in-place rewrites are rejected below
            written[t] = written.get(t, 0) + 1
    edges = net.backward_plan.edges
    groups = []
    for at, conv in enumerate(records):
        module = conv.module
        if not isinstance(module, Convolution) or len(conv.bottoms) != 1 \
                or not module.bottom_is_im2col or module.channel_axis != 1:
            continue
        prod_at = producer.get(conv.bottoms[0])
        prod = records[prod_at] if prod_at is not None else None
        if prod is None or not isinstance(prod.module, Eltwise) or len(prod.bottoms) != 2 \
                or prod.module.operation != "PROD" or not prod.module.stable_prod_grad:
            continue
        by_kind = {}
        for b in prod.bottoms:
            source = producer.get(b)
            if source is not None:
                by_kind[type(records[source].module)] = source
        if set(by_kind) != {Im2col, Tile}:
            continue
        im2col_at, tile_at = by_kind[Im2col], by_kind[Tile]
        im2col, tile = records[im2col_at], records[tile_at]
        x_blob, mask_blob = im2col.bottoms[0], tile.bottoms[0]
        x_shape, mask_shape = net.blob_shapes.get(x_blob), net.blob_shapes.get(mask_blob)
        if x_shape is None or mask_shape is None or len(x_shape) != 4 or len(mask_shape) != 4:
            continue
        if tile.module.axis != 1 or tile.module.tiles != x_shape[1]:
            continue
        cols = im2col.module
        geometry = ConvGeometry(cols.kernel, cols.pad, cols.stride, cols.dilation)
        if mask_shape[1] != geometry.taps:
            continue
        if tuple(mask_shape[2:]) != geometry.output_size(*x_shape[2:]):
            continue
        weight = module.weight
        if weight.dim() != 4 or tuple(weight.shape[2:]) != geometry.kernel:
            continue
        if weight.shape[1] * module.group != x_shape[1]:
            continue
        chain = (im2col_at, tile_at, prod_at, at)
        if any(edge != KEEP for k in chain for edge in edges[k]):
            continue   # the fused op cannot cut or refuse the gradient of one of its inputs
        inner = [im2col.tops[0], tile.tops[0], prod.tops[0]]
        # every intermediate is read once, written once, and is no loss top or net output
        if any(consumers.get(b, 0) != 1 or written.get(b, 0) != 1 or b in net.loss_weights
               or b in net.outputs for b in inner):
            continue
        # x and the mask must keep the value their reader saw until the conv runs (no in-place
        # layer may rewrite them in between), since the fused call reads them at the conv
        if any(x_blob in r.tops for r in records[im2col_at + 1:at]) or \
                any(mask_blob in r.tops for r in records[tile_at + 1:at]):
            continue
        groups.append((FusedGroup(key=conv.key, anchor=conv.name,
                                  record_keys=frozenset(records[k].key for k in chain),
                                  intermediates=frozenset(inner), x_blob=x_blob, mask_blob=mask_blob,
                                  conv_top=conv.tops[0]),
                       FusedMaskedConv(module, kernel_size=geometry.kernel, pad=geometry.pad,
                                       stride=geometry.stride, dilation=geometry.dilation,
                                       group=module.group)))
    return groups


def fuse_segaware_convs(net):
    """Register the fused modules on `net`; returns the names of the fused convolutions."""
    groups = find_masked_conv_groups(net)
    for group, module in groups:
        net.fused[group.key] = module
        net.fused_groups.append(group)
    net._graph_cache.clear()
    return [g.anchor for g, _ in groups]
