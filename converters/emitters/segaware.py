"""Segmentation-aware ops that `kernels` implements as functionals (CPU torch / CUDA CuPy)."""
from .registry import Emission, literal, pair_or_int, register_emitter

__all__ = ["emit_im2dist"]


@register_emitter("Im2dist")
def emit_im2dist(spec):
    kw = spec.kwargs
    args = [spec.bottoms[0], f"kernel_size={pair_or_int(kw['kernel'])}"]
    for name, default in (("pad", (0, 0)), ("stride", (1, 1)), ("dilation", (1, 1))):
        if tuple(kw.get(name, default)) != default:
            args.append(f"{name}={pair_or_int(kw[name])}")
    args.append(f"norm={literal(kw.get('norm', 'L2'))}")
    for flag in ("remove_center", "remove_bounds"):
        if kw.get(flag):
            args.append(f"{flag}=True")
    return Emission(f"im2dist({', '.join(args)})", imports=("from segaware_caffe.kernels import im2dist",),
                    plain_torch=False)
