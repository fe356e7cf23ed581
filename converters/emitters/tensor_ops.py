"""Layers that combine or reshape blobs: Eltwise, Concat, Slice, Split, Flatten, Tile, Silence."""
from .registry import Emission, literal, register_emitter

__all__ = ["emit_concat", "emit_eltwise", "emit_flatten", "emit_silence", "emit_slice",
           "emit_split", "emit_tile"]


@register_emitter("Eltwise")
def emit_eltwise(spec):
    kw, xs = spec.kwargs, spec.bottoms
    operation = kw.get("operation", "SUM")
    if operation == "PROD":
        if not kw.get("stable_prod_grad", True):
            return None  # the quotient gradient lives in the layer module
        return Emission(" * ".join(xs))
    if operation == "SUM":
        coeffs = kw.get("coeffs") or (1.0,) * len(xs)
        terms = [x if c == 1 else f"{x} * {literal(c)}" for x, c in zip(xs, coeffs)]
        return Emission(" + ".join(terms))
    if len(xs) != 2:
        return None  # MAX over more bottoms: the layer module's running maximum
    # MAX: the later bottom wins ties (and takes their gradient), as in the layer module
    a, b = xs
    return Emission(f"torch.where({b} >= {a}, {b}, {a})")


@register_emitter("Concat")
def emit_concat(spec):
    if len(spec.bottoms) == 1:
        return Emission(spec.bottoms[0])
    return Emission(f"torch.cat([{', '.join(spec.bottoms)}], dim={spec.kwargs.get('axis', 1)})")


@register_emitter("Slice")
def emit_slice(spec):
    kw, x = spec.kwargs, spec.bottoms[0]
    axis, points = kw.get("axis", 1), tuple(kw.get("slice_points", ()))
    if spec.num_tops == 1:
        return Emission(x)
    if points:
        return Emission(f"torch.tensor_split({x}, {literal(list(points))}, dim={axis})")
    return Emission(f"torch.chunk({x}, {spec.num_tops}, dim={axis})")


@register_emitter("Split")
def emit_split(spec):
    return Emission(", ".join([spec.bottoms[0]] * spec.num_tops))


@register_emitter("Flatten")
def emit_flatten(spec):
    kw = spec.kwargs
    return Emission(f"{spec.bottoms[0]}.flatten({kw.get('axis', 1)}, {kw.get('end_axis', -1)})")


@register_emitter("Tile")
def emit_tile(spec):
    repeats = [1] * len(spec.bottom_shapes[0])
    repeats[spec.kwargs.get("axis", 1)] = spec.kwargs["tiles"]
    return Emission(f"{spec.bottoms[0]}.repeat({', '.join(map(str, repeats))})")


@register_emitter("Silence")
def emit_silence(spec):
    return Emission("", note="consumes its bottoms, computes nothing")
