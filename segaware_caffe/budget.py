"""The memory budget: sizes that come from a user's files are checked before anything is allocated.

A prototxt can ask for any size (an Interp height, a pad, a DummyData shape, a filler's blob,
a batch of a data layer); torch and numpy would try to allocate it and fail deep inside, or
swap the machine. Every size that becomes memory passes through one `MemoryBudget` first:

- learnable blobs and buffers, when a layer is constructed (`full`, `CaffeLayer.new_parameter`);
- the temporary tensor a filler draws (`fillers.fill`);
- every top blob after shape inference, summed over the net: Caffe keeps every blob of a net
  alive at once, so the sum is what a pass needs (`Net` reserves each top as it is built);
- the temporaries a layer's forward needs beyond its tops (`CaffeLayer.forward_workspace`,
  e.g. a padded copy of the bottom), checked against what is left;
- other sizes the command line computes (`eval --num-classes`, zeros for an input not given).

The budget, in bytes, is the first of: `max_bytes=` given to `Net`/`Solver`/`MemoryBudget`,
the command line's `--max-memory` (`limit`), `$SEGAWARE_MAX_BYTES`, and by default half of the
memory this process may use (the machine's memory, lowered by a cgroup limit or an
address-space limit). A net that would need more is refused with a MemoryBudgetError naming the
layer, the blob and its shape.
"""
import contextlib
import contextvars
import math
import os
import re

from .errors import LayerSetupError, MemoryBudgetError

ENV = "SEGAWARE_MAX_BYTES"
DEFAULT_FRACTION = 0.5
HINT = (f"raise the budget with max_bytes=, ${ENV} or --max-memory (e.g. --max-memory 32G) if "
        f"the machine has the memory")

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 10 ** 3, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 10 ** 6, "MIB": 1 << 20, "G": 1 << 30, "GB": 10 ** 9, "GIB": 1 << 30,
          "T": 1 << 40, "TB": 10 ** 12, "TIB": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

# (budget, "name (Type)") of the layer being built, set by Net while it builds a layer
_BUILDING = contextvars.ContextVar("segaware_budget_building", default=None)
# a limit set for a block of code (the command line's --max-memory)
_OVERRIDE = contextvars.ContextVar("segaware_budget_override", default=None)


def parse_bytes(text, what="a size"):
    """Bytes from '8G', '512MiB', '1.5GB', '4e9' or a plain integer (K/M/G/T are powers of 1024,
    KB/MB/GB/TB powers of 1000). Raises MemoryBudgetError naming `what`."""
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise MemoryBudgetError(f"{what}: expected a size such as 8G, 512M or 4000000000, "
                                f"got {text!r}")
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise MemoryBudgetError(f"{what}: the size must be > 0, got {text!r}")
    return int(value)


def format_bytes(count):
    """'1.5 GiB' style."""
    count = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(count) < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.3g} {unit}"
        count /= 1024
    return f"{count:.3g} EiB"


def _physical_memory():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_limit():
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:   # "max" or a huge number: no limit
            return int(text)
    return None


