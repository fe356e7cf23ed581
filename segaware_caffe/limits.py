"""Limits on configured counts that no run plausibly means.

A damaged or mistyped file can ask for 2^31 iterations, 65536 accumulated passes per update or a
batch of a million images read one by one: valid numbers, but a run that would go on for days
without a word. Each count below is checked when the run is set up (the solver, a data layer,
the command line) and refused with a SizeLimitError that names the field, the value and how to
raise the limit:

    iterations   max_iter, Solver.step counts, --iterations of train, test and time
    iter_size    forward-backward passes accumulated per update
    test_iter    forward passes of one test of a test net
    batch_size   items the list-, database- and file-driven data layers read one by one per
                 batch (MemoryData, Input and DummyData are limited by the memory budget)
    layer_iterations  steps a layer repeats within one forward pass (mean-field iterations,
                 DenseCRF's max_iter, DomainTransform's num_iter)

Raise a limit with $SEGAWARE_LIMITS, e.g. SEGAWARE_LIMITS="iter_size=4096,batch_size=50000", or
within a block of code with `raised(iter_size=4096)`. Sizes that become memory are checked by the
memory budget instead (segaware_caffe.budget).
"""
import contextlib
import contextvars
import os

from .errors import SizeLimitError

ENV = "SEGAWARE_LIMITS"
DEFAULTS = {
    "iterations": 100_000_000,
    "iter_size": 1024,
    "test_iter": 10_000_000,
    "batch_size": 10_000,
    "layer_iterations": 10_000,
}
WHY = {
    "iterations": "iterations",
    "iter_size": "forward-backward passes per update",
    "test_iter": "test passes",
    "batch_size": "items read one by one per batch",
    "layer_iterations": "steps of one layer's forward",
}
_RAISED = contextvars.ContextVar("segaware_limits_raised", default={})


def _from_environment():
    text = os.environ.get(ENV, "").strip()
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in DEFAULTS:
            raise SizeLimitError(f"${ENV}: expected NAME=N items separated by commas, NAME one of "
                                 f"{', '.join(DEFAULTS)}; got {item!r}")
        try:
            number = int(value)
        except ValueError:
            raise SizeLimitError(f"${ENV}: {name} must be an integer, got {value.strip()!r}") \
                from None
        if number < 1:
            raise SizeLimitError(f"${ENV}: {name} must be >= 1, got {number}")
        values[name] = number
    return values


def limit(name):
    """The limit on count `name` now (raised(), else $SEGAWARE_LIMITS, else the default)."""
    raised = _RAISED.get()
    if name in raised:
        return raised[name]
    return _from_environment().get(name, DEFAULTS[name])


@contextlib.contextmanager
def raised(**limits):
    """Within the block, use these limits (e.g. raised(iter_size=4096))."""
    unknown = [n for n in limits if n not in DEFAULTS]
    if unknown:
        raise ValueError(f"unknown limit {unknown[0]!r}; limits are {', '.join(DEFAULTS)}")
    token = _RAISED.set({**_RAISED.get(), **{n: int(v) for n, v in limits.items()}})
    try:
        yield
    finally:
        _RAISED.reset(token)


def check(value, name, field, where):
    """Refuse `value` of the count `name` above its limit: SizeLimitError '<where>: <field> ...'.
    Returns the value."""
    value = int(value)
    maximum = limit(name)
    if value > maximum:
        raise SizeLimitError(
            f"{where}: {field} {value} is more {WHY[name]} than any run plausibly means (the "
            f"limit is {maximum:,}); if it is meant, raise the limit with "
            f"{ENV}={name}={value}")
    return value
