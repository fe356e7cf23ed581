"""Run the released segmentation-aware convolution pattern as one fused op (issue #4).

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

from .params import conv_geometry


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


def _consumers(records):
    count = {}
    for r in records:
        for b in r.bottoms:
            count[b] = count.get(b, 0) + 1
    return count


def find_masked_conv_groups(net):
    """Chains of `net.records` that match the pattern, checked field by field."""
    records = net.records
    index = {id(r): i for i, r in enumerate(records)}
    producer = {}
    for r in records:
        for t in r.tops:
            producer[t] = r          # last producer; in-place rewrites are rejected below
    consumers = _consumers(records)
    written = {}
    for r in records:
        for t in r.tops:
            written[t] = written.get(t, 0) + 1
    groups = []
    for conv in records:
        if conv.type != "Convolution" or len(conv.bottoms) != 1:
            continue
        cp = conv.param.convolution_param
        if not cp.bottom_is_im2col or len(conv.module.caffe_blobs()) == 0:
            continue
        prod = producer.get(conv.bottoms[0])
        if prod is None or prod.type != "Eltwise" or len(prod.bottoms) != 2:
            continue
        ep = prod.param.eltwise_param
        if ep.operation != ep.PROD or len(ep.coeff):
            continue
        by_type = {producer.get(b).type if producer.get(b) else None: b for b in prod.bottoms}
        if set(by_type) != {"Im2col", "Tile"}:
            continue
        im2col, tile = producer[by_type["Im2col"]], producer[by_type["Tile"]]
        tp = tile.param.tile_param
        x_blob, mask_blob = im2col.bottoms[0], tile.bottoms[0]
        x_shape, mask_shape = net.blob_shapes.get(x_blob), net.blob_shapes.get(mask_blob)
        if x_shape is None or mask_shape is None or len(x_shape) != 4 or len(mask_shape) != 4:
            continue
        if tp.axis not in (1, -3) or tp.tiles != x_shape[1]:
            continue
        geometry = conv_geometry(im2col.param.convolution_param, _NoCtx(im2col))
        if mask_shape[1] != geometry.taps:
            continue
        if tuple(mask_shape[2:]) != geometry.output_size(*x_shape[2:]):
            continue
        weight = conv.module.caffe_blobs()[0]
        if weight.dim() != 4 or tuple(weight.shape[2:]) != geometry.kernel:
            continue
        group = int(cp.group)
        if weight.shape[1] * group != x_shape[1]:
            continue
        if not all(all(r.param.propagate_down) for r in (im2col, tile, prod, conv)):
            continue   # the fused op cannot cut the gradient of one of its inputs
        inner = [im2col.tops[0], tile.tops[0], prod.tops[0]]
        # every intermediate is read once, written once, and is no loss top or net output
        if any(consumers.get(b, 0) != 1 or written.get(b, 0) != 1 or b in net.loss_weights
               or any(producer[b].param.loss_weight) for b in inner):
            continue
        # x and the mask must keep the value their reader saw until the conv runs (no in-place
        # layer may rewrite them in between), since the fused call reads them at the conv
        conv_at = index[id(conv)]
        if any(x_blob in r.tops for r in records[index[id(im2col)] + 1:conv_at]) or \
                any(mask_blob in r.tops for r in records[index[id(tile)] + 1:conv_at]):
            continue
        groups.append((FusedGroup(key=conv.key, anchor=conv.name,
                                  record_keys=frozenset({im2col.key, tile.key, prod.key, conv.key}),
                                  intermediates=frozenset(inner), x_blob=x_blob, mask_blob=mask_blob,
                                  conv_top=conv.tops[0]),
                       FusedMaskedConv(conv.module, kernel_size=geometry.kernel, pad=geometry.pad,
                                       stride=geometry.stride, dilation=geometry.dilation, group=group)))
    return groups


class _NoCtx:
    """conv_geometry wants a context for its errors; the layer already validated its params."""

    def __init__(self, record):
        self.record = record

    def error(self, message):
        return ValueError(f"{self.record.name} ({self.record.type}): {message}")


def fuse_segaware_convs(net):
    """Register the fused modules on `net`; returns the names of the fused convolutions."""
    groups = find_masked_conv_groups(net)
    for group, module in groups:
        net.fused[group.key] = module
        net.fused_groups.append(group)
    net._graph_cache.clear()
    return [g.anchor for g, _ in groups]
