"""Mutation fuzzing of everything that reads a user's files: seeds, mutators, targets, outcomes.

Used by the hypothesis suite in this folder (a few examples per target, derandomized) and by
bench/fuzz_campaign.py (thousands of cases, each in a memory-limited subprocess).

- Seeds come from the golden fixtures (prototxts, caffemodels, solvers, a Caffe solverstate) and
  from files written here (safetensors/.pt conversions, a mean .binaryproto, images, .npy).
- Mutators take a `Chooser` (a source of integers: a random.Random for the campaign, hypothesis'
  data.draw for the suite, so that failures shrink) and return mutated bytes: bit flips,
  truncations (also at protobuf field boundaries), lies about length prefixes, huge or negative
  varints, numbers in prototxts replaced by huge/negative/odd values, safetensors headers and
  PNG headers that lie about sizes, .npy headers that lie about shapes.
- A target feeds one input to one entry point. `classify` turns what happened into an outcome:
  "ok", "reported" (one of the project's errors, naming the file or layer), "unsupported"
  (NotImplementedError with a message), or a problem: "unnamed" (ours, but the message names
  neither file nor layer), "escaped" (any other exception, with its place), "big-allocation",
  "hang", "traceback" (printed by the CLI), "silent-partial-load" (a cut weights file accepted
  with layers left at their fillers and no word about it).
"""
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import struct
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "fixtures" / "golden"
TIME_LIMIT_S = 10
# Training runs get this bound (Solver(max_seconds=), train --max-seconds): a run that is long by
# its configuration (iter_size 255 of a slow net) must stop there with its message; a hang is a
# run that the bound does not stop (one pass or one build that takes longer than the limit).
RUN_BOUND_S = TIME_LIMIT_S / 2
PROBLEMS = ("unnamed", "escaped", "big-allocation", "hang", "traceback", "silent-partial-load")


# ---------------------------------------------------------------------------- choosers
class Chooser:
    """Integers in [lo, hi] from a random.Random (or any object with randint)."""

    def __init__(self, rng):
        self.rng = rng

    def int(self, lo, hi):
        return self.rng.randint(lo, hi) if hi > lo else lo

    def choice(self, items):
        items = list(items)
        return items[self.int(0, len(items) - 1)]


class DrawChooser(Chooser):
    """Integers drawn through hypothesis (shrinkable)."""

    def __init__(self, data):
        from hypothesis import strategies as st
        self.data, self.st = data, st

    def int(self, lo, hi):
        return self.data.draw(self.st.integers(lo, hi)) if hi > lo else lo


# ---------------------------------------------------------------------------- byte mutators
INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0x0A, 0x22, 0x7B)


def flip_bits(data, c):
    data = bytearray(data)
    for _ in range(c.int(1, 8)):
        if data:
            data[c.int(0, len(data) - 1)] ^= 1 << c.int(0, 7)
    return bytes(data)


def set_bytes(data, c):
    data = bytearray(data)
    for _ in range(c.int(1, 4)):
        if data:
            data[c.int(0, len(data) - 1)] = c.choice(INTERESTING_BYTES)
    return bytes(data)


def truncate(data, c):
    return data[:c.int(0, max(0, len(data) - 1))]


def delete_chunk(data, c):
    if len(data) < 2:
        return data
    start = c.int(0, len(data) - 1)
    return data[:start] + data[start + c.int(1, min(64, len(data) - start)):]


def duplicate_chunk(data, c):
    if not data:
        return data
    start = c.int(0, len(data) - 1)
    chunk = data[start:start + c.int(1, 256)]
    at = c.int(0, len(data))
    return data[:at] + chunk * c.int(1, 3) + data[at:]


# protobuf wire format: varints and length prefixes, found by a tolerant walk
def _varint(data, pos):
    result = shift = 0
    start = pos
    while pos < len(data) and shift < 70:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, start, pos
        shift += 7
    raise ValueError("bad varint")


def _top_level_fields(data):
    """(wire type, start, end, value, field end) of each top-level field a tolerant walk finds,
    up to the first that does not parse or runs past the data: for a varint field the span of its
    value, for a length-delimited one the span of its length prefix (value: the length)."""
    pos = 0
    while pos < len(data):
        try:
            key, _, pos = _varint(data, pos)
            wire = key & 7
            value, start, end = _varint(data, pos) if wire in (0, 2) else (None, pos, pos)
        except ValueError:
            return
        if wire not in (0, 1, 2, 5):
            return
        pos = end + {0: 0, 1: 8, 2: value, 5: 4}[wire]
        yield wire, start, end, value, pos
        if pos > len(data):
            return


