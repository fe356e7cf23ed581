"""Im2parity: per-tap label agreement, (N, C, H, W) labels -> (N, K, Ho, Wo)."""
import torch

from segaware_caffe.kernels.im2parity import im2parity

from ..layer import CaffeLayer, register_layer
from ..params import ConvGeometry
from .im2dist import patch_geometry_from_proto, patch_layer_repr


@register_layer("Im2parity")
class Im2parity(CaffeLayer):
    """y = 1 where int(label[neighbour]) == int(label[centre]), else 0; out-of-image neighbours
    count as label 0; with ignore_label, taps touching it output ignore_label. A patch whose
    centre is outside the image outputs ignore_label (0 if unset). Forward only: the output
    carries no gradient (the original has no backward)."""
    HAS_BACKWARD = False        # its Backward aborts (NOT_IMPLEMENTED)
    USES_SEGAWARE_KERNELS = True

    def __init__(self, *, kernel, pad=(0, 0), stride=(1, 1), dilation=(1, 1), ignore_label=None):
        super().__init__()
        self.kernel = tuple(kernel)
        self.pad = tuple(pad)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)
        self.ignore_label = ignore_label

    @classmethod
    def from_proto(cls, layer_param, ctx):
        geometry = patch_geometry_from_proto(layer_param, ctx)
        ip = layer_param.im2parity_param
        return cls(kernel=geometry.kernel, pad=geometry.pad, stride=geometry.stride,
                   dilation=geometry.dilation,
                   ignore_label=ip.ignore_label if ip.HasField("ignore_label") else None)

    def output_shapes(self, bottom_shapes):
        n, _, height, width = bottom_shapes[0]
        geometry = ConvGeometry(self.kernel, self.pad, self.stride, self.dilation)
        geometry.check_output_size(height, width, "im2parity")
        return [(n, geometry.taps, *geometry.output_size(height, width))]

    @torch.no_grad()        # the original has no backward: keep no graph
    def forward(self, labels):
        return im2parity(labels, self.kernel, self.pad, self.stride, self.dilation,
                         ignore_label=self.ignore_label)

    def forward_workspace(self, bottom_shapes, top_shapes, itemsize):
        # the CPU path pads the bottom and loops over the taps
        return ConvGeometry(self.kernel, self.pad, self.stride, self.dilation).tap_loop_workspace(
            bottom_shapes[0], itemsize)

    def extra_repr(self):
        return patch_layer_repr(self, (("ignore_label", None),))
