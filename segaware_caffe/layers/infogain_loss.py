"""InfogainLoss: the multinomial logistic loss weighted by an infogain matrix H."""
import torch

from segaware_caffe import caffe_proto

from ..data.listfile import resolve_file
from ..layer import CaffeLayer, register_layer
from ..params import legacy_shape
from .multinomial_logistic_loss import check_item_labels, clamped_log
from .softmax_loss import check_labels


@register_layer("InfogainLoss")
class InfogainLoss(CaffeLayer):
    """Probabilities p (N, K...; the K values of an item flattened), labels (N) and H (1, 1, K, K),
    given as bottom 2 or read from infogain_loss_param.source (a BlobProto file).
    loss = -sum_n sum_k H[label_n, k] log(max(p[n, k], 1e-20)) / N; gradient
    -H[label_n, k] / (N max(p[n, k], 1e-20)); none to the labels or to H."""
    BOTTOMS = (2, 3)
    IS_LOSS = True
    NO_GRAD_BOTTOMS = (1, 2)

    def __init__(self, *, infogain=None, where="InfogainLoss"):
        """infogain: H as K rows of K floats, or None when H is bottom 2."""
        super().__init__()
        self.where = where
        # H from the source file: a constant of the layer, not a learnable blob (Caffe does not
        # store it in the .caffemodel); None when H is bottom 2
        self.register_buffer("infogain", None if infogain is None else
                             torch.as_tensor(infogain, dtype=torch.float32).clone(), persistent=False)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.infogain_loss_param
        if p.HasField("axis"):
            raise ctx.error("infogain_loss_param.axis belongs to BVLC master's InfogainLoss, which "
                            "applies a softmax to scores along that axis; this InfogainLoss takes "
                            "probabilities (all values of an item) and has no axis: remove the field")
        num, dim = check_item_labels(ctx, *ctx.bottom_shapes[:2])
        infogain = None
        if len(ctx.bottom_shapes) == 3:
            shape, what = tuple(ctx.bottom_shapes[2]), "the infogain bottom (2)"
        else:
            if not p.source:
                raise ctx.error("infogain_loss_param.source (a .binaryproto holding H) is required "
                                "when H is not given as a third bottom")
            path = resolve_file(p.source, ctx, "infogain_loss_param.source")
            infogain = caffe_proto.read_blob(path)     # CaffeFormatError names the file
            shape, what = infogain.shape, f"the infogain matrix in {path}"
        if legacy_shape(shape, ctx, what) != (1, 1, dim, dim):
            raise ctx.error(f"{what} must have shape (1, 1, {dim}, {dim}) for {dim} values per "
                            f"item, got {tuple(shape)}")
        if infogain is not None:    # plain values (rows of floats), like every constructor argument
            infogain = tuple(tuple(float(v) for v in row) for row in infogain.reshape(dim, dim))
        return cls(infogain=infogain, where=f"{ctx.name} ({ctx.type})")

    def forward(self, prob, labels, infogain=None):
        num = prob.shape[0]
        p = prob.reshape(num, -1)
        dim = p.shape[1]
        check_labels(labels, dim, None, self.where)
        label = labels.detach().reshape(num).to(torch.int64)
        if infogain is None:
            infogain = self.infogain
        rows = infogain.reshape(dim, dim).index_select(0, label)
        return -(rows * clamped_log(p)).sum() / num

    def output_shapes(self, bottom_shapes):
        return [()]

    def extra_repr(self):
        return "H from bottom 2" if self.infogain is None else f"H {tuple(self.infogain.shape)}"