def wire_fields(data, base=0, depth=0, out=None):
    """[(kind, start, end, value)] over a protobuf message and, recursively, the payloads that
    parse as messages: kind 'key', 'varint' (a value) or 'length' (a length prefix)."""
    out = [] if out is None else out
    for wire, start, end, value, _ in _top_level_fields(data):
        if wire == 0:
            out.append(("varint", base + start, base + end, value))
        elif wire == 2:
            out.append(("length", base + start, base + end, value))
            payload = data[end:end + value]
            if depth < 6 and len(payload) < 1 << 20 and payload:
                wire_fields(payload, base + end, depth + 1, out)
    return out


def top_level_boundaries(data):
    """Offsets where a top-level protobuf field ends (a cut there still parses)."""
    return [pos for *_, pos in _top_level_fields(data) if pos <= len(data)]


LIES = (0, 1, 2, 7, 127, 128, 255, 65535, 1 << 20, 1 << 31, (1 << 31) - 1, 1 << 32, (1 << 63) - 1,
        (1 << 64) - 1, -1 & ((1 << 64) - 1), -2147483648 & ((1 << 64) - 1))


def lie_about_wire(data, c):
    """Replace a length prefix or a varint value (a dimension, a count, an enum) somewhere in the
    message tree with a lie."""
    from segaware_caffe.caffe_proto.wire import encode_varint
    fields = [f for f in wire_fields(data) if f[0] in ("length", "varint")]
    if not fields:
        return flip_bits(data, c)
    kind, start, end, value = c.choice(fields)
    choices = list(LIES) + [value + 1, max(0, value - 1), value * 2, value * 1000]
    return data[:start] + encode_varint(c.choice(choices)) + data[end:]


def cut_at_field_boundary(data, c):
    ends = top_level_boundaries(data)[:-1]
    return data[:c.choice(ends)] if ends else truncate(data, c)


BYTE_MUTATORS = (flip_bits, set_bytes, truncate, delete_chunk, duplicate_chunk)
PROTO_MUTATORS = BYTE_MUTATORS + (lie_about_wire, lie_about_wire, cut_at_field_boundary)


# ---------------------------------------------------------------------------- text mutators
NUMBERS = ("0", "-1", "-2", "1", "2", "3", "7", "255", "256", "65536", "99999", "1000000",
           "2147483647", "-2147483648", "4294967295", "9223372036854775807", "1e30", "-1e30",
           "1e-30", "nan", "inf", "-inf", "0.5", "-0.5", "12345678901234567890")
STRINGS = ('""', '"x"', '"../../../tmp/fuzz_escape"', '"/tmp/fuzz_abs"', '"\\"\\"\\""',
           '"a\\nb"', '"%s"' % ("n" * 500), '"${UNDEFINED_VAR}"', '"\\x00"', '"__import__(\'os\')"')
TOKENS = ("{", "}", '"', ":", "layer {", "}}", "#", "\\", "\x00", "\xff", "bottom: \"x\"",
          "top: \"x\"", "type: \"Split\"", "phase: TRAIN", "include { phase: TEST }")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")
_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')


def replace_number(text, c):
    spots = list(_NUMBER.finditer(text))
    if not spots:
        return insert_token(text, c)
    for _ in range(c.int(1, 3)):
        spot = c.choice(spots)
        text = text[:spot.start()] + c.choice(NUMBERS) + text[spot.end():]
        spots = list(_NUMBER.finditer(text))
        if not spots:
            break
    return text


def replace_string(text, c):
    spots = list(_STRING.finditer(text))
    if not spots:
        return insert_token(text, c)
    spot = c.choice(spots)
    return text[:spot.start()] + c.choice(STRINGS) + text[spot.end():]


def _lines(text):
    return text.splitlines(keepends=True) or [text]


def delete_line(text, c):
    lines = _lines(text)
    del lines[c.int(0, len(lines) - 1)]
    return "".join(lines)


def duplicate_line(text, c):
    lines = _lines(text)
    i = c.int(0, len(lines) - 1)
    lines.insert(c.int(0, len(lines)), lines[i])
    return "".join(lines)


def swap_lines(text, c):
    lines = _lines(text)
    i, j = c.int(0, len(lines) - 1), c.int(0, len(lines) - 1)
    lines[i], lines[j] = lines[j], lines[i]
    return "".join(lines)


def insert_token(text, c):
    at = c.int(0, len(text))
    return text[:at] + c.choice(TOKENS) + text[at:]


def truncate_text(text, c):
    return text[:c.int(0, max(0, len(text) - 1))]


TEXT_MUTATORS = (replace_number, replace_number, replace_number, replace_string, delete_line,
                 duplicate_line, swap_lines, insert_token, truncate_text)


