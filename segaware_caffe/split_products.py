"""The graph `Net.forward` runs with autograd on: the exact graph, with a 1x1 Convolution of a
channel Concat whose parts include Interp resizes computed part by part (the released nets'
embedding head, in training).

W [a; I(b); ...] + c = W_a a + I(W_b b) + ... + c, where I is an Interp resize: a resize acts on
each channel alone and the product mixes channels at each pixel, so the two commute. The
product then runs on a part before its resize (fewer pixels, and the convolution's outputs are
resized instead of the part's channels), and neither the resized parts nor the concatenation
are made. Autograd differentiates the parts' products and resizes, which is Caffe's gradient
with the sums in another order (float rounding): vgg's embedding head at 321x321, forward and
backward, 454 -> 108 ms at one thread.

The rewrite applies only where the Concat top and the resized tops are read by nothing but
the convolution and the Concat (a blob asked for as an output keeps the layer-by-layer path),
and where some resized part has more channels than the convolution has outputs.
"""
import copy

import torch.nn.functional as F
from torch import fx, nn

from .layers.concat import Concat
from .layers.convolution import Convolution, _batched_product_is_faster, pixel_products
from .layers.interp import Interp


def _product(x, weight, bias):
    """weight (O, C) times each pixel of x (N, C, H, W), plus bias, as a fresh tensor of
    (N, O, H*W) or (N, O, H, W) (not a view: the sum is added into it in place)."""
    if _batched_product_is_faster(x, weight):
        return pixel_products(x, weight, bias)
    return F.conv2d(x, weight[:, :, None, None], bias)


def part_layout(parts, resizes):
    """(channel counts, each part's (start, end) columns of the convolution's weights, the
    order the parts are summed in: those at the top's size first, then the resized ones)."""
    parts = tuple(int(c) for c in parts)
    starts = [sum(parts[:i]) for i in range(len(parts))]
    bounds = tuple((start, start + c) for start, c in zip(starts, parts))
    order = tuple(sorted(range(len(parts)), key=lambda i: resizes[i] is not None))
    return parts, bounds, order


def concat_parts(concat, layer_of, blob_shape, num_output):
    """(channel counts, inputs, Interp layers or None) of the parts of `concat`, the bottom of
    a 1x1 convolution with `num_output` outputs, where its product may run part by part: a
    channel Concat read by nothing else, each part a 4-D blob, a part that is an Interp top
    read by nothing else given as that Interp's bottom, and some resized part with more
    channels than the convolution has outputs (else the split saves nothing). None where not.
    layer_of(node) is the net's layer a node calls (or None), blob_shape(node) its top's shape."""
    joined = layer_of(concat) if isinstance(concat, fx.Node) else None
    if not isinstance(joined, Concat) or joined.axis != 1 or len(concat.users) != 1 or \
            concat.kwargs:
        return None
    parts, inputs, resizes = [], [], []
    for part in concat.args:
        shape = blob_shape(part) if isinstance(part, fx.Node) else None
        if shape is None or len(shape) != 4:
            return None
        resize = layer_of(part)
        if isinstance(resize, Interp) and len(part.users) == 1 and len(part.args) == 1 and \
                not part.kwargs and isinstance(part.args[0], fx.Node) and \
                blob_shape(part.args[0]) is not None:
            inputs.append(part.args[0])
            resizes.append(resize)
        else:
            inputs.append(part)
            resizes.append(None)
        parts.append(shape[1])
    if not any(r is not None and c > num_output for r, c in zip(resizes, parts)):
        return None
    return parts, inputs, resizes


class SplitPointwiseProduct(nn.Module):
    """The 1x1 convolution `conv` of a channel concatenation of `parts` channel counts, each part
    given as it is or as the bottom of its Interp layer in `resizes` (None where not resized).
    The layers stay the net's (their parameters are not this module's)."""

    def __init__(self, conv, parts, resizes):
        super().__init__()
        object.__setattr__(self, "conv", conv)
        object.__setattr__(self, "resizes", tuple(resizes))
        # the bias joins the first part at the top's size
        self.parts, self.bounds, self.order = part_layout(parts, resizes)

    def forward(self, *inputs):
        conv = self.conv
        weight = conv.weight.reshape(conv.num_output, -1)
        bias = conv.bias
        total = size = None
        for i in self.order:
            x, resize, (lo, hi) = inputs[i], self.resizes[i], self.bounds[i]
            with_bias = bias is not None and total is None and resize is None
            y = _product(x, weight[:, lo:hi], bias if with_bias else None)
            if resize is not None:
                y = resize.resize(y.view(x.shape[0], -1, *x.shape[2:]))
                size = y.shape[2:]
            elif size is None:
                size = x.shape[2:]
            # the first term is a fresh tensor that no backward reads, and the others are added
            # into it in place (into it, not into a view of it: autograd would then copy the
            # whole gradient back through the view)
            if total is None:
                total = y
            else:
                total.add_(y.reshape(total.shape))
            bias = None if with_bias else bias
        if bias is not None:                     # every part was resized
            total.add_(bias.view((1, -1) + (1,) * (total.dim() - 2)))
        return total.view(total.shape[0], total.shape[1], *size)

    def extra_repr(self):
        return f"parts={self.parts}, resized={tuple(r is not None for r in self.resizes)}"


def _layer(net, node):
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    return net.get_submodule(node.target)


def _blob_shape(net, node):
    blob = node.meta.get("blob")
    return net.blob_shapes.get(blob) if blob is not None else None


def _split(net, node):
    """The SplitPointwiseProduct replacing `node`, its inputs and the Concat node, or None
    where the rewrite does not apply."""
    conv = _layer(net, node)
    if not isinstance(conv, Convolution) or len(node.args) != 1 or node.kwargs or \
            not conv.pointwise or conv.bottom_is_im2col or conv.channel_axis != 1:
        return None
    concat = node.args[0]
    found = concat_parts(concat, lambda n: _layer(net, n), lambda n: _blob_shape(net, n),
                         conv.num_output)
    if found is None:
        return None
    parts, inputs, resizes = found
    return SplitPointwiseProduct(conv, parts, resizes), inputs, concat


def split_concat_products(net, exact):
    """`exact` (a GraphModule of net.graph_module) with every such convolution split by part;
    `exact` itself where there is none."""
    graph = copy.deepcopy(exact.graph)
    modules = {}
    for node in list(graph.nodes):
        found = _split(net, node)
        if found is None:
            continue
        module, inputs, concat = found
        key = f"split.{node.target.split('.')[-1]}"
        modules[key] = module
        with graph.inserting_before(node):
            new = graph.call_module(key, tuple(inputs))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        resized = [part for part, r in zip(concat.args, module.resizes) if r is not None]
        graph.erase_node(concat)
        for part in resized:
            graph.erase_node(part)
    if not modules:
        return exact
    graph.lint()
    root = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target not in modules:
            root[node.target] = net.get_submodule(node.target)
        elif node.op == "get_attr":
            module, _, attribute = node.target.rpartition(".")
            root[node.target] = getattr(net.get_submodule(module), attribute)
    root.update(modules)
    return fx.GraphModule(root, graph, class_name=type(exact).__name__)