def _address_space_headroom():
    """RLIMIT_AS less the address space this process already uses, or None without a limit."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    return max(0, soft - used)


def available_memory():
    """(bytes, description) of the memory this process may use: the machine's memory, or a
    cgroup or address-space limit below it."""
    candidates = [(_physical_memory(), "this machine's memory"),
                  (_cgroup_limit(), "the memory limit of this process's cgroup"),
                  (_address_space_headroom(), "what this process's address-space limit leaves")]
    candidates = [(n, what) for n, what in candidates if n is not None]
    if not candidates:
        return 16 << 30, "an assumed 16 GiB (the machine's memory is unknown)"
    return min(candidates)


def resolve(max_bytes=None):
    """(limit in bytes, where the limit comes from) by the rule in the module docstring."""
    if max_bytes is not None:
        value = parse_bytes(max_bytes, "max_bytes") if isinstance(max_bytes, str) else max_bytes
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise MemoryBudgetError(f"max_bytes must be a number of bytes > 0, got {max_bytes!r}")
        return int(value), "max_bytes"
    override = _OVERRIDE.get()
    if override is not None:
        return override
    text = os.environ.get(ENV, "").strip()
    if text:
        return parse_bytes(text, f"${ENV}"), f"${ENV}"
    total, what = available_memory()
    return int(total * DEFAULT_FRACTION), f"half of {what}, {format_bytes(total)}"


@contextlib.contextmanager
def limit(max_bytes, source="--max-memory"):
    """Within the block, budgets without an explicit max_bytes use `max_bytes` (a number or a
    size string); the command line's --max-memory."""
    if isinstance(max_bytes, str):
        max_bytes = parse_bytes(max_bytes, source)
    token = _OVERRIDE.set((int(max_bytes), source))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def nbytes(shape, itemsize=4):
    """Bytes of a dense tensor of `shape` (Python integers: no overflow)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def _shape_text(shape):
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


class MemoryBudget:
    """Bytes a net may use: `reserve` what stays allocated (blobs, tops), `check` a temporary
    against what is left. Errors name the layer (`label`), the blob and its shape."""

    def __init__(self, max_bytes=None, where="net"):
        self.limit, self.source = resolve(max_bytes)
        self.where = where
        self.used = 0

    def _refuse(self, count, what, label, reserved):
        held = f"; with the {format_bytes(self.used)} the {self.where} already holds" \
            if self.used else ""
        prefix = f"{label}: " if label else ""
        raise MemoryBudgetError(
            f"{prefix}{what} would take {format_bytes(count)}{held}, that is more than the memory "
            f"budget of {format_bytes(self.limit)} ({self.source}); {HINT}")

    def check(self, count, what, label=None):
        """A temporary of `count` bytes: refused when it does not fit beside what is reserved."""
        if self.used + count > self.limit:
            self._refuse(count, what, label, False)

    def reserve(self, count, what, label=None):
        """`count` bytes that stay allocated."""
        self.check(count, what, label)
        self.used += count

    def reserve_shape(self, shape, itemsize, what, label=None):
        self.reserve(nbytes(shape, itemsize), f"{what} of shape {_shape_text(shape)}", label)

    def check_shape(self, shape, itemsize, what, label=None):
        self.check(nbytes(shape, itemsize), f"{what} of shape {_shape_text(shape)}", label)


@contextlib.contextmanager
def building(budget, label, name=None, type_name=None):
    """While a Net builds one layer: blobs it allocates are charged to `budget`, errors name it."""
    token = _BUILDING.set((budget, label, name, type_name))
    try:
        yield
    finally:
        _BUILDING.reset(token)


def _context(owner):
    """(budget, label, layer name, layer type) for an allocation now: the layer being built, or a
    fresh default budget labelled with `owner`'s type."""
    current = _BUILDING.get()
    if current is not None:
        return current
    type_name = getattr(owner, "TYPE", None) or (type(owner).__name__ if owner is not None else None)
    return MemoryBudget(where="layer"), type_name, None, type_name


def _shape_error(name, type_name, label, message):
    if name is not None:
        return LayerSetupError(name, type_name, message)
    return MemoryBudgetError(f"{label}: {message}" if label else message)


def checked_shape(shape, what, owner=None):
    """`shape` as a tuple of ints, refusing negative dimensions (a size computed from a prototxt
    that came out negative) with an error naming the layer and `what`."""
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        _, label, name, type_name = _context(owner)
        raise _shape_error(name, type_name, label,
                           f"{what}: a shape must be a sequence of integers, got {shape!r}") from None
    if any(d < 0 for d in shape):
        _, label, name, type_name = _context(owner)
        raise _shape_error(name, type_name, label,
                           f"{what} would have shape {_shape_text(shape)}: a negative dimension "
                           f"(the settings or the bottom shapes do not fit together)")
    return shape


def full(shape, value, what, owner=None, dtype=None):
    """torch.full(shape, value) for a blob or buffer that stays allocated, after checking the
    shape and charging its size to the budget of the layer being built."""
    import torch
    dtype = torch.float32 if dtype is None else dtype
    return torch.full(reserve(shape, what, owner, dtype), value, dtype=dtype)


def reserve(shape, what, owner=None, dtype=None):
    """Check `shape` and charge a blob of it that stays allocated to the budget of the layer
    being built; the checked shape (a tuple of ints)."""
    import torch
    dtype = torch.float32 if dtype is None else dtype
    shape = checked_shape(shape, what, owner)
    budget, label, _, _ = _context(owner)
    budget.reserve_shape(shape, torch.empty((), dtype=dtype).element_size(), what, label)
    return shape


def check_temporary(shape, what, owner=None, itemsize=4):
    """Refuse a temporary tensor of `shape` that does not fit in what the budget has left."""
    shape = checked_shape(shape, what, owner)
    budget, label, _, _ = _context(owner)
    budget.check_shape(shape, itemsize, what, label)
    return shape


def check_size(count, what, max_bytes=None):
    """Refuse `count` bytes computed outside a net (e.g. the command line's confusion matrix)."""
    MemoryBudget(max_bytes, where="process").check(count, what)