def mutate_text(data, c):
    """Mostly one lie in a value (the text still parses, so the lie reaches the code behind the
    parser), sometimes structural damage."""
    text = data.decode("utf-8", "replace")
    how = c.int(0, 9)
    if how < 6:
        text = replace_number(text, c)
    elif how < 7:
        text = replace_string(text, c)
    else:
        for _ in range(c.int(1, 3)):
            text = c.choice(TEXT_MUTATORS)(text, c)
    raw = text.encode("utf-8", "surrogateescape")
    return flip_bits(raw, c) if c.int(0, 9) == 0 else raw


# ---------------------------------------------------------------------------- format-aware mutators
def mutate_safetensors(data, c):
    """Lie inside a safetensors header: dtypes, shapes, offsets, the header length, the metadata."""
    if len(data) < 8 or c.int(0, 4) == 0:
        return c.choice(BYTE_MUTATORS)(data, c)
    length = struct.unpack("<Q", data[:8])[0]
    try:
        header = json.loads(data[8:8 + length])
    except ValueError:
        return flip_bits(data, c)
    names = [k for k in header if k != "__metadata__"]
    what = c.int(0, 8)
    if what == 0 or not names:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", c.choice((0, 1, len(raw) + 1, len(raw) - 1, 1 << 40, (1 << 64) - 1))) \
            + raw + data[8 + length:]
    entry = header[c.choice(names)]
    if what == 1:
        entry["dtype"] = c.choice(("F32", "F64", "F16", "I8", "BOOL", "X9", 3, None, "BF16", "C64"))
    elif what == 2 and isinstance(entry.get("shape"), list):
        shape = entry["shape"] or [1]
        shape[c.int(0, len(shape) - 1)] = c.choice((0, -1, 1, 10 ** 12, 2 ** 63, 1.5, "3", None))
        entry["shape"] = shape
    elif what == 3 and isinstance(entry.get("data_offsets"), list):
        offsets = entry["data_offsets"]
        offsets[c.int(0, 1)] = c.choice((0, -1, 10 ** 15, offsets[0] + 4, 2 ** 64, "0"))
    elif what == 4:
        entry.pop(c.choice(("dtype", "shape", "data_offsets")), None)
    elif what == 5:
        header[c.choice(names)] = c.choice((3, [], "x", None))
    elif what == 6:
        meta = header.setdefault("__metadata__", {})
        if "caffe" in meta:
            meta["caffe"] = _mutate_metadata(meta["caffe"], c)
        else:
            header["__metadata__"] = c.choice(({"caffe": "{"}, 3, {"caffe": 3}))
    elif what == 7:
        entry["shape"] = [c.int(1, 9) for _ in range(c.int(0, 5))]
    else:
        return flip_bits(data, c)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length:]


