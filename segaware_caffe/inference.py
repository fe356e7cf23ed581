"""The test-phase inference graph: the net's fx graph rewritten for a forward without gradients.

`Net.forward` runs it for a TEST-phase net while autograd is off (`torch.no_grad()` or
`torch.inference_mode()`), unless the net was built with `inference=False`;
`Net.graph_module(outputs, inference=True)` returns it. It is the exact graph
(`Net.graph_module`) with these rewrites, each of which computes what the nodes it replaces
compute, up to float32 rounding:

1. Bookkeeping that only matters to autograd goes: `torch.detach`, `refuse_gradient` and
   `track_grad` nodes, Split tops (views of their bottom) and TEST-phase Dropout (the identity)
   are replaced by their input.
2. A Convolution, Deconvolution or InnerProduct followed by a chain of layers that are fixed
   per-channel affine maps -- BatchNorm with stored statistics (use_global_stats, no update),
   Scale and Bias with learned per-channel or scalar blobs -- becomes one convolution whose
   weights and bias have the chain folded in (in float64, then rounded once). The folded blobs
   are recomputed when a source parameter changes (torch's version counter, its storage, or
   `parameters_changed()`). A chain after any other producer becomes one multiply-add.
3. MAX and AVE pooling and the Interp resize are compiled loops on the CPU (kernels/cpu/;
   MAX computes no indices), with torch's pooling, padded inside the kernel, where there is no
   compiler; PReLU and leaky ReLU are one-pass kernels; Eltwise SUM of unweighted bottoms is
   torch.add; Softmax is torch.softmax. Each pooling works out its windows once per input
   shape. A fused segmentation-aware convolution runs its band loop directly (no autograd);
   with one group its top is in channels_last memory, and in float32 on the CPU each band's
   masked columns are written pixel-major and multiplied by oneDNN's 1x1 convolution.
4. A ReLU / leaky ReLU whose bottom is a convolution's top read by nothing else is applied by
   the convolution (oneDNN's post-op, in place, or band by band). ReLU, leaky ReLU and Eltwise
   SUM write into a bottom whose memory is a fresh result nobody else reads (what Caffe's
   in-place tops do; a sum takes whichever of its two bottoms is fresh), and such a sum read
   only by a ReLU is one fused pass (a residual block's end).
5. 2-D convolutions run in channels_last memory (oneDNN's CPU kernels are several times faster
   there for few channels, and no slower elsewhere); float32 CPU ones call oneDNN with weights
   reordered once into its blocked format. A stride-1 convolution with few outputs from many
   channels is one product of all taps' weights with the pixels and shifted sums. Tensors
   return to the standard layout before any node not known to accept channels_last, and before
   the net's outputs.
6. A residual block's end -- the sum (and ReLU) of a convolution's fresh top and a shortcut
   the graph allocated and reads no more -- is that convolution with the sum and the ReLU as
   oneDNN post-ops, written into the shortcut (float32 channels_last CPU images; otherwise the
   top, then the sum).

Everything else keeps the layer's own module, so side effects and layer-specific rules are
untouched. The graph holds no autograd rules of its own: it is for forwards without gradients
(the folded blobs are computed under torch.no_grad()).
"""
import copy
import math
import operator
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fusion import FusedMaskedConv
from .kernels._native import function as native_function, plain as native_plain, \
    threads as native_threads
from .kernels.geometry import ConvGeometry, inside_range
from .kernels import masked_conv as masked_conv_kernels
from .kernels.masked_conv import masked_conv2d_inference, masked_conv2d_pixel_major, \
    PackedPointwise, onednn_pointwise_available, pixel_major_weight
from .layers.batch_norm import BatchNorm
from .layers.bias import Bias
from .layers.concat import Concat
from .layers.convolution import Convolution, Deconvolution
from .layers.dropout import Dropout
from .layers.eltwise import Eltwise
from .layers.inner_product import InnerProduct
from .layers.interp import Interp, bilinear_into
from .layers.pooling import FLT_MAX, Pooling, _after
from .layers.prelu import PReLU
from .layers.prior_box import PriorBox
from .layers.relu import ReLU
from .layers.scale import Scale
from .layers.softmax import Softmax
from .layers.split import Split
from .split_products import concat_parts, part_layout

__all__ = ["inference_graph", "parameters_changed", "CHANNELS_LAST", "PACKED_CONVOLUTION"]

# whether 2-D convolutions of the inference graph run in channels_last memory (see above)
CHANNELS_LAST = True
# whether channels_last float32 CPU convolutions run as oneDNN's convolution with weights
# reordered once into its blocked format (and a following ReLU as its post-op); torch's
# convolution reorders the weights at every call, which costs most on small images
PACKED_CONVOLUTION = True


def _packed_convolution_available():
    return torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_convolution_pointwise") and \
        hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")

_GENERATION = [0]


def parameters_changed():
    """Say that parameters changed where torch's version counters cannot see it (writes through
    `.data`, or storage shared with another net's parameters, as the solver's test nets do):
    every inference graph recomputes its folded weights on its next call."""
    _GENERATION[0] += 1


class _BlobWatch:
    """The learnable blobs of some layers (their Caffe order), read at each call where each
    lives -- the module's parameter, buffer or attribute dict -- rather than through
    nn.Module's attribute lookup, which costs microseconds per blob on every forward of a small
    net. A blob replaced by a new tensor is seen (the dict entry changes), and `changed()` says
    whether any value changed since it last answered (by version counters, storage and
    `parameters_changed()`'s generation)."""

    def __init__(self, modules):
        self.slots = []
        for module in modules:
            for name in module.CAFFE_BLOBS:
                home = next((d for d in (module._parameters, module._buffers, module.__dict__)
                             if name in d), None)
                if home is not None:
                    self.slots.append((home, name))
        self._seen = None

    def changed(self):
        tensors = [t for t in (home.get(name) for home, name in self.slots) if t is not None]
        stamp = (_GENERATION[0],) + tuple((t._version, t.data_ptr(), t.dtype, t.device)
                                          for t in tensors)
        if stamp == self._seen:
            return False
        self._seen = stamp
        return True

    def forget(self):
        """The next `changed()` answers True."""
        self._seen = None


# ---------------------------------------------------------------------------- affine layers
def _per_channel(tensor, channels):
    """Whether a Scale/Bias blob broadcasts as one value per channel (axis 1) or as a scalar."""
    return tensor.dim() == 0 or tuple(tensor.shape) == (channels,)


def affine_layer(module, node, channels, ndim):
    """Whether the layer of `node` is a fixed per-channel affine map y = x * a + b of its one
    bottom (channels along axis 1 of an `ndim`-D blob)."""
    if len(node.args) != 1 or ndim < 2:
        return False
    if isinstance(module, BatchNorm):
        return (module.use_global_stats and not module.update_global_stats
                and module.mean_sum.numel() == channels)
    if isinstance(module, Scale):
        if module.scale is None or (module.scale.dim() and module.axis != 1):
            return False
        return _per_channel(module.scale, channels) and \
            (module.bias is None or _per_channel(module.bias, channels))
    if isinstance(module, Bias):
        return module.bias is not None and _per_channel(module.bias, channels) and \
            (module.bias.dim() == 0 or module.axis == 1)
    return False


def affine_of(module, channels):
    """(a, b), float64 of shape (channels,), with module(x) = x * a + b per channel."""
    ones = torch.ones(channels, dtype=torch.float64, device=_device(module))
    if isinstance(module, BatchNorm):
        # the statistics as the layer computes them in float32, then the map in float64
        stored = module.scale_factor.detach()[0]
        factor = torch.where(stored == 0, torch.zeros_like(stored), 1 / stored)
        mean = module.mean_sum.detach() * factor
        divisor = torch.sqrt(module.variance_sum.detach() * factor + module.eps).double()
        return 1 / divisor, -mean.double() / divisor
    if isinstance(module, Scale):
        a = ones * module.scale.detach().double()
        b = ones * module.bias.detach().double() if module.bias is not None else ones * 0
        return a, b
    return ones, ones * module.bias.detach().double()


def _device(module):
    return next(module.parameters()).device


def _chain_affine(chain, channels):
    a = b = None
    for module in chain:
        ma, mb = affine_of(module, channels)
        a, b = (ma, mb) if a is None else (a * ma, b * ma + mb)
    return a, b


# ---------------------------------------------------------------------------- modules
class _InferenceModule(nn.Module):
    """A module of the inference graph: called straight (no hooks to run), which saves nn.Module's
    call machinery on every node of every forward (a few microseconds each, which add up on a
    small net)."""

    def __call__(self, *args):
        return self.forward(*args)


