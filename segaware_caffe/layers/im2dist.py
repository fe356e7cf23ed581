"""Im2dist: per-tap centre-to-neighbour distances, (N, C, H, W) -> (N, K, Ho, Wo);
also the convolution_param geometry reading and the base class shared by the segaware patch
layers."""
from segaware_caffe.kernels.im2dist import im2dist

from ..layer import CaffeLayer, register_layer
from ..params import WindowSettings, canonical_axis, check_output_not_empty, conv_geometry

_NORM_NAMES = {1: "L1", 2: "L2"}


def patch_geometry_from_proto(layer_param, ctx):
    """Geometry of the segaware patch layers: convolution_param kernel/pad/stride/dilation on a
    4-D bottom, with an output of at least one pixel."""
    cp = layer_param.convolution_param
    shape = tuple(ctx.bottom_shapes[0]) if ctx.bottom_shapes else None
    if shape is not None and len(shape) != 4:
        raise ctx.error(f"the bottom must be 4-D (N, C, H, W), got shape {shape}")
    if canonical_axis(cp.axis, 4, ctx, "convolution_param.axis") != 1:
        raise ctx.unsupported(f"only convolution_param.axis 1 is supported, got {cp.axis}")
    geometry = conv_geometry(cp, ctx)
    if shape is not None:
        check_output_not_empty(geometry, shape[2:], ctx)
    return geometry


GEOMETRY_DEFAULTS = (("pad", (0, 0)), ("stride", (1, 1)), ("dilation", (1, 1)))


def patch_layer_repr(layer, defaults):
    """kernel plus every (name, default) setting of `layer` that differs from its default."""
    parts = [f"kernel={layer.kernel}"]
    parts += [f"{name}={getattr(layer, name)}" for name, default in GEOMETRY_DEFAULTS + defaults
              if getattr(layer, name) != default]
    return ", ".join(parts)


class PatchLayer(WindowSettings, CaffeLayer):
    """A layer with one output channel per tap of a sliding patch (kernel, pad, stride,
    dilation): (N, C, H, W) -> (N, taps, Ho, Wo). OP_NAME names it in size errors."""
    OP_NAME = ""

    def __init__(self, *, kernel, pad=(0, 0), stride=(1, 1), dilation=(1, 1)):
        super().__init__()
        self._set_window(kernel, pad, stride, dilation)

    def output_shapes(self, bottom_shapes):
        n, _, height, width = bottom_shapes[0]
        geometry = self.geometry
        geometry.check_output_size(height, width, self.OP_NAME)
        return [(n, geometry.taps, *geometry.output_size(height, width))]

    def forward_workspace(self, bottom_shapes, top_shapes, itemsize):
        # the CPU path pads the bottom and loops over the taps
        return self.geometry.tap_loop_workspace(bottom_shapes[0], itemsize)


@register_layer("Im2dist")
class Im2dist(PatchLayer):
    """y[n, i*kw + j, ho, wo] = sum_c phi(x[c, centre] - x[c, neighbour_ij]), phi = |d| (L1) or
    0.5 d² (L2, the default). Out-of-image neighbours give 0 (BIG = FLT_MAX/100 with
    remove_bounds), the centre tap gives BIG with remove_center, and a patch whose centre is
    outside the image gives 0 on every tap. L1 backward uses sign(0) = 0 (the original's GPU)."""
    IGNORES_PROPAGATE_DOWN = (0,)
    USES_SEGAWARE_KERNELS = True
    OP_NAME = "im2dist"

    def __init__(self, *, kernel, pad=(0, 0), stride=(1, 1), dilation=(1, 1), norm="L2",
                 remove_center=False, remove_bounds=False):
        super().__init__(kernel=kernel, pad=pad, stride=stride, dilation=dilation)
        self.norm = norm
        self.remove_center = remove_center
        self.remove_bounds = remove_bounds

    @classmethod
    def from_proto(cls, layer_param, ctx):
        geometry = patch_geometry_from_proto(layer_param, ctx)
        ip = layer_param.im2dist_param
        return cls(**geometry.as_kwargs(), norm=_NORM_NAMES[ip.norm],
                   remove_center=ip.remove_center, remove_bounds=ip.remove_bounds)

    def forward(self, x):
        return im2dist(x, self.kernel, self.pad, self.stride, self.dilation, norm=self.norm,
                       remove_center=self.remove_center, remove_bounds=self.remove_bounds)

    def extra_repr(self):
        return patch_layer_repr(self, (("norm", "L2"), ("remove_center", False),
                                       ("remove_bounds", False)))