def _mutate_metadata(text, c):
    try:
        meta = json.loads(text)
    except ValueError:
        return text[:len(text) // 2]
    what = c.int(0, 6)
    layers = meta.get("layers") or [{}]
    layer = layers[c.int(0, len(layers) - 1)] if isinstance(layers, list) and layers else {}
    if what == 0:
        meta["version"] = c.choice((2, "1", None))
    elif what == 1 and isinstance(layer, dict):
        layer.pop(c.choice(("name", "key", "type", "blobs")), None)
    elif what == 2 and isinstance(layer, dict) and layer.get("blobs"):
        blob = layer["blobs"][0]
        blob[c.choice(("dtype", "shape", "tensor", "legacy"))] = c.choice(
            ("int8", [-1], [10 ** 9, 10 ** 9], 3, None, {"num": -1}, {"depth": 1}))
    elif what == 3:
        meta["layers"] = c.choice(({}, 3, [3], None))
    elif what == 4:
        meta["net"] = c.choice(({"phase": "deploy"}, {"variables": {"A": 1}}, 3, {"level": "x"}))
    else:
        return text[:c.int(0, len(text))]
    return json.dumps(meta)


def _png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def mutate_image(data, c):
    if data.startswith(b"\x89PNG") and c.int(0, 2) == 0:
        # IHDR claims a different size (a decompression bomb when large), CRC kept valid
        width, height = c.choice((0, 1, 7, 100000, 1 << 16, 1 << 31)), c.choice((0, 1, 9, 100000, 1 << 20))
        rest = bytearray(data[16:29])
        rest[0:8] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        return data[:8] + _png_chunk(b"IHDR", bytes(rest)) + data[33:]
    return c.choice(BYTE_MUTATORS)(data, c)


def mutate_npy(data, c):
    if c.int(0, 2) == 0 and b"'shape': (" in data:
        start = data.index(b"'shape': (") + len(b"'shape': (")
        end = data.index(b")", start)
        lie = c.choice((b"999999999999,", b"-1, 3", b"1, 3, 100000, 100000", b"", b"2**40,", b"x"))
        return data[:start] + lie + data[end:]
    if c.int(0, 3) == 0 and b"'descr': '" in data:
        start = data.index(b"'descr': '") + len(b"'descr': '")
        end = data.index(b"'", start)
        return data[:start] + c.choice((b"|O", b"<c16", b"<f2", b"zz", b"<U9", b">f4")) + data[end:]
    return c.choice(BYTE_MUTATORS)(data, c)


def mutate_bytes(data, c):
    return c.choice(BYTE_MUTATORS)(data, c)


def mutate_proto(data, c):
    for _ in range(c.int(1, 2)):
        data = c.choice(PROTO_MUTATORS)(data, c)
    return data


# ---------------------------------------------------------------------------- seeds
@dataclass
class Seed:
    kind: str            # what the bytes are: prototxt, caffemodel, solver, ...
    name: str            # file name the mutated bytes get
    data: bytes
    case: Path = None    # golden case folder (working directory, companions)
    extra: dict = field(default_factory=dict)


def _read_meta(case):
    path = case / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def build_seeds(workdir):
    """{kind: [Seed]} from the golden fixtures plus files written into `workdir`."""
    import torch

    from segaware_caffe import caffe_proto
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = {k: [] for k in ("prototxt", "caffemodel", "solver", "solverstate", "binaryproto",
                             "safetensors", "pt", "image", "npy")}
    for case in sorted((GOLDEN / "layers").iterdir()) + sorted((GOLDEN / "nets").iterdir()):
        meta = _read_meta(case)
        extra = {"variables": meta.get("variables") or None,
                 "phase": meta.get("phase", "TEST").lower(), "inputs": meta.get("inputs", {})}
        seeds["prototxt"].append(Seed("prototxt", "net.prototxt", (case / "net.prototxt").read_bytes(),
                                      case, extra))
        if (case / "weights.caffemodel").is_file():
            seeds["caffemodel"].append(Seed("caffemodel", "weights.caffemodel",
                                            (case / "weights.caffemodel").read_bytes(), case, extra))
    for case in sorted((GOLDEN / "solver").iterdir()):
        seeds["solver"].append(Seed("solver", "solver.prototxt", (case / "solver.prototxt").read_bytes(),
                                    case, {"inputs": {}}))
        seeds["caffemodel"].append(Seed("caffemodel", "init.caffemodel",
                                        (case / "init.caffemodel").read_bytes(), case,
                                        {"variables": None, "phase": "train", "inputs": {}}))
        for state in case.glob("*.solverstate"):
            seeds["solverstate"].append(Seed("solverstate", state.name, state.read_bytes(), case))
    mean = workdir / "mean.binaryproto"
    if not mean.exists():
        caffe_proto.write_blob(np.arange(24, dtype=np.float32).reshape(1, 3, 2, 4), mean)
    seeds["binaryproto"].append(Seed("binaryproto", "mean.binaryproto", mean.read_bytes()))
    from segaware_caffe.converters import caffemodel as cm
    for name in ("innerproduct", "conv_group2", "batchnorm_globalstats_then_scale"):
        case = GOLDEN / "layers" / name
        if not (case / "weights.caffemodel").is_file():
            continue
        extra = {"variables": None, "phase": "test"}
        for suffix in (".safetensors", ".pt"):
            out = workdir / f"{name}{suffix}"
            if not out.exists():
                with quiet():
                    cm.convert_caffemodel(case / "net.prototxt", case / "weights.caffemodel", out)
            kind = suffix[1:]
            seeds[kind].append(Seed(kind, f"weights{suffix}", out.read_bytes(), case, extra))
    from PIL import Image
    rng = np.random.default_rng(0)
    for fmt, mode, shape in (("PNG", "RGB", (9, 11, 3)), ("PNG", "L", (6, 5)), ("PNG", "P", (7, 7)),
                             ("JPEG", "RGB", (16, 12, 3)), ("BMP", "RGB", (5, 6, 3)),
                             ("TIFF", "RGB", (4, 4, 3)), ("GIF", "P", (5, 5))):
        array = rng.integers(0, 256 if mode != "P" else 21, shape, dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array, mode=mode).save(buffer, fmt)
        seeds["image"].append(Seed("image", f"image.{fmt.lower()}", buffer.getvalue(),
                                   extra={"mode": mode}))
    for array in (np.ones((1, 3, 4, 4), np.float32), np.arange(12, dtype=np.float64).reshape(3, 4)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        seeds["npy"].append(Seed("npy", "input.npy", buffer.getvalue()))
    del torch
    return seeds


MUTATORS_BY_KIND = {
    "prototxt": mutate_text, "solver": mutate_text, "caffemodel": mutate_proto,
    "solverstate": mutate_proto, "binaryproto": mutate_proto, "safetensors": mutate_safetensors,
    "pt": mutate_bytes, "image": mutate_image, "npy": mutate_npy,
}


# ---------------------------------------------------------------------------- running a target
class FuzzTimeout(BaseException):
    """Raised by the alarm when a target runs past TIME_LIMIT_S (BaseException: no target's
    `except Exception` may swallow it)."""


@contextlib.contextmanager
def time_limit(seconds=TIME_LIMIT_S):
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def alarm(signum, frame):
        raise FuzzTimeout(f"ran past {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def working_directory(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@dataclass
class Outcome:
    outcome: str                 # ok, reported, unsupported, or one of PROBLEMS
    detail: str = ""             # exception type and place, or the reason
    message: str = ""

    @property
    def problem(self):
        return self.outcome in PROBLEMS


def _project_place(tb):
    frames = traceback.extract_tb(tb)
    root = str(REPO) + os.sep
    inside = [f for f in frames if f.filename.startswith(root) and "/tests/" not in f.filename]
    frame = inside[-1] if inside else (frames[-1] if frames else None)
    if frame is None:
        return "?"
    name = frame.filename[len(root):] if frame.filename.startswith(root) else os.path.basename(frame.filename)
    return f"{name}:{frame.lineno} ({frame.name})"


ALLOCATION = re.compile(r"can't allocate memory|not enough memory|DefaultCPUAllocator|"
                        r"out of memory|Cannot allocate memory|std::bad_alloc|"
                        r"Unable to allocate|array is too big", re.I)
_LAYER_LABEL = re.compile(r"(^|: )\S+ \(.*?\): |\bnet '[^']*'|\bnet [^\s:]+: |\blayer '[^']*'", re.M)


def names_the_input(message, names):
    """Does an error message say where: a file name given, or a layer `name (Type)`?"""
    return any(n and n in message for n in names) or bool(_LAYER_LABEL.search(message)) \
        or "<text>" in message or "<bytes>" in message


def classify(error, names=()):
    """The outcome of a target that raised `error` (None: it returned)."""
    from segaware_caffe.errors import SegawareError

    if error is None:
        return Outcome("ok")
    message = str(error)
    if isinstance(error, FuzzTimeout):
        return Outcome("hang", f"over {TIME_LIMIT_S} s at {_project_place(error.__traceback__)}")
    if isinstance(error, MemoryError) or (isinstance(error, (RuntimeError, ValueError))
                                          and ALLOCATION.search(message)):
        return Outcome("big-allocation", f"{type(error).__name__} at "
                                         f"{_project_place(error.__traceback__)}", message[:300])
    if isinstance(error, SegawareError):
        if names_the_input(message, names):
            return Outcome("reported", type(error).__name__, message[:300])
        return Outcome("unnamed", f"{type(error).__name__} at {_project_place(error.__traceback__)}",
                       message[:300])
    if isinstance(error, NotImplementedError) and message.strip():
        return Outcome("unsupported", f"NotImplementedError at {_project_place(error.__traceback__)}",
                       message[:300])
    return Outcome("escaped", f"{type(error).__name__} at {_project_place(error.__traceback__)}",
                   message[:300])


RAISE = False   # replaying one case: print the traceback of what a target raised


def run_target(function, *args, names=(), **kwargs):
    """Call a target under the time limit, return its Outcome (a target may return one itself)."""
    try:
        with time_limit(), quiet():
            result = function(*args, **kwargs)
    except (Exception, FuzzTimeout) as error:   # every failure is an outcome
        if RAISE:
            traceback.print_exc()
        return classify(error, names)
    return result if isinstance(result, Outcome) else Outcome("ok")


# ---------------------------------------------------------------------------- targets
def _write(folder, name, data):
    path = Path(folder) / name
    path.write_bytes(data)
    return path


def _zeros_feed(net):
    import torch
    feed = {}
    for name in net.input_names:
        shape = tuple(net.input_shapes[name])
        if len(shape) > 8 or int(np.prod(shape, dtype=np.float64)) > 5_000_000:
            return None
        feed[name] = torch.zeros(shape)
    return feed


def target_reader(kind, data, folder, seed):
    """caffe_proto readers on one mutated file."""
    from segaware_caffe import caffe_proto
    path = _write(folder, seed.name, data)
    if kind == "prototxt":
        caffe_proto.read_net(path, variables=seed.extra.get("variables"))
    elif kind == "caffemodel":
        caffe_proto.read_weights(path)
    elif kind == "binaryproto":
        caffe_proto.read_blob(path)
    elif kind == "solverstate":
        caffe_proto.read_solverstate(path)
    elif kind == "solver":
        with working_directory(seed.case):
            caffe_proto.read_solver(path, load_nets=True)
    elif kind == "image":
        from segaware_caffe.data import read_image
        read_image(path, color=True)
        read_image(path, color=False)
    elif kind == "npy":
        from segaware_caffe.data.arrays import read_npy
        read_npy(path)
    elif kind in ("safetensors", "pt"):
        from segaware_caffe.converters.tensor_files import read_tensor_file
        read_tensor_file(path)


def _case_copy(seed, folder):
    """A private copy of the seed's golden case folder (data layers read files beside it;
    writers write there)."""
    target = Path(folder) / "case"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(seed.case, target)
    return target


def target_builder(data, folder, seed):
    """sc.Net on a mutated prototxt of a golden case, then one forward pass."""
    import torch

    import segaware_caffe as sc
    case = seed.case                # run_case's private copy
    path = _write(case, "fuzz.prototxt", data)
    with working_directory(case):
        net = sc.Net(path, variables=seed.extra.get("variables"), phase=seed.extra.get("phase", "test"))
        feed = _zeros_feed(net)
        if feed is not None:
            with torch.no_grad():
                net.forward(**feed)


def target_weights(data, folder, seed):
    """sc.Net(case net, weights=mutated caffemodel): a load that leaves layers of the original
    file at their fillers without a word (an error or a warning) is a silent partial load."""
    import segaware_caffe as sc
    from segaware_caffe import caffe_proto
    path = _write(folder, seed.name, data)
    net_file = seed.case / "net.prototxt"
    with working_directory(seed.case), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = sc.Net(net_file, variables=seed.extra.get("variables"),
                     phase=seed.extra.get("phase", "test"), weights=str(path))
    full = caffe_proto.read_weights(seed.data)
    report = net.load_weights(str(path))   # which layers the file filled (quietly, to compare)
    expected = {layer.name for layer in list(full.layer) + list(full.layers) if len(layer.blobs)}
    missing = [n for n in report.not_in_weights if n in expected]
    said = any(name in str(w.message) for w in caught for name in missing)
    if missing and not said:
        return Outcome("silent-partial-load", f"{len(missing)} layer(s) kept their fillers: "
                                              f"{', '.join(missing[:4])}")
    return Outcome("ok")


def target_convert(kind, data, folder, seed):
    """caffemodel -> safetensors, or safetensors/.pt -> caffemodel, on a mutated input."""
    from segaware_caffe.converters import caffemodel as cm
    path = _write(folder, seed.name, data)
    prototxt = seed.case / "net.prototxt"
    with working_directory(seed.case):
        if kind == "caffemodel":
            out = Path(folder) / "out.safetensors"
            if out.exists():
                out.unlink()
            cm.convert_caffemodel(prototxt, path, out, variables=seed.extra.get("variables"),
                                  phase=seed.extra.get("phase", "test"))
        else:
            out = Path(folder) / "out.caffemodel"
            if out.exists():
                out.unlink()
            cm.convert_to_caffemodel(prototxt, path, out)


def target_solver(data, folder, seed):
    """A mutated solver prototxt of a golden solver case: build, then two steps on zeros."""
    import torch

    from segaware_caffe.solver import Solver
    case = seed.case                # run_case's private copy
    path = _write(case, "fuzz_solver.prototxt", data)
    with working_directory(case):
        solver = Solver(path, max_seconds=RUN_BOUND_S)
        feed = _zeros_feed(solver.net)
        if feed is not None:
            solver.step(2, inputs={k: v.numpy() for k, v in feed.items()})
    del torch


def target_solverstate(data, folder, seed):
    """Restore a mutated .solverstate into its golden solver."""
    from segaware_caffe.solver import Solver
    case = seed.case                # run_case's private copy
    state = _write(case, "fuzz.solverstate", data)
    with working_directory(case):
        Solver(case / "solver.prototxt").restore(state)


def cli_capture(argv):
    """(status, stderr) of main(argv) in this process; SystemExit from argparse is a status."""
    from segaware_caffe.tools.cli import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 2
    return status, err.getvalue()


CLI_PLACE = re.compile(r"internal error: (\w+): .* at (.+?)(?: \(run with --debug|$)", re.S)


def cli_outcome(status, err, names=()):
    if "Traceback (most recent call last)" in err:
        return Outcome("traceback", err.strip().splitlines()[-1][:200], err[-300:])
    if status == 0:
        return Outcome("ok")
    if status == 3:
        match = CLI_PLACE.search(err)
        detail = f"{match.group(1)} at {match.group(2)}" if match else err.strip()[:200]
        if match and ALLOCATION.search(err):
            return Outcome("big-allocation", detail, err.strip()[:300])
        return Outcome("escaped", detail, err.strip()[:300])
    if "not enough memory" in err:
        return Outcome("big-allocation", "MemoryError (reported by the CLI)", err.strip()[:300])
    if status in (1, 2, 130):
        if status == 2 or names_the_input(err, names) or "--" in err:
            return Outcome("reported", f"exit {status}", err.strip()[:300])
        return Outcome("unnamed", f"exit {status}", err.strip()[:300])
    return Outcome("escaped", f"exit status {status}", err.strip()[:300])


def cli_argv(kind, path, folder, seed, c):
    """A command line that feeds the mutated file at `path` to a verb."""
    folder = Path(folder)
    case = seed.case
    variables = []
    for key, value in (seed.extra.get("variables") or {}).items():
        variables += ["--set", f"{key}={value}"]
    if kind == "prototxt":
        verb = c.choice(("inspect", "run", "export", "time", "convert"))
        if verb == "inspect":
            return ["inspect", str(path), *variables]
        if verb == "run":
            return ["run", str(path), *variables]
        if verb == "export":
            out = folder / "m.py"
            return ["export", str(path), "--python", str(out), "--force", *variables]
        if verb == "time":
            return ["time", "--model", str(path), "--iterations", "1", *variables]
        weights = case / "weights.caffemodel"
        if weights.is_file():
            return ["convert", str(path), str(weights), "-o", str(folder / "o.safetensors"),
                    "--force", *variables]
        return ["inspect", str(path), *variables]
    if kind == "caffemodel":
        verb = c.choice(("inspect", "convert", "run"))
        if verb == "inspect":
            return ["inspect", str(case / "net.prototxt"), "--weights", str(path), *variables]
        if verb == "run":
            return ["run", str(case / "net.prototxt"), "--weights", str(path), *variables]
        return ["convert", str(case / "net.prototxt"), str(path), "-o",
                str(folder / "o.safetensors"), "--force", "--phase",
                seed.extra.get("phase", "test"), *variables]
    if kind in ("safetensors", "pt"):
        if c.int(0, 1):
            return ["export", str(case / "net.prototxt"), str(path), "--python",
                    str(folder / "m.py"), "--force"]
        return ["convert", str(case / "net.prototxt"), str(path), "--to-caffemodel", "-o",
                str(folder / "o.caffemodel"), "--force"]
    bound = ["--max-seconds", str(RUN_BOUND_S)]
    if kind == "solver":
        return ["train", "--solver", str(path), "--iterations", "2", *bound]
    if kind == "solverstate":
        return ["train", "--solver", str(case / "solver.prototxt"), "--snapshot", str(path),
                "--iterations", "3", *bound]
    if kind == "image":
        net = folder / "rgb.prototxt"
        net.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }\n'
                       'layer { name: "r" type: "ReLU" bottom: "data" top: "out" }\n')
        if c.int(0, 1):
            return ["run", str(net), "--input", f"data={path}"]
        gt = folder / "gt"
        gt.mkdir(exist_ok=True)
        pred = folder / "pred"
        pred.mkdir(exist_ok=True)
        shutil.copy(path, gt / "a.png")
        shutil.copy(path, pred / "a.png")
        (folder / "ids.txt").write_text("a\n")
        return ["eval", "--pred", str(pred), "--gt", str(gt), "--list", str(folder / "ids.txt")]
    if kind == "npy":
        net = folder / "npy.prototxt"
        net.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }\n'
                       'layer { name: "r" type: "ReLU" bottom: "data" top: "out" }\n')
        return ["run", str(net), "--input", f"data={path}"]
    if kind == "binaryproto":
        return ["inspect", str(path)]
    raise ValueError(kind)