class InferenceConvolution(_InferenceModule):
    """A Convolution / Deconvolution / InnerProduct layer's computation with weights and bias
    prepared once: the affine `chain` after it folded in, and a 2-D convolution's weights in
    channels_last memory when `channels_last`. A 1x1 convolution without stride, padding or
    groups is one matrix product over the pixels (torch's CPU convolution would copy a
    channels_last input to run the same product). The layers stay the owners of the parameters
    (they are not submodules), and the prepared blobs follow their values."""

    def __init__(self, layer, chain=(), channels_last=False):
        super().__init__()
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "chain", tuple(chain))
        self.kind = type(layer).__name__
        # negative slope of a ReLU applied to the top (written in place / as oneDNN's post-op)
        self.activation = None
        # "add" / "add_relu": forward(x, residual) adds the top into `residual` (a tensor the
        # graph owns and no longer reads), with the ReLU after the sum (a residual block's end)
        self.residual = None
        self._packed = None             # (weight it was made from, input shape, packed weight)
        self._packed_failed = False
        self._packed_verified = False   # whether a call with the current packing succeeded
        self._winograd_product = None   # (weight it was made from, its PackedPointwise)
        self._winograd_failed = False
        self._blob_watch = _BlobWatch((layer,) + self.chain)
        self.pointwise = isinstance(layer, Convolution) and layer.pointwise
        self.tap_product = (
            isinstance(layer, Convolution) and not self.pointwise and not layer.bottom_is_im2col
            and layer.group == 1 and layer.stride == (1, 1) and len(layer.kernel) == 2
            and layer.num_output <= self.TAP_PRODUCT_OUTPUTS
            and layer.weight.shape[1] >= self.TAP_PRODUCT_CHANNELS)
        self.set_channels_last(channels_last)

    # A stride-1 convolution with few outputs from many channels (DeepLab's dilated ASPP
    # classifiers, SSD's loc/conf heads) runs as one product of all taps' weights with the
    # pixels, Z = [W_0; ...; W_k] x, and sums of the taps' shifted planes of Z: oneDNN's
    # kernels block the outputs by 16 or more and leave most of that work idle (measured: 2048
    # channels to 21 outputs, 3x3, 65x65: 20 ms vs 24-44 ms)
    TAP_PRODUCT_OUTPUTS = 32
    TAP_PRODUCT_CHANNELS = 256

    def __getstate__(self):
        # oneDNN's reordered weights are opaque tensors (no storage to copy or pickle): a copy
        # of the net makes its own on its first call
        state = self.__dict__.copy()
        state["_packed"], state["_packed_verified"] = None, False
        state["_winograd_product"] = None
        return state

    def set_channels_last(self, channels_last):
        conv = isinstance(self.layer, Convolution)
        # the tap product reads either layout and gives its top in the standard one
        self.channels_last = channels_last and conv and not self.tap_product
        # the layer's own blobs serve as they are (no copy to keep up to date)
        self._direct = not self.chain and not self.channels_last and not self.pointwise and \
            not self.tap_product and not (conv and self.layer.bottom_is_im2col)
        self._blob_watch.forget()
        self._blobs = None

    @torch.no_grad()
    def _prepare(self):
        layer = self.layer
        weight, bias = layer.weight, layer.bias
        if isinstance(layer, InnerProduct) and layer.transpose:
            weight = weight.t()
        if self.chain:
            a, b = _chain_affine(self.chain, layer.num_output)
            w = weight.double()
            if isinstance(layer, Deconvolution):
                group, shape = layer.group, w.shape
                w = (w.reshape(group, shape[0] // group, shape[1], *shape[2:])
                     * a.reshape(group, 1, shape[1], 1, 1)).reshape(shape)
            else:
                w = w * a.reshape(-1, *[1] * (w.dim() - 1))
            bias = b if bias is None else bias.double() * a + b
            weight, bias = w.to(layer.weight.dtype), bias.to(layer.weight.dtype)
        if self.pointwise:
            return weight.reshape(layer.num_output, -1).t(), bias     # (C, O)
        if self.tap_product:      # (taps * O, C): tap-major rows
            return weight.permute(2, 3, 0, 1).reshape(-1, weight.shape[1]).contiguous(), bias
        if isinstance(layer, Convolution) and layer.bottom_is_im2col:
            weight = weight.reshape(layer.num_output, -1, 1, 1)
        if self.channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        return weight, bias

    def blobs(self):
        if self._direct:
            layer = self.layer
            weight = layer.weight.t() if isinstance(layer, InnerProduct) and layer.transpose \
                else layer.weight
            return weight, layer.bias
        if self._blob_watch.changed():
            self._blobs = self._prepare()
        return self._blobs

    def forward(self, x, residual=None):
        if residual is not None:
            return self._residual_forward(x, residual)
        weight, bias = self.blobs()
        layer = self.layer
        if isinstance(layer, InnerProduct):
            lead = x.shape[:layer.axis]
            rows = x.reshape(-1, weight.shape[1])
            y = _few_rows_linear(rows, weight, bias, self.activation)
            if y is not None:
                return y.reshape(*lead, weight.shape[0])
            y = F.linear(rows, weight, bias).reshape(*lead, weight.shape[0])
        elif self.pointwise:
            y = _pointwise(x, weight, bias, self.channels_last)
        elif self.tap_product:
            y = _tap_product_convolution(x, weight, bias, layer)
        elif isinstance(layer, Deconvolution):
            y = F.conv_transpose2d(self._in_layout(x), weight, bias, layer.stride, layer.pad, 0,
                                   layer.group, layer.dilation)
        elif layer.bottom_is_im2col:     # the columns are the taps: a grouped 1x1 product
            y = F.conv2d(self._in_layout(x), weight, bias, groups=layer.group)
        else:
            if self.channels_last and not self._winograd_failed and winograd_applies(layer, x):
                y = self._winograd(x, weight, bias, self.activation)
                if y is not None:
                    return y
            packed = self._packed_weight(x, weight) if self.channels_last else None
            if packed is not None:
                if self._packed_verified:
                    return self._packed_call(x, packed, bias)
                try:                    # the first call with a new packing: it runs, or not at all
                    y = self._packed_call(x, packed, bias)
                except RuntimeError:
                    self._packed_failed, self._packed = True, None
                else:
                    self._packed_verified = True
                    return y
            y = F.conv2d(self._in_layout(x), weight, bias, layer.stride, layer.pad,
                         layer.dilation, layer.group)
        if self.activation is None:
            return y
        return torch.relu_(y) if self.activation == 0 else \
            F.leaky_relu(y, self.activation, inplace=True)

    def _winograd(self, x, weight, bias, activation, out=None):
        """winograd_convolution with this layer's weights (transformed once per prepared weight
        tensor); None where oneDNN refuses (then never again)."""
        if self._winograd_product is None or self._winograd_product[0] is not weight:
            detached = weight.detach()
            self._winograd_product = (
                weight, PackedPointwise(lambda: winograd_weight(detached), groups=16))
        try:
            return winograd_convolution(x, self._winograd_product[1], self.layer.num_output,
                                        bias, self.layer.pad, activation, out)
        except RuntimeError:
            self._winograd_failed, self._winograd_product = True, None
            return None

    def _residual_forward(self, x, residual):
        """relu(top + residual) (or top + residual), written into residual: one oneDNN call
        with the sum and the ReLU as its post-ops where both tensors are channels_last float32
        CPU images; otherwise the top, then the sum."""
        weight, bias = self.blobs()
        packed = None
        if self.channels_last and not self._winograd_failed and _in_channels_last(residual) \
                and residual.dtype == x.dtype and winograd_applies(self.layer, x) and \
                residual.shape == self._top_shape(x):
            top = self._winograd(x, weight, bias, 0 if self.residual == "add_relu" else None,
                                 out=residual)
            if top is not None:
                return top
        if _in_channels_last(x) and _in_channels_last(residual) and \
                residual.dtype == torch.float32 and x.dtype == torch.float32:
            # a 1x1 convolution's prepared (C, O) product weights as the kernel they came from
            packed = self._packed_weight(x, weight, _pointwise_kernel if self.pointwise else None)
        if packed is not None and residual.shape == self._top_shape(x):
            layer = self.layer
            # (oneDNN takes no unary post-op as None: "none" is refused)
            unary = "relu" if self.residual == "add_relu" else None
            try:        # (oneDNN refuses a setting when it makes the primitive, before writing)
                return torch.ops.mkldnn._convolution_pointwise_.binary(
                    residual, x, packed, bias, layer.pad, layer.stride, layer.dilation,
                    layer.group, "add", 1.0, unary, [], "")
            except RuntimeError:
                self._packed_failed, self._packed = True, None
        top = self.forward(x)
        return _add_relu_(top, residual) if self.residual == "add_relu" else top.add_(residual)

    def _top_shape(self, x):
        layer = self.layer
        height, width = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, p, s, d in
            zip(x.shape[2:], layer.kernel, layer.pad, layer.stride, layer.dilation))
        return torch.Size((x.shape[0], layer.num_output, height, width))

    def _in_layout(self, x):
        # torch's convolution gives its top the layout of its input: choose it here
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else \
            standard_layout(x)

    def _packed_weight(self, x, weight, kernel=None):
        """oneDNN's reordered weights for inputs of x's shape, made once per weight tensor and
        shape; None where that path does not apply (or failed once: torch's call then runs).
        `kernel(weight)`: the 4-D kernel of a prepared weight of another shape (made only to be
        reordered)."""
        if not PACKED_CONVOLUTION:
            return None
        packed = self._packed
        if packed is not None and packed[0] is weight and packed[1] == x.shape:
            return packed[2]
        if self._packed_failed or x.device.type != "cpu" or \
                x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 4 or \
                x.numel() == 0 or not _packed_convolution_available():
            return None
        layer = self.layer
        source = weight if kernel is None else kernel(weight)
        try:
            blocked = torch._C._nn.mkldnn_reorder_conv2d_weight(
                source.to_mkldnn(), list(layer.pad), list(layer.stride), list(layer.dilation),
                layer.group, list(x.shape))
        except RuntimeError:
            self._packed_failed = True
            return None
        self._packed, self._packed_verified = (weight, x.shape, blocked), False
        return blocked

    def _packed_call(self, x, packed, bias):
        layer = self.layer
        attr, scalars = onednn_activation(self.activation)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, layer.pad, layer.stride, layer.dilation, layer.group, attr,
            scalars, "")

    def extra_repr(self):
        folded = ", ".join(type(m).__name__ for m in self.chain)
        then = "" if self.activation is None else \
            (", then ReLU" if self.activation == 0 else f", then ReLU({self.activation:g})")
        return (f"{self.kind}" + (f", folded: {folded}" if folded else "") + then
                + (", pointwise" if self.pointwise else "")
                + (", tap product" if self.tap_product else "")
                + (", channels_last" if self.channels_last else ""))


