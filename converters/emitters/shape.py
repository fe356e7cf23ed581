"""Layers that move or resample values: Reshape, Crop, Permute, Im2col and the fork's Interp, as
plain torch expressions (or a small helper function written into the exported module)."""
from .registry import Emission, literal, register_emitter, register_helper

__all__ = ["emit_crop", "emit_im2col", "emit_interp", "emit_permute", "emit_reshape"]

FUNCTIONAL = ("import torch.nn.functional as F",)

INTERP = register_helper("caffe_interp", '''def caffe_interp(x, pad_beg, pad_end, height=None, width=None, zoom=None, shrink=None):
    """The fork's Interp: crop by the (non-positive) pads, then bilinear resize with aligned
    corners to (height, width), or by shrink_factor then zoom_factor."""
    in_h = x.shape[-2] + pad_beg + pad_end
    in_w = x.shape[-1] + pad_beg + pad_end

    def resized(size):
        if shrink is not None:
            size = (size - 1) // shrink + 1
        if zoom is not None:
            size = size + (size - 1) * (zoom - 1)
        return size
    out = (height, width) if height is not None else (resized(in_h), resized(in_w))
    crop = x[..., -pad_beg:-pad_beg + in_h, -pad_beg:-pad_beg + in_w]
    if out == (in_h, in_w):
        return crop.clone()
    return F.interpolate(crop, size=out, mode="bilinear", align_corners=True)''')

IM2COL = register_helper("caffe_im2col", '''def caffe_im2col(x, kernel, pad, stride, dilation):
    """Caffe's Im2col: zero-padded patches, channel-major, then kernel row, then column."""
    n, c, h, w = x.shape
    out_h, out_w = ((size + 2 * p - (d * (k - 1) + 1)) // s + 1 for size, k, p, s, d in
                    zip((h, w), kernel, pad, stride, dilation))
    columns = F.unfold(x, kernel, dilation, pad, stride)
    return columns.reshape(n, c * kernel[0] * kernel[1], out_h, out_w)''')


@register_emitter("Reshape")
def emit_reshape(spec):
    kw, x = spec.kwargs, spec.bottoms[0]
    dims = list(kw.get("dims", ()))
    if kw.get("axis", 0) != 0 or kw.get("num_axes", -1) != -1:
        from segaware_caffe.layers.reshape import reshape_top_shape
        shape = reshape_top_shape(tuple(spec.bottom_shapes[0]), dims, kw.get("axis", 0),
                                  kw.get("num_axes", -1))
        return Emission(f"{x}.reshape({literal(tuple(shape))})")
    # Caffe's 0 copies the bottom's dim, -1 is inferred: as torch writes them
    parts = [f"{x}.shape[{i}]" if d == 0 else str(d) for i, d in enumerate(dims)]
    return Emission(f"{x}.reshape({', '.join(parts) or '()'})")


@register_emitter("Crop")
def emit_crop(spec):
    kw, x = spec.kwargs, spec.bottoms[0]
    axis, offsets = kw.get("axis", 2), list(kw.get("offsets", ()))
    reference = spec.bottom_shapes[1]
    window = [":"] * axis + [f"{o}:{o + reference[axis + i]}" for i, o in enumerate(offsets)]
    return Emission(f"{x}[{', '.join(window)}]", note="cropped to the reference bottom's shape")


@register_emitter("Permute")
def emit_permute(spec):
    order = tuple(spec.kwargs.get("order", ()))
    x = spec.bottoms[0]
    if order == tuple(range(len(spec.bottom_shapes[0]))):
        return Emission(x)
    return Emission(f"{x}.permute{literal(order)}.contiguous()")


@register_emitter("Interp")
def emit_interp(spec):
    kw = spec.kwargs
    args = [spec.bottoms[0], str(kw.get("pad_beg", 0)), str(kw.get("pad_end", 0))]
    for name, key in (("height", "height"), ("width", "width"), ("zoom", "zoom_factor"),
                      ("shrink", "shrink_factor")):
        if kw.get(key) is not None:
            args.append(f"{name}={kw[key]}")
    return Emission(f"caffe_interp({', '.join(args)})", imports=FUNCTIONAL, helpers=(INTERP,))


@register_emitter("Im2col")
def emit_im2col(spec):
    kw = spec.kwargs
    args = [spec.bottoms[0]] + [literal(tuple(kw.get(name, default))) for name, default in
                                (("kernel", None), ("pad", (0, 0)), ("stride", (1, 1)),
                                 ("dilation", (1, 1)))]
    return Emission(f"caffe_im2col({', '.join(args)})", imports=FUNCTIONAL, helpers=(IM2COL,))