def target_cli(kind, data, folder, seed, c):
    path = _write(folder, seed.name, data)
    argv = cli_argv(kind, path, folder, seed, c)
    with working_directory(seed.case or folder):
        status, err = cli_capture(argv)
    if RAISE:
        print("argv:", argv, "\nstatus:", status, "\n" + err)
    return cli_outcome(status, err, names=(seed.name, path.name, str(path), str(folder)))


ARGUMENT_LIES = {
    "--iterations": ("-1", "0", "1000000000", "x", "1e3"),
    "--device": ("bogus", "cuda", "cuda:7", "meta", "", "cpu:0"),
    "--gpu": ("0", "all", "x", "-1", "0,1"),
    "--mean": ("nan", "1,2", "a,b,c", "1e308,1e308,1e308", ""),
    "--size": ("0", "-5", "15", "100000"),
    "--num-classes": ("0", "-1", "1000000000", "4097"),
    "--input-shape": ("data=1,3,100000,100000", "data=", "=1,2", "data=-1,3,4,4", "data=a"),
    "--max-image-pixels": ("0", "-1", "x"),
    "--set": ("X", "=1", "CLASSES=1000000000", "A=${A}"),
    "--phase": ("deploy", ""),
    "--level": ("-1", "999999999999", "x"),
    "--opset": ("0", "-1", "999"),
}