def onednn_activation(slope):
    """oneDNN's unary post-op (attr, scalars) for a ReLU / leaky ReLU of negative slope `slope`
    (None: no activation)."""
    if slope is None:
        return "none", []
    return ("relu", []) if slope == 0 else ("leaky_relu", [slope])


# input rows up to which an InnerProduct runs as kernels/cpu/linear.c's product (bound by
# reading the weights, which it splits over the threads); more rows: torch's GEMM
LINEAR_ROWS = 4


def _few_rows_linear(rows, weight, bias, activation):
    """rows (M, K) times weight (O, K)^T + bias, then the activation (a negative slope, or
    None), by the compiled loop for M <= LINEAR_ROWS; None where it does not apply."""
    if not 0 < rows.shape[0] <= LINEAR_ROWS or not native_plain(rows, weight) or \
            rows.dtype != weight.dtype or not weight.is_contiguous() or \
            (bias is not None and (bias.dtype != weight.dtype or not native_plain(bias))):
        return None
    loop = native_function("linear.c", "linear_rows", rows.dtype)
    if loop is None:
        return None
    rows = rows.contiguous()
    bias = bias.contiguous() if bias is not None else None
    top = rows.new_empty((rows.shape[0], weight.shape[0]))
    loop(native_threads(), rows.shape[0], rows.data_ptr(), weight.data_ptr(),
         bias.data_ptr() if bias is not None else None, top.data_ptr(), weight.shape[0],
         weight.shape[1], activation is not None, float(activation or 0))
    return top


# Winograd F(2x2, 3x3) (kernels/cpu/winograd.c) for stride-1 undilated 3x3 convolutions of one
# group with at least this many input and output channels, in channels_last memory: 16
# products per tile and channel pair instead of 36, as one product (oneDNN's 1x1 convolution of
# 16 groups) between two compiled transforms (128- to 512-channel layers at 14x14 to 81x81 on
# AMD Zen 4: 0.62-0.79 of oneDNN's direct convolution's time; 64 channels: slower). False: never.
WINOGRAD = True
WINOGRAD_CHANNELS = 128
# output tiles (2x2) below which oneDNN's direct convolution is faster (512 channels at 7x7)
WINOGRAD_TILES = 32
# bytes of transformed tiles (and as many of products) per band of tile rows
WINOGRAD_BAND_BYTES = 8 << 20

_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_weight(weight):
    """(O, C, 3, 3) -> the 16 (O, C) matrices G g G^T of the transform as the (16 O, C, 1, 1)
    kernel of a 1x1 convolution of 16 groups (computed in float64, rounded once)."""
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64, device=weight.device)
    u = g @ weight.double() @ g.t()                       # (O, C, 4, 4)
    return u.permute(2, 3, 0, 1).reshape(16 * weight.shape[0], weight.shape[1], 1, 1).to(
        weight.dtype).contiguous()


def _winograd_loops(dtype):
    loops = [native_function("winograd.c", name, dtype)
             for name in ("winograd_input", "winograd_output")]
    return None if None in loops else loops


