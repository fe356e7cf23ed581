"""Im2parity: per-tap label agreement, (N, C, H, W) labels -> (N, K, Ho, Wo)."""
import torch

from segaware_caffe.kernels.im2parity import im2parity

from ..layer import register_layer
from .im2dist import PatchLayer, patch_geometry_from_proto, patch_layer_repr


@register_layer("Im2parity")
class Im2parity(PatchLayer):
    """y = 1 where int(label[neighbour]) == int(label[centre]), else 0; out-of-image neighbours
    count as label 0; with ignore_label, taps touching it output ignore_label. A patch whose
    centre is outside the image outputs ignore_label (0 if unset). Forward only: the output
    carries no gradient (the original has no backward)."""
    HAS_BACKWARD = False        # its Backward aborts (NOT_IMPLEMENTED)
    USES_SEGAWARE_KERNELS = True
    OP_NAME = "im2parity"

    def __init__(self, *, kernel, pad=(0, 0), stride=(1, 1), dilation=(1, 1), ignore_label=None):
        super().__init__(kernel=kernel, pad=pad, stride=stride, dilation=dilation)
        self.ignore_label = ignore_label

    @classmethod
    def from_proto(cls, layer_param, ctx):
        geometry = patch_geometry_from_proto(layer_param, ctx)
        ip = layer_param.im2parity_param
        return cls(**geometry.as_kwargs(),
                   ignore_label=ip.ignore_label if ip.HasField("ignore_label") else None)

    @torch.no_grad()        # the original has no backward: keep no graph
    def forward(self, labels):
        return im2parity(labels, self.kernel, self.pad, self.stride, self.dilation,
                         ignore_label=self.ignore_label)

    def extra_repr(self):
        return patch_layer_repr(self, (("ignore_label", None),))