def target_cli_arguments(folder, seed, c):
    """A valid command line with one option value replaced by a lie."""
    folder = Path(folder)
    net = seed.case / "net.prototxt"
    variables = []
    for key, value in (seed.extra.get("variables") or {}).items():
        variables += ["--set", f"{key}={value}"]
    templates = [
        ["inspect", str(net), *variables, "--level", "0"],
        ["run", str(net), *variables, "--device", "cpu", "--mean", "1,2,3"],
        ["time", "--model", str(net), *variables, "--iterations", "1", "--device", "cpu"],
        ["test", "--model", str(net), *variables, "--iterations", "1", "--gpu", "0"],
        ["export", str(net), *variables, "--python", str(folder / "m.py"), "--force",
         "--input-shape", "data=1,3,4,4", "--opset", "17"],
        ["eval", "--pred", str(folder), "--gt", str(folder), "--list", str(net), "--num-classes", "21"],
        ["demo", "--out", str(folder / "demo"), "--size", "16"],
    ]
    argv = list(c.choice(templates))
    options = [i for i, a in enumerate(argv) if a in ARGUMENT_LIES and i + 1 < len(argv)]
    if options:
        i = c.choice(options)
        argv[i + 1] = c.choice(ARGUMENT_LIES[argv[i]])
    with working_directory(seed.case):
        status, err = cli_capture(argv)
    if RAISE:
        print("argv:", argv, "\nstatus:", status, "\n" + err)
    return cli_outcome(status, err, names=(str(net), "net.prototxt"))