def winograd_applies(layer, x):
    """Whether InferenceConvolution runs `layer` on x by winograd_convolution."""
    if not (WINOGRAD and isinstance(layer, Convolution) and not layer.bottom_is_im2col and
            layer.group == 1 and layer.kernel == (3, 3) and layer.stride == (1, 1) and
            layer.dilation == (1, 1) and x.dim() == 4 and x.dtype == torch.float32 and
            layer.weight.dtype == torch.float32 and native_plain(x) and
            min(layer.weight.shape[:2]) >= WINOGRAD_CHANNELS and _packed_convolution_available()
            and _winograd_loops(x.dtype) is not None):
        return False
    out_h, out_w = (size + 2 * p - 2 for size, p in zip(x.shape[2:], layer.pad))
    return out_h > 0 and out_w > 0 and x.shape[0] * -(-out_h // 2) * -(-out_w // 2) >= \
        WINOGRAD_TILES


def winograd_convolution(x, product, outputs, bias, pad, activation=None, out=None):
    """A stride-1 3x3 convolution of x (channels_last) by Winograd F(2x2, 3x3): `product` the
    PackedPointwise of winograd_weight (16 groups), plus bias, then the activation (a negative
    slope, or None); with `out` (channels_last, the top's shape) the result is added into it
    before the activation (a residual sum). Returns the top (channels_last)."""
    input_loop, output_loop = _winograd_loops(x.dtype)
    num, channels, height, width = x.shape
    out_h, out_w = height + 2 * pad[0] - 2, width + 2 * pad[1] - 2
    tiles_h, tiles_w = -(-out_h // 2), -(-out_w // 2)
    x = x.contiguous(memory_format=torch.channels_last)
    accumulate = out is not None
    if out is None:
        out = x.new_empty((num, out_h, out_w, outputs)).permute(0, 3, 1, 2)
    per_tile_row = num * tiles_w * 16 * max(channels, outputs) * x.element_size()
    band = max(1, min(tiles_h, WINOGRAD_BAND_BYTES // per_tile_row))
    transformed = x.new_empty(16 * num * band * tiles_w * channels)
    threads = native_threads()
    bias_ptr = bias.data_ptr() if bias is not None else None
    for ty0 in range(0, tiles_h, band):
        ty1 = min(tiles_h, ty0 + band)
        tiles = num * (ty1 - ty0) * tiles_w
        # the tiles as the pixels of one image, their 16 transforms' channels as 16 groups
        v = transformed[:16 * tiles * channels].view(1, 1, tiles, 16 * channels).permute(
            0, 3, 1, 2)
        input_loop(threads, num, x.data_ptr(), v.data_ptr(), channels, height, width, pad[0],
                   pad[1], tiles_w, ty0, ty1)
        m = product(v).contiguous(memory_format=torch.channels_last)
        output_loop(threads, num, m.data_ptr(), bias_ptr, out.data_ptr(), outputs, out_h,
                    out_w, tiles_w, ty0, ty1, accumulate, activation is not None,
                    float(activation or 0))
    return out


def _pointwise(x, weight_t, bias, channels_last):
    """A 1x1 convolution as a product: (N, C, H, W) x (C, O) -> (N, O, H, W). In channels_last
    memory the pixels' channel vectors are the rows of one matrix; a product with few outputs
    (a detection head) is faster as W . rows^T, which gives an image in the standard layout."""
    num, channels, height, width = x.shape
    outputs = weight_t.shape[1]          # explicit sizes: a batch of 0 has no -1 to infer
    if channels_last and not (num == 1 and outputs < 16):
        rows = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        rows = rows.reshape(num * height * width, channels)
        y = torch.mm(rows, weight_t) if bias is None else torch.addmm(bias, rows, weight_t)
        return y.view(num, height, width, outputs).permute(0, 3, 1, 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return _product_in_standard_layout(x, weight_t, bias)


def _pointwise_kernel(weight_t):
    """The (O, C, 1, 1) channels_last kernel of a 1x1 convolution's (C, O) product weights."""
    return weight_t.t().reshape(*weight_t.shape[::-1], 1, 1).contiguous(
        memory_format=torch.channels_last)


def _in_channels_last(x):
    """Whether x is a 4-D tensor in channels_last memory (and not also contiguous, as a tensor
    with one channel or one pixel is in both)."""
    return x.dim() == 4 and not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last)


def _pixel_rows(x):
    """(N, H*W, C) view of an (N, C, H, W) image in either layout: each pixel's channels."""
    num, channels, height, width = x.shape
    if _in_channels_last(x):
        return x.permute(0, 2, 3, 1).reshape(num, height * width, channels)
    return x.contiguous().reshape(num, channels, height * width).transpose(1, 2)


def _tap_product_convolution(x, taps_weight, bias, layer):
    """A stride-1, one-group 2-D convolution as Z = taps_weight x (all taps' outputs at every
    input pixel, one product per image) and y[o] = bias + sum over taps of Z_tap[o + shift]
    over the outputs whose tap falls inside the image (zero padding adds nothing)."""
    num, channels, height, width = x.shape
    kh, kw = layer.kernel
    (pad_h, pad_w), (dil_h, dil_w) = layer.pad, layer.dilation
    outputs = taps_weight.shape[0] // (kh * kw)
    out_h = height + 2 * pad_h - dil_h * (kh - 1)
    out_w = width + 2 * pad_w - dil_w * (kw - 1)
    columns = _pixel_rows(x).transpose(1, 2)               # (N, C, H*W)
    z = x.new_empty((num, kh * kw * outputs, height * width))
    for image in range(num):
        torch.mm(taps_weight, columns[image], out=z[image])
    z = z.view(num, kh * kw, outputs, height, width)
    y = x.new_empty((num, outputs, max(out_h, 0), max(out_w, 0)))
    if bias is None:
        y.zero_()
    else:
        y.copy_(bias.view(1, -1, 1, 1).expand_as(y))
    for i in range(kh):
        lo, hi, r = inside_range(0, out_h, height, pad_h, 1, i * dil_h)
        for j in range(kw):
            clo, chi, c = inside_range(0, out_w, width, pad_w, 1, j * dil_w)
            if lo >= hi or clo >= chi:
                continue
            y[:, :, lo:hi, clo:chi] += z[:, i * kw + j, :, r:r + hi - lo, c:c + chi - clo]
    return y


def _product_in_standard_layout(x, weight_t, bias=None):
    """(N, C, H, W) x (C, O) (+ bias) -> (N, O, H, W) in the standard layout, from an input in
    either layout without converting it: a channels_last image is the (H*W, C) matrix of its
    pixels, and W . pixels^T is the top in the standard layout (converting a large channels_last
    input costs more than the product)."""
    num, channels, height, width = x.shape
    outputs = weight_t.shape[1]
    columns = _pixel_rows(x).transpose(1, 2)
    # one matrix product per image (a batched product broadcasts the weights first)
    y = x.new_empty((num, outputs, height * width))
    for image in range(num):
        if bias is None:
            torch.mm(weight_t.t(), columns[image], out=y[image])
        else:
            torch.addmm(bias.view(-1, 1), weight_t.t(), columns[image], out=y[image])
    return y.view(num, outputs, height, width)


# PointwiseOverConcat -> threading.local of its kept temporaries (outside the module, which then
# deep-copies and pickles as before)
_THREAD_BUFFERS = weakref.WeakKeyDictionary()


class PointwiseOverConcat(_InferenceModule):
    """A 1x1 convolution of a channel concatenation, computed part by part: W [a; I(b); ...] + c
    = W_a a + I(W_b b) + ... + c, where I is an Interp resize of one part. A resize acts on each
    channel alone and the product mixes channels at each pixel, so the two commute; the product
    then runs on the part before it is resized (fewer pixels) and the concatenation of the
    resized parts is never made. `conv` is the InferenceConvolution the rewrite replaces (its
    prepared blobs, folded chain included), `parts` the channel count of each part and `resizes`
    the Interp layer of each part, or None."""

    def __init__(self, conv, parts, resizes):
        super().__init__()
        object.__setattr__(self, "conv", conv)
        object.__setattr__(self, "resizes", tuple(resizes))
        # the products of the parts at the top's size accumulate into the sum
        self.parts, self.bounds, self.order = part_layout(parts, resizes)

    def _workspace(self, name, shape, like):
        """A temporary kept between calls (it never leaves forward; one per calling thread, so
        a net may run in several threads at once, and freed with the thread or the module): a
        large top then reuses its pages instead of faulting in fresh zeroed ones on every call
        (the res net's 64 x 513 x 513 sum)."""
        local = _THREAD_BUFFERS.get(self)
        if local is None:
            local = _THREAD_BUFFERS[self] = threading.local()
        kept = local.__dict__.setdefault("buffers", {})
        buffer = kept.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or \
                buffer.device != like.device:
            buffer = kept[name] = like.new_empty(shape)
        return buffer

    def _resized(self, resize, image):
        """The Interp layer's top of a channels_last image, written into a kept buffer."""
        num, outputs, out_h, out_w = resize.output_shapes([tuple(image.shape)])[0]
        top = self._workspace("resized", (num, out_h, out_w, outputs), image).permute(0, 3, 1, 2)
        return compiled_resize(resize, image, out=top)

    def forward(self, *inputs):
        weight_t, bias = self.conv.blobs()                 # (C, O)
        outputs = weight_t.shape[1]
        # the bias joins the final conversion to the standard layout where that is compiled
        final_bias = None
        if bias is not None and _rows_to_planes_loop(inputs[0]) is not None and \
                bias.dtype == inputs[0].dtype:
            final_bias, bias = bias.contiguous(), None
        # the sum is kept in channels_last memory, as (N, pixels, O) rows: every product is
        # then one matrix product per image whatever its part's layout, and the resized parts
        # are resized in channels_last memory (torch's bilinear resize is several times faster
        # there); it goes to the standard layout once at the end
        total = None
        for i in self.order:
            x, resize, (lo, hi) = inputs[i], self.resizes[i], self.bounds[i]
            num, _, height, width = x.shape
            rows = _pixel_rows(x)
            if resize is None:
                size = (height, width)
                if total is None:
                    total = self._workspace("total", (num, height * width, outputs), x)
                    for n in range(num):
                        if bias is None:
                            torch.mm(rows[n], weight_t[lo:hi], out=total[n])
                        else:
                            torch.addmm(bias, rows[n], weight_t[lo:hi], out=total[n])
                    bias = None
                else:
                    for n in range(num):
                        torch.addmm(total[n], rows[n], weight_t[lo:hi], out=total[n])
                continue
            product = x.new_empty((num, height * width, outputs))
            for n in range(num):
                torch.mm(rows[n], weight_t[lo:hi], out=product[n])
            image = product.view(num, height, width, outputs).permute(0, 3, 1, 2)
            if total is not None:       # resized straight into the sum, where that is compiled
                size_out = resize.output_shapes([tuple(image.shape)])[0][2:]
                into = total.view(num, *size_out, outputs).permute(0, 3, 1, 2) \
                    if total.shape[1] == size_out[0] * size_out[1] else None
                if into is not None and \
                        compiled_resize(resize, image, out=into, accumulate=True) is not None:
                    continue
            resized = self._resized(resize, image)
            size = tuple(resized.shape[2:])
            if total is None:
                total = self._workspace("total", (num, size[0] * size[1], outputs), x)
                total.view(num, *size, outputs).copy_(resized.permute(0, 2, 3, 1))
            else:
                total.view(num, *resized.shape[2:], outputs).add_(resized.permute(0, 2, 3, 1))
        height, width = size
        image = total.view(total.shape[0], height, width, outputs).permute(0, 3, 1, 2)
        if bias is not None:
            image = image + bias.view(1, -1, 1, 1)
        if final_bias is not None and not _in_channels_last(image):
            image = image + final_bias.view(1, -1, 1, 1)     # one output channel or pixel
            final_bias = None
        top = standard_layout(image, bias=final_bias)
        # the top leaves: never the kept sum itself (one output channel is contiguous already)
        return top.clone() if top.data_ptr() == total.data_ptr() else top

    def extra_repr(self):
        return f"parts={list(self.parts)}, resized={[r is not None for r in self.resizes]}"


class InferenceMaskedConv(_InferenceModule):
    """A fused segmentation-aware convolution without autograd, with the ReLU / leaky ReLU that
    reads its fresh top applied band by band (`activation`: the negative slope, or None).

    With `channels_last` (set by the layout pass; one group) the top is in channels_last
    memory, and with `pixel_major` as well (float32 CPU images of enough channels) each band's
    masked columns are written pixel-major and multiplied by oneDNN's 1x1 convolution, with the
    weights reordered once (per weight value) and the bias and activation as its post-ops (see
    kernels.masked_conv.PIXEL_MAJOR). Elsewhere, or where oneDNN refuses, the band loop runs."""

    def __init__(self, fused):
        super().__init__()
        object.__setattr__(self, "fused", fused)   # its convolution owns the parameters
        self.geometry = ConvGeometry(tuple(fused.kernel_size), tuple(fused.pad),
                                     tuple(fused.stride), tuple(fused.dilation))
        self.activation = None
        self.channels_last = self.pixel_major = False
        self._blob_watch = _BlobWatch((fused.conv,))
        self._packed = None             # PackedPointwise of the pixel-major weights
        self._pixel_failed = False

    def __getstate__(self):
        # oneDNN's reordered weights are opaque tensors: a copy makes its own
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def set_channels_last(self, channels_last):
        self.channels_last = bool(channels_last) and self.fused.group == 1
        self.pixel_major = self.channels_last and PACKED_CONVOLUTION and \
            masked_conv_kernels.PIXEL_MAJOR and \
            self.fused.conv.weight[0].numel() >= masked_conv_kernels.PIXEL_MAJOR_COLUMNS and \
            onednn_pointwise_available()

    def forward(self, x, mask):
        blobs = self.fused.conv.caffe_blobs()
        weight, bias = blobs[0], blobs[1] if len(blobs) > 1 else None
        if self.pixel_major and not self._pixel_failed and x.dim() == 4 and \
                native_plain(x, mask, weight) and x.dtype == mask.dtype == weight.dtype == \
                torch.float32 and (bias is None or bias.dtype == torch.float32) and \
                x.numel() and mask.numel():
            top = self._pixel_major_forward(x, mask, weight, bias)
            if top is not None:
                return top
        return masked_conv2d_inference(x, mask, weight, bias, self.geometry, self.fused.group,
                                       self.activation, self.channels_last)

    def _pixel_major_forward(self, x, mask, weight, bias):
        if self._blob_watch.changed():
            self._packed = None
        attr, scalars = onednn_activation(self.activation)
        bias = bias.detach().contiguous() if bias is not None else None

        if self._packed is None:
            weight = weight.detach()
            self._packed = PackedPointwise(lambda: pixel_major_weight(weight))
        product = self._packed
        try:
            return masked_conv2d_pixel_major(x, mask, weight.shape[0], self.geometry,
                                             lambda columns: product(columns, bias, attr,
                                                                     scalars))
        except RuntimeError:        # oneDNN refused the shapes: the bands of the exact path
            self._pixel_failed, self._packed = True, None
            return None

    def extra_repr(self):
        return f"{self.fused.extra_repr()}, activation={self.activation}" + \
            (", pixel-major" if self.pixel_major else
             ", channels_last" if self.channels_last else "")


class ChannelAffine(_InferenceModule):
    """A chain of fixed per-channel affine layers (BatchNorm with stored statistics, Scale,
    Bias) as one pass: y = b + x * a."""

    def __init__(self, chain, channels):
        super().__init__()
        object.__setattr__(self, "chain", tuple(chain))
        self.channels = channels
        self._blobs = None
        self._blob_watch = _BlobWatch(self.chain)

    def forward(self, x):
        if self._blob_watch.changed():
            with torch.no_grad():
                a, b = _chain_affine(self.chain, self.channels)
                self._blobs = a.to(x.dtype), b.to(x.dtype)
        a, b = self._blobs
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(b.reshape(shape), x, a.reshape(shape))

    def extra_repr(self):
        return ", ".join(type(m).__name__ for m in self.chain)


class InferencePooling(_InferenceModule):
    """MAX pooling without indices, or AVE pooling, with Caffe's windows (layers/pooling.py).

    MAX: the maximum of the window's taps taken as strided views of the input, each clipped to
    the image, into a top that starts at -FLT_MAX as Caffe's does (an empty window stays there);
    with `relu` or `prelu` (monotone maps whose slopes are >= 0, which commute with a maximum)
    the activation that came before the pooling runs on the smaller top instead. Large kernels
    use torch's max_pool2d over a copy padded to the windows' extent. AVE: torch's avg_pool2d
    where its padding and ceil rule give Caffe's windows, else the layer's own code."""
    MAX_TAPS = 16
    # below this many input values torch's pooling is as fast (the compiled loop's call costs a
    # few microseconds: CIFAR-10 quick's 8x8 and 16x16 AVE poolings)
    COMPILED_MIN_ELEMENTS = 1 << 16

    def __init__(self, layer, activation=None):
        super().__init__()
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "activation", activation)
        self.method = layer.method
        self._plans = {}                 # (input shape, channels_last) -> _plan's answer

    def forward(self, x):
        activation = self.activation
        plan = self._plan(x)
        if activation is not None and not self._commutes(plan):
            x = _activation(activation, x)       # it no longer commutes: apply it first
            activation = None
        top = plan[0](x)
        return top if activation is None else _activation(activation, top, in_place=True)

    def _plan(self, x):
        """(pool, windows_nonempty) for inputs of x's shape and layout: the function that pools
        such an input, and whether every window holds a pixel. Made once per shape."""
        cl = _in_channels_last(x)
        key = (x.shape, cl)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = (self._pool_function(self.layer, x.shape, cl),
                                 self._windows_nonempty(x.shape))
        return plan

    def _commutes(self, plan):
        """Whether the activation may run after the pooling: it is monotone (slopes >= 0) and
        no window is empty (an empty window's -FLT_MAX would go through it)."""
        activation = self.activation
        if isinstance(activation, PReLU):
            if bool((activation.slope < 0).any()):
                return False
        elif activation.negative_slope < 0:
            return False
        return plan[1]

    def _windows_nonempty(self, shape):
        layer = self.layer
        if layer.global_pooling:
            return True
        out = layer.output_spatial_size(*shape[-2:])
        return all((o - 1) * s - p < size for o, s, p, size in
                   zip(out, layer.stride, layer.pad, shape[-2:]))

    def _pool_function(self, layer, shape, channels_last):
        height, width = shape[-2:]
        method = self.method
        if layer.global_pooling:
            if method == "MAX":
                return lambda x: x.amax((-2, -1), keepdim=True)
            return lambda x: x.mean((-2, -1), keepdim=True)
        kernel, pad, stride = layer.kernel, layer.pad, layer.stride
        out = layer.output_spatial_size(height, width)
        ceil = None                 # torch's window rule that gives Caffe's windows, if any
        if all(p <= k // 2 for p, k in zip(pad, kernel)):
            ceil = next((c for c in (True, False)
                         if _torch_pooled(height, width, kernel, pad, stride, c) == out), None)
        taps = kernel[0] * kernel[1]
        # torch's channels_last max pool beats the tap maxima there, but for 2x2 windows
        torch_first = ceil is not None and taps > 4 and channels_last
        if method in ("MAX", "AVE") and math.prod(shape) >= self.COMPILED_MIN_ELEMENTS:
            fallback = self._torch_pool_function(kernel, pad, stride, out, ceil, taps,
                                                 torch_first, height, width)
            loop = "max_pool" if method == "MAX" else "avg_pool"
            return lambda x: compiled_pool(loop, x, kernel, pad, stride, out, fallback)
        return self._torch_pool_function(kernel, pad, stride, out, ceil, taps, torch_first,
                                         height, width)

    def _torch_pool_function(self, kernel, pad, stride, out, ceil, taps, torch_first, height,
                             width):
        layer, method = self.layer, self.method
        if method == "MAX" and taps <= self.MAX_TAPS and not torch_first:
            return lambda x: tap_max_pool(x, kernel, pad, stride, out)
        if ceil is not None:
            if method == "MAX":
                return lambda x: torch.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil)
            return lambda x: F.avg_pool2d(x, kernel, stride, pad, ceil_mode=ceil,
                                          count_include_pad=True)
        if method == "MAX":
            borders = (pad[1], _after(out[1], width, kernel[1], pad[1], stride[1]),
                       pad[0], _after(out[0], height, kernel[0], pad[0], stride[0]))
            return lambda x: torch.max_pool2d(F.pad(x, borders, value=-FLT_MAX), kernel, stride)
        return layer

    def extra_repr(self):
        after = f", then {type(self.activation).__name__}" if self.activation is not None else ""
        return self.method + after


def compiled_pool(name, x, kernel, pad, stride, out_hw, fallback):
    """Caffe's MAX ("max_pool") or AVE ("avg_pool") pooling of an (N, C, H, W) image in either
    layout as one compiled loop (kernels/cpu/pooling.c), its top in the same layout; fallback(x)
    where that loop is missing or x does not suit it."""
    loop = native_function("pooling.c", name, x.dtype)
    if loop is None or not native_plain(x) or x.dim() != 4:
        return fallback(x)
    num, channels, height, width = x.shape
    if x.is_contiguous():
        top = x.new_empty((num, channels, *out_hw))
        planes, inner = num * channels, 1
    elif _in_channels_last(x) and channels >= 16:
        # (with fewer channels the runs per pixel are too short for the loop: MTCNN's 10)
        top = torch.empty((num, channels, *out_hw), dtype=x.dtype,
                          memory_format=torch.channels_last)
        planes, inner = num, channels
    else:
        return fallback(x)
    if loop(native_threads(), planes, x.data_ptr(), top.data_ptr(), inner, height, width,
            *out_hw, *kernel, *pad, *stride) != 0:
        raise MemoryError(f"pooling: no memory for a row of {width} values")
    return top


def tap_max_pool(x, kernel, pad, stride, out_hw):
    """Caffe's MAX pooling of (N, C, H, W) as running maxima over the kernel's taps, one spatial
    axis at a time: a window is a rectangle clipped to the image, so its maximum is the maximum
    over its rows of the maxima over its columns (2 (k - 1) passes instead of k^2 - 1). A window
    with nothing inside stays at -FLT_MAX, as Caffe's does."""
    (kh, kw), (ph, pw), (sh, sw), (out_h, out_w) = kernel, pad, stride, out_hw
    columns = _running_max(x, 3, kw, pw, sw, out_w)
    return _running_max(columns, 2, kh, ph, sh, out_h)


def _running_max(x, axis, kernel, pad, stride, out):
    """Maxima along one axis of (N, C, H, W) over windows of `kernel` taps, `stride` apart,
    starting `pad` before the first element and clipped to the axis."""
    size = x.shape[axis]
    layout = torch.channels_last if _in_channels_last(x) else torch.contiguous_format
    shape = list(x.shape)
    shape[axis] = out
    top = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)

    def along(tensor, start, stop, step=1):
        index = [slice(None)] * tensor.dim()
        index[axis] = slice(start, stop, step)
        return tensor[tuple(index)]

    taps = []
    for tap in range(kernel):
        lo, hi, first = inside_range(0, out, size, pad, stride, tap)
        if lo < hi:
            taps.append((lo, hi, along(x, first, first + (hi - lo - 1) * stride + 1, stride)))
    full = [t for t in taps if (t[0], t[1]) == (0, out)]
    if len(full) >= 2:           # two taps every window has: the first pass writes the top
        (_, _, a), (_, _, b) = full[:2]
        torch.maximum(a, b, out=top)
        taps = [t for t in taps if t is not full[0] and t is not full[1]]
    elif len(full) == 1:
        top.copy_(full[0][2])
        taps = [t for t in taps if t is not full[0]]
    else:
        top.fill_(-FLT_MAX)
    for lo, hi, source in taps:
        target = along(top, lo, hi)
        torch.maximum(target, source, out=target)
    return top


def _torch_pooled(height, width, kernel, pad, stride, ceil):
    """torch's pooled size (max_pool2d / avg_pool2d with `padding=pad`, `ceil_mode=ceil`)."""
    sizes = []
    for size, k, p, s in zip((height, width), kernel, pad, stride):
        span = size + 2 * p - k
        out = (-(-span // s) if ceil else span // s) + 1
        if ceil and (out - 1) * s >= size + p:
            out -= 1
        sizes.append(out)
    return tuple(sizes)


def prelu(x, slope):
    """PReLU as torch's one-pass kernel (a shared slope is a 0-axis blob)."""
    return F.prelu(x, slope.reshape(1) if slope.dim() == 0 else slope)


def _activation(layer, x, in_place=False):
    """A ReLU or PReLU layer's map applied to x (in place when allowed)."""
    if isinstance(layer, PReLU):
        return prelu(x, layer.slope)
    if layer.negative_slope == 0:
        return torch.relu_(x) if in_place else torch.relu(x)
    return F.leaky_relu(x, layer.negative_slope, inplace=in_place)


class InferencePReLU(_InferenceModule):
    """PReLU as torch's one-pass kernel, with the layer's slope."""

    def __init__(self, layer):
        super().__init__()
        object.__setattr__(self, "layer", layer)

    def forward(self, x):
        return prelu(x, self.layer.slope)


class InferenceInterp(_InferenceModule):
    """An Interp layer's resize as one compiled loop (reading only the rows and columns it
    samples, in either layout, its top in the input's); the layer's own resize elsewhere."""

    def __init__(self, layer):
        super().__init__()
        object.__setattr__(self, "layer", layer)

    def forward(self, x):
        return compiled_resize(self.layer, x)


class InferencePriorBox(_InferenceModule):
    """A PriorBox layer's boxes, which depend only on the shapes of its bottoms: computed once
    per (feature size, image size, dtype, device), then a copy of them per call (a reader may
    write into its bottom)."""

    def __init__(self, layer):
        super().__init__()
        object.__setattr__(self, "layer", layer)
        self._boxes = {}

    def forward(self, feature, image):
        key = (tuple(feature.shape[2:]), tuple(image.shape[2:]), feature.dtype, feature.device)
        boxes = self._boxes.get(key)
        if boxes is None:
            if len(self._boxes) >= 8:
                self._boxes.clear()
            boxes = self._boxes[key] = self.layer(feature, image)
        return boxes.clone()


def compiled_resize(layer, x, out=None, accumulate=False):
    """Interp `layer`'s top of x (written into `out` when given: the top's shape, contiguous in
    x's layout), through the compiled loop (layers.interp.bilinear_into) where it applies, else
    the layer's resize. accumulate=True adds it to `out` instead: only through the compiled loop
    (None where that does not run, and nothing is written)."""
    if accumulate and out is None:
        return None
    if x.dim() == 4:
        crop, size = layer.crop_and_size(x)
        if size != tuple(crop.shape[-2:]):
            top = out if out is not None else torch.empty(
                (*x.shape[:2], *size), dtype=x.dtype, memory_format=torch.channels_last
                if _in_channels_last(x) else torch.contiguous_format)
            if bilinear_into(x, crop, top, accumulate):
                return top
    return None if accumulate else layer.resize(x, out=out)


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def standard_layout(x, bias=None):
    """x in the standard (contiguous) layout, plus a per-channel `bias` when given (for a
    channels_last x only: the conversion's pass adds it). A channels_last image is each image's
    (H*W, C) matrix transposed: a compiled tiled loop where there is one, else torch's 2-D
    transpose (its 4-D copy from channels_last is several times slower: 54 vs 7 ms for
    64 x 321 x 321 on one thread)."""
    if not isinstance(x, torch.Tensor) or x.is_contiguous():
        return x
    if not _in_channels_last(x):
        return x.contiguous()
    num, channels, height, width = x.shape
    out = torch.empty((num, channels, height, width), dtype=x.dtype, device=x.device)
    loop = _rows_to_planes_loop(x)
    if loop is not None and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())):
        loop(native_threads(), num, x.data_ptr(), out.data_ptr(),
             bias.data_ptr() if bias is not None else None, height * width, channels)
        return out
    if bias is not None:
        raise ValueError("standard_layout: a bias needs the compiled conversion")
    for image in range(num):
        out[image].view(channels, height * width).copy_(
            x[image].permute(1, 2, 0).reshape(height * width, channels).t())
    return out


def _rows_to_planes_loop(x):
    """kernels/cpu/layout.c's conversion for a CPU tensor like x, or None."""
    if not native_plain(x):
        return None
    return native_function("layout.c", "rows_to_planes", x.dtype)


def _leaky_relu_(x, slope):
    return F.leaky_relu(x, slope, inplace=True)


def _add_(a, b):
    return a.add_(b)


def _add_relu_(a, b):
    """relu(a + b) written into a, in one pass (torch's fused kernel)."""
    return torch.ops.aten._add_relu_(a, b)


def _fused_add_relu_available():
    return hasattr(torch.ops.aten, "_add_relu_")


# ---------------------------------------------------------------------------- the rewrite
class _Rewriter:
    def __init__(self, net, exact, use_channels_last):
        self.net = net
        self.class_name = type(exact).__name__ + "Inference"
        self.graph = copy.deepcopy(exact.graph)
        self.modules = {}          # qualified name -> module of the new GraphModule
        self.channels_last = use_channels_last
        self._taken = set()

    # ----------------------------------------------------------------- helpers
    def module_of(self, node):
        """The net's layer module a node calls (None for other nodes and for new modules)."""
        if node.op != "call_module" or node.target in self.modules:
            return None
        return self.net.get_submodule(node.target)

    def blob_shape(self, node):
        blob = node.meta.get("blob")
        return self.net.blob_shapes.get(blob) if blob is not None else None

    def add_module(self, base, module):
        key = f"inference.{base}"
        i = 1
        while key in self._taken:
            i += 1
            key = f"inference.{base}_{i}"
        self._taken.add(key)
        self.modules[key] = module
        return key

    def replace(self, node, op, target, args, module=None):
        """A new node computing `node`'s value; `node` goes."""
        with self.graph.inserting_before(node):
            if op == "call_module":
                new = self.graph.call_module(self.add_module(node.target.split(".")[-1], module),
                                             tuple(args))
            else:
                new = self.graph.call_function(target, tuple(args))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return new

    def bypass(self, node, value):
        node.replace_all_uses_with(value)
        self.graph.erase_node(node)

    # ----------------------------------------------------------------- passes
    def strip_bookkeeping(self):
        from .net import refuse_gradient, track_grad
        for node in list(self.graph.nodes):
            if node.op == "call_function" and node.target in (torch.detach, refuse_gradient,
                                                              track_grad):
                self.bypass(node, node.args[0])
        for node in list(self.graph.nodes):
            module = self.module_of(node)
            if isinstance(module, Dropout) and not module.train_phase:
                self.bypass(node, node.args[0])
            elif isinstance(module, Split):
                for user in list(node.users):
                    if user.op == "call_function" and user.target is operator.getitem:
                        self.bypass(user, node.args[0])
                if node.users and module.num_tops == 1:
                    node.replace_all_uses_with(node.args[0])
                if not node.users:
                    self.graph.erase_node(node)

    def _affine_chain(self, node, channels, ndim):
        chain, last = [], node
        while len(last.users) == 1:
            user = next(iter(last.users))
            module = self.module_of(user)
            if module is None or user.args != (last,) or \
                    not affine_layer(module, user, channels, ndim):
                break
            chain.append((user, module))
            last = user
        return chain

    def fold(self):
        erased = set()
        for node in list(self.graph.nodes):
            if node in erased or node.op != "call_module":
                continue
            module = self.module_of(node)
            shape = self.blob_shape(node)
            if shape is None or len(node.args) != 1:
                continue
            if self._foldable_producer(module, shape):
                chain = self._affine_chain(node, shape[1], len(shape))
                op = InferenceConvolution(module, [m for _, m in chain],
                                          channels_last=self.channels_last)
                erased.update(self._collapse(node, chain, op))
            elif isinstance(module, (BatchNorm, Scale, Bias)) and len(shape) >= 2 and \
                    affine_layer(module, node, shape[1], len(shape)):
                chain = [(node, module)] + self._affine_chain(node, shape[1], len(shape))
                # the chain's first layer keeps the place of the new node
                head, rest = chain[0][0], chain[1:]
                op = ChannelAffine([m for _, m in chain], shape[1])
                erased.update(self._collapse(head, rest, op))

    @staticmethod
    def _foldable_producer(module, shape):
        if isinstance(module, Convolution):
            return module.channel_axis == 1 and len(shape) == 4
        if isinstance(module, Deconvolution):
            return module.channel_axis == 1 and len(shape) == 4
        if isinstance(module, InnerProduct):
            return module.axis == 1 and len(shape) == 2
        return False

    def _collapse(self, head, chain, op):
        last = chain[-1][0] if chain else head
        with self.graph.inserting_before(head):
            new = self.graph.call_module(self.add_module(head.target.split(".")[-1], op),
                                         head.args)
        new.meta.update(head.meta)
        new.meta["blob"] = last.meta.get("blob")
        last.replace_all_uses_with(new)
        gone = [node for node, _ in reversed(chain)] + [head]
        for node in gone:
            self.graph.erase_node(node)
        return gone

    def split_concat_products(self):
        """A 1x1 convolution whose bottom is a channel Concat read by nothing else, where some
        parts are Interp resizes read by nothing else: the product runs on each part, before its
        resize (PointwiseOverConcat), when that saves work (a resized part with more channels
        than the convolution has outputs)."""
        for node in list(self.graph.nodes):
            op = self.modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(op, InferenceConvolution) or not op.pointwise or len(node.args) != 1:
                continue
            layer = op.layer
            if layer.bottom_is_im2col or layer.channel_axis != 1:
                continue
            concat = node.args[0]
            found = concat_parts(concat, self.module_of, self.blob_shape, layer.num_output)
            if found is None:
                continue
            parts, inputs, resizes = found
            removed = [p for p, r in zip(concat.args, resizes) if r is not None]
            self.replace(node, "call_module", None, inputs,
                         PointwiseOverConcat(op, parts, resizes))
            self.graph.erase_node(concat)
            for part in removed:
                self.graph.erase_node(part)

    def commute_activations(self):
        """ReLU / PReLU read only by a MAX pooling: pool first, then the activation on the
        (smaller) pooled top (InferencePooling checks at each call that this is exact)."""
        for node in list(self.graph.nodes):
            pool = self.module_of(node)
            if not (isinstance(pool, Pooling) and pool.method == "MAX" and not pool.mask_top
                    and len(node.args) == 1 and isinstance(node.args[0], fx.Node)):
                continue
            source = node.args[0]
            activation = self.module_of(source)
            if isinstance(activation, (ReLU, PReLU)) and len(source.users) == 1 and \
                    len(source.args) == 1:
                new = self.replace(node, "call_module", None, source.args,
                                   InferencePooling(pool, activation))
                new.meta["blob"] = node.meta.get("blob")
                self.graph.erase_node(source)

    def simplify_layers(self):
        for node in list(self.graph.nodes):
            module = self.module_of(node)
            if module is None:
                continue
            if isinstance(module, Pooling) and module.method in ("MAX", "AVE") \
                    and not module.mask_top:
                self.replace(node, "call_module", None, node.args, InferencePooling(module))
            elif isinstance(module, PReLU):
                self.replace(node, "call_module", None, node.args, InferencePReLU(module))
            elif isinstance(module, Interp) and len(node.args) == 1:
                self.replace(node, "call_module", None, node.args, InferenceInterp(module))
            elif isinstance(module, PriorBox) and len(node.args) == 2 and not node.kwargs:
                self.replace(node, "call_module", None, node.args, InferencePriorBox(module))
            elif isinstance(module, FusedMaskedConv) and len(node.args) == 2 and not node.kwargs:
                self.replace(node, "call_module", None, node.args, InferenceMaskedConv(module))
            elif isinstance(module, ReLU):
                if module.negative_slope == 0:
                    self.replace(node, "call_function", torch.relu, node.args)
                else:
                    self.replace(node, "call_function", F.leaky_relu,
                                 (node.args[0], module.negative_slope))
            elif isinstance(module, Softmax) and len(node.args) == 1:
                self.replace(node, "call_function", torch.softmax, (node.args[0], module.axis))
            elif isinstance(module, Eltwise) and module.operation == "SUM" and \
                    not module.coeffs and len(node.args) == 2:
                self.replace(node, "call_function", torch.add, node.args)
            elif isinstance(module, (Convolution, Deconvolution, InnerProduct)) and \
                    len(node.args) == 1 and self._foldable_producer(module, self.blob_shape(node) or ()):
                self.replace(node, "call_module", None, node.args,
                             InferenceConvolution(module, channels_last=self.channels_last))

    def _fresh(self, node):
        """Whether `node`'s value is memory it allocated, read by one node only."""
        if len(node.users) != 1:
            return False
        if node.op == "call_module" and node.target.startswith("inference."):
            return isinstance(self.modules[node.target], (InferenceConvolution, ChannelAffine,
                                                          InferencePooling, InferenceMaskedConv))
        return node.op == "call_function" and node.target in (torch.add, _add_, _add_relu_)

    def fuse_activations(self):
        """A ReLU / leaky ReLU whose bottom is a convolution's fresh top: the convolution
        applies it (oneDNN's post-op, in place on its top, or on each band of a fused
        segmentation-aware convolution)."""
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in (torch.relu, F.leaky_relu) or \
                    not node.args or not isinstance(node.args[0], fx.Node):
                continue
            source = node.args[0]
            op = self.modules.get(source.target) if source.op == "call_module" else None
            if not isinstance(op, (InferenceConvolution, InferenceMaskedConv)) or \
                    op.activation is not None or not self._fresh(source):
                continue
            slope = node.args[1] if node.target is F.leaky_relu else 0
            if len(node.args) > 2 or node.kwargs or not isinstance(slope, (int, float)):
                continue
            op.activation = float(slope)
            source.meta["blob"] = node.meta.get("blob")
            self.bypass(node, source)

    def in_place(self):
        for node in list(self.graph.nodes):
            if node.op == "call_function" and node.target is torch.add and len(node.args) == 2 \
                    and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args) \
                    and node.args[0] is not node.args[1] and not self._fresh(node.args[0]) \
                    and self._fresh(node.args[1]):
                # a sum is commutative (exactly, in floating point): the fresh bottom goes first
                node.args = (node.args[1], node.args[0])
            if node.op != "call_function" or not node.args or \
                    not isinstance(node.args[0], fx.Node) or not self._fresh(node.args[0]):
                continue
            if node.target is torch.relu:
                self.replace(node, "call_function", torch.relu_, node.args)
            elif node.target is F.leaky_relu:
                self.replace(node, "call_function", _leaky_relu_, node.args)
            elif node.target is torch.add:
                self.replace(node, "call_function", _add_, node.args)

    def fuse_add_relu(self):
        """An in-place sum read only by an in-place ReLU (a residual block's end): one pass."""
        if not _fused_add_relu_available():
            return
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target is not torch.relu_ or \
                    len(node.args) != 1:
                continue
            total = node.args[0]
            if isinstance(total, fx.Node) and total.op == "call_function" and \
                    total.target is _add_ and len(total.users) == 1:
                self.replace(node, "call_function", _add_relu_, total.args)
                self.graph.erase_node(total)

    # modules whose top is memory they allocated, and the functions whose result is such memory
    _ALLOCATING_MODULES = (InferenceConvolution, InferencePooling, ChannelAffine,
                           InferenceMaskedConv)
    _ALLOCATING_FUNCTIONS = (torch.add, _add_, _add_relu_)

    def _owned_and_dead_after(self, value, node, order):
        """Whether the graph may overwrite `value` at `node`: it is memory a node of the graph
        allocated (not an input, not a view), and every other reader reads it before `node`
        and keeps nothing of it (convolutions and poolings read and write elsewhere)."""
        if value.op == "call_module":
            if not isinstance(self.modules.get(value.target), self._ALLOCATING_MODULES):
                return False
        elif value.op != "call_function" or value.target not in self._ALLOCATING_FUNCTIONS:
            return False
        for user in value.users:
            if user is node:
                continue
            if order[user] > order[node] or user.op != "call_module" or \
                    not isinstance(self.modules.get(user.target), self._ALLOCATING_MODULES):
                return False
        return True

    def fuse_residual_sums(self):
        """A sum (+ ReLU) of a 2-D convolution's fresh top and a tensor the graph owns and reads
        no more (a residual block's end): the convolution adds its top into that tensor, with the
        ReLU, as oneDNN post-ops (no separate pass over the sum)."""
        if not _packed_convolution_available() or not PACKED_CONVOLUTION:
            return
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in (_add_, _add_relu_) or \
                    len(node.args) != 2 or node.kwargs:
                continue
            for conv, residual in (node.args, node.args[::-1]):
                op = self.modules.get(conv.target) if isinstance(conv, fx.Node) and \
                    conv.op == "call_module" else None
                if not isinstance(op, InferenceConvolution) or not isinstance(residual, fx.Node) \
                        or not isinstance(op.layer, Convolution) or op.layer.bottom_is_im2col \
                        or op.tap_product or not op.channels_last or op.activation is not None \
                        or op.residual is not None or len(conv.users) != 1 \
                        or len(conv.args) != 1 or conv.args[0] is residual \
                        or order[residual] > order[conv] \
                        or not self._owned_and_dead_after(residual, node, order):
                    continue
                op.residual = "add_relu" if node.target is _add_relu_ else "add"
                with self.graph.inserting_before(node):
                    new = self.graph.call_module(conv.target, (conv.args[0], residual))
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                self.graph.erase_node(node)
                self.graph.erase_node(conv)
                order = {n: i for i, n in enumerate(self.graph.nodes)}
                break

    # nodes that compute the right values whatever the memory layout of their tensor inputs
    _LAYOUT_FREE_FUNCTIONS = (torch.relu, torch.relu_, F.leaky_relu, _leaky_relu_, torch.add,
                              _add_, _add_relu_, torch.softmax)
    # (PointwiseOverConcat reads either layout and gives its top in the standard one)
    # (a PriorBox reads its bottoms' shapes only)
    _LAYOUT_FREE_MODULES = (InferenceConvolution, ChannelAffine, InferencePooling, InferencePReLU,
                            PointwiseOverConcat, InferenceInterp, InferencePriorBox)
    _LAYOUT_FREE_LAYERS = (Eltwise, Concat, Softmax)

    def _layout_free(self, node):
        if node.op == "call_function":
            return node.target in self._LAYOUT_FREE_FUNCTIONS
        if node.op == "call_module":
            if node.target.startswith("inference."):
                return isinstance(self.modules[node.target], self._LAYOUT_FREE_MODULES)
            return isinstance(self.module_of(node), self._LAYOUT_FREE_LAYERS)
        return False

    # a convolution with at most this many inputs per output (C/group x kh x kw) runs in
    # channels_last memory even when its top must be converted back for a reader: oneDNN's
    # reorders to and from the standard layout cost most next to little work per pixel
    # (MTCNN's 3- to 32-channel layers: 1.5-2x faster); above it, only when no conversion follows
    # (vgg's 64- to 1024-channel layers before Im2dist and the fused convolutions: slower)
    SMALL_FAN_IN = 576
    # ... or with a top of at most this many values per image: its conversion back costs little
    # next to the product, and oneDNN's reordered weights are 5-15% faster there (SSD's
    # 256- and 512-channel layers at 19x19 to 38x38 on AMD Zen 4; vgg's 64-channel 321x321
    # tops before Im2dist, 6.6M values, stay as they are)
    SMALL_TOP = 1 << 20

    def _conv_nodes(self):
        return [n for n in self.graph.nodes if n.op == "call_module" and n.target in self.modules
                and isinstance(self.modules[n.target], InferenceConvolution)]

    def _needs_standard(self, node):
        """Whether `node`'s value reaches, through layout-free nodes, a reader that needs the
        standard layout (a convolution reader takes any layout)."""
        seen, stack = set(), [node]
        while stack:
            for user in stack.pop().users:
                if user in seen:
                    continue
                seen.add(user)
                # convolutions and products over a concatenation take any layout and give
                # their top the layout they choose
                if user.op == "call_module" and user.target in self.modules and \
                        (isinstance(self.modules[user.target],
                                    (InferenceConvolution, PointwiseOverConcat)) or
                         self._channels_last_masked_conv(user)):
                    continue
                if not self._layout_free(user):
                    return True
                stack.append(user)
        return False

    def _channels_last_masked_conv(self, node):
        """Whether `node` is a fused segmentation-aware convolution that reads either layout
        and gives its top in channels_last memory."""
        return node.op == "call_module" and \
            isinstance(self.modules.get(node.target), InferenceMaskedConv) and \
            self.modules[node.target].channels_last

    def layouts(self):
        """Choose channels_last per convolution, mark what may be channels_last, and give every
        other reader the standard layout."""
        for node in self.graph.nodes:
            if node.op == "call_module" and \
                    isinstance(self.modules.get(node.target), InferenceMaskedConv):
                self.modules[node.target].set_channels_last(self.channels_last)
        for node in self._conv_nodes():
            op = self.modules[node.target]
            shape = self.blob_shape(node)
            small = not op.pointwise and (
                op.layer.weight[0].numel() <= self.SMALL_FAN_IN or
                (shape is not None and len(shape) == 4 and
                 shape[1] * shape[2] * shape[3] <= self.SMALL_TOP))
            op.set_channels_last(self.channels_last and (small or not self._needs_standard(node)))
        maybe, standard = set(), {}
        for node in list(self.graph.nodes):
            if node.op == "call_module" and node.target in self.modules and \
                    isinstance(self.modules[node.target], InferenceConvolution):
                if self.modules[node.target].channels_last:
                    maybe.add(node)
                continue        # it takes any layout and chooses its top's
            if self._channels_last_masked_conv(node):
                maybe.add(node)
                continue
            inputs = [a for a in node.all_input_nodes if a in maybe]
            if not inputs:
                continue
            if self._layout_free(node):
                maybe.add(node)
                continue
            for a in inputs:
                if a not in standard:
                    with self.graph.inserting_after(a):
                        standard[a] = self.graph.call_function(standard_layout, (a,))
                        standard[a].meta.update(blob=a.meta.get("blob"))
                node.replace_input_with(a, standard[a])

    def build(self):
        self.strip_bookkeeping()
        self.fold()
        self.split_concat_products()
        self.commute_activations()
        self.simplify_layers()
        self.fuse_activations()
        self.in_place()
        self.fuse_add_relu()
        self.layouts()
        self.fuse_residual_sums()
        self.graph.lint()
        root = {}
        for node in self.graph.nodes:
            if node.op == "call_module" and node.target not in self.modules:
                root[node.target] = self.net.get_submodule(node.target)
            elif node.op == "get_attr":     # a learnable blob read by the graph itself
                module, _, attribute = node.target.rpartition(".")
                root[node.target] = getattr(self.net.get_submodule(module), attribute)
        root.update(self.modules)
        return fx.GraphModule(root, self.graph, class_name=self.class_name)


def inference_graph(net, exact, channels_last=None):
    """The inference GraphModule of `exact` (a GraphModule of `net.graph_module`)."""
    use = CHANNELS_LAST if channels_last is None else channels_last
    return _Rewriter(net, exact, use).build()
