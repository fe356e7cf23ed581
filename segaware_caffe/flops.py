"""Floating-point work of a built net's GEMM-shaped layers.

Caffe (and every fast CPU backend) runs Convolution, Deconvolution and InnerProduct as matrix
products, so their multiply-adds set a lower bound on a forward pass: the net's FLOPs over the
machine's GEMM rate. The count here is that GEMM's work, 2 FLOPs per multiply-add:

- Convolution: every output element takes (C / group) * kh * kw multiply-adds, the padded taps
  included (im2col fills them with zeros and the GEMM multiplies them anyway). A convolution with
  `bottom_is_im2col` reads a column blob and takes C * K / group per output element, which is also
  what the fused segmentation-aware convolution (Im2col, Tile, Eltwise PROD and that convolution run
  as one op) computes, so a fused group is counted once, at its convolution.
- Deconvolution: every bottom element is multiplied with (O / group) * kh * kw weights (the GEMM
  before col2im, whose contributions that fall into the padding are computed too).
- InnerProduct: every output element takes K multiply-adds.
- NormConv: its convolution part, as for Convolution (the attention weights and normalisation it
  adds are elementwise work, not counted).

A backward pass computes two more products of the same size per layer (gradient of the input and of
the weights), so forward+backward is counted as three times the forward.
"""
import math
from dataclasses import dataclass

GEMM_LAYER_TYPES = ("Convolution", "Deconvolution", "InnerProduct", "NormConv")


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs (2 * multiply-adds) of one layer of a built net."""
    name: str
    type: str
    flops: int


def _per_output_macs(weight_shape, outputs_dim):
    """Multiply-adds per output (or, for Deconvolution, per input) element: the weight's size over
    the dimension that indexes the outputs."""
    return math.prod(weight_shape) // weight_shape[outputs_dim]


def _record_macs(record, shapes):
    blobs = record.module.caffe_blobs()
    if record.type not in GEMM_LAYER_TYPES or not blobs:
        return 0
    weight_shape = tuple(blobs[0].shape)
    if record.type == "Deconvolution":
        # weight (C_in, O / group, kh, kw): each bottom element meets (O / group) * kh * kw weights
        per = _per_output_macs(weight_shape, 0)
        return sum(math.prod(shapes[b]) * per for b in record.bottoms)
    if record.type == "InnerProduct":
        per = math.prod(weight_shape) // record.module.num_output
    else:
        per = _per_output_macs(weight_shape, 0)   # weight (O, C / group, kh, kw)
    return sum(math.prod(shapes[t]) * per for t in record.tops)


def record_flops(record, shapes):
    """Forward FLOPs of one LayerRecord (0 for layers that are not GEMM-shaped), from the blob
    shapes `shapes`."""
    return 2 * _record_macs(record, shapes)


def layer_flops(net):
    """[LayerFlops] of the net's Convolution, Deconvolution, InnerProduct and NormConv layers, in
    Caffe order, from the blob shapes the net was built with."""
    shapes = net.blob_shapes
    out = []
    for record in net.records:
        macs = _record_macs(record, shapes)
        if macs:
            out.append(LayerFlops(record.name, record.type, 2 * macs))
    return out


def net_flops(net, *, backward=False):
    """Total GEMM FLOPs of one forward pass (three times that with `backward`)."""
    total = sum(item.flops for item in layer_flops(net))
    return 3 * total if backward else total