# ---------------------------------------------------------------------------- one case
TARGETS = ("reader", "builder", "weights", "convert", "solver", "solverstate", "cli", "cli-args")
KINDS_OF_TARGET = {
    "reader": ("prototxt", "caffemodel", "binaryproto", "solverstate", "solver", "image", "npy",
               "safetensors", "pt"),
    "builder": ("prototxt",), "weights": ("caffemodel",),
    "convert": ("caffemodel", "safetensors", "pt"), "solver": ("solver",),
    "solverstate": ("solverstate",),
    "cli": ("prototxt", "caffemodel", "safetensors", "pt", "solver", "solverstate", "image", "npy"),
    "cli-args": ("prototxt",),
}

# the targets fed mutated bytes: (function, whether it takes the seed's kind first, whether the
# chooser last); each is called as function([kind,] data, folder, seed[, c])
_DATA_TARGETS = {"reader": (target_reader, True, False), "builder": (target_builder, False, False),
                 "weights": (target_weights, False, False),
                 "convert": (target_convert, True, False), "solver": (target_solver, False, False),
                 "solverstate": (target_solverstate, False, False), "cli": (target_cli, True, True)}


def pick_seed(target, seeds, c):
    """(kind, seed) for a target: targets that need a net take seeds from golden cases."""
    kind = c.choice(KINDS_OF_TARGET[target])
    pool = seeds[kind]
    if target in ("builder", "weights", "convert", "solver", "solverstate", "cli-args") or (
            target == "cli" and kind not in ("image", "npy", "binaryproto")):
        pool = [s for s in pool if s.case is not None]
    return kind, c.choice(pool)


def run_case(target, kind, seed, folder, c):
    """Mutate `seed` with chooser `c` and feed it to `target`: the Outcome. Every target runs
    in a private copy of the seed's golden folder: writer layers and snapshots land there."""
    if seed.case is not None:
        seed = dataclasses.replace(seed, case=_case_copy(seed, folder))
    names = (seed.name, str(Path(folder) / seed.name), "fuzz.prototxt", "fuzz_solver.prototxt",
             "fuzz.solverstate")
    if target == "cli-args":
        return run_target(target_cli_arguments, folder, seed, c, names=names)
    data = MUTATORS_BY_KIND[kind](seed.data, c)
    if target not in _DATA_TARGETS:
        raise ValueError(target)
    function, takes_kind, takes_chooser = _DATA_TARGETS[target]
    args = ((kind,) if takes_kind else ()) + (data, folder, seed) + ((c,) if takes_chooser else ())
    return run_target(function, *args, names=names)


def clean(folder):
    """Empty a scratch folder between cases (a writer may have left files)."""
    for entry in Path(folder).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def limit_memory(extra_bytes=4 << 30):
    """RLIMIT_AS = this process's current address space + `extra_bytes`: an allocation past the
    budget fails (MemoryError / torch's allocator error) instead of swapping the machine. Returns
    the previous limits (to restore), or None where unsupported."""
    try:
        import resource
    except ImportError:
        return None
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[0])
        current = pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
    previous = resource.getrlimit(resource.RLIMIT_AS)
    soft = current + extra_bytes
    hard = previous[1]
    if hard != resource.RLIM_INFINITY and soft > hard:
        soft = hard
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return previous


def restore_memory(previous):
    if previous is not None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, previous)


__all__ = ["Chooser", "DrawChooser", "Outcome", "PROBLEMS", "TARGETS", "KINDS_OF_TARGET",
           "build_seeds", "run_case", "classify", "clean", "limit_memory", "restore_memory"]
