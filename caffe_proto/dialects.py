"""Caffe dialects: what a field number means in the binary files of each Caffe fork.

Text files name their fields, so one schema with every fork's names reads them all. Binary files
carry only numbers, and three forks give some numbers different meanings:

- ``segaware``: the segaware fork (DeepLab-v2 based) and our own schema. BVLC's fields whose
  numbers the fork took are numbered 1000 + BVLC's number here.
- ``bvlc``: BVLC Caffe. LayerParameter 143..148 are input/crop/parameter/recurrent/swish/clip_param
  (the fork's interp/seg_accuracy/mat_write/dense_crf/domain_transform/adaptive_bias_channel).
- ``ssd``: weiliu89's SSD fork, BVLC-based: BVLC's LayerParameter numbers, and
  TransformationParameter 8/9/10 are resize_param/noise_param/emit_constraint messages (the fork's
  scale_factors/crop_width/crop_height), SolverParameter 41/42 are eval_type/ap_version strings
  (BVLC's layer_wise_reduce/weights).

Reading: a file is decoded under the first dialect of READ_ORDER whose reading of the contested
numbers fits the bytes (a message field must hold a well-formed message, a float field 32-bit
values, ...), so an SSD file whose transform_param holds a resize_param is read as SSD. The
LayerParameter 143..148 clash is settled per layer by its type instead (see
binary.fix_bvlc_layer_fields), which also reads files that mix the fork's and BVLC's layers.
Writing: ``write_weights(..., dialect="ssd")`` renumbers our fields to the dialect's numbers and
refuses a field that has no place there (a scale_factors in an SSD file).
"""
from dataclasses import dataclass, field

from . import caffe_pb2
from .errors import CaffeFormatError
from .wire import (LEN, WireError, encode_varint, expected_wire_types, iter_fields, misfits,
                   read_varint)

_LAYER = "caffe.LayerParameter"
_TRANSFORM = "caffe.TransformationParameter"
_SOLVER = "caffe.SolverParameter"

# LayerParameter numbers of BVLC (and SSD) whose number the fork uses: BVLC number -> BVLC field
BVLC_LAYER_FIELDS = {143: "input_param", 144: "crop_param", 145: "parameter_param",
                     146: "recurrent_param", 147: "swish_param", 148: "clip_param"}


@dataclass(frozen=True)
class Dialect:
    name: str
    summary: str
    # {message full name: {number in this dialect's files: our field name}}
    renumber: dict = field(default_factory=dict)
    # whether files of this dialect number LayerParameter 143..148 as BVLC does (written so; read
    # by layer type whatever the dialect)
    bvlc_layer_numbers: bool = False

    def numbering(self, *, reading):
        """{message full name: {file number: our number}} for reading, or the reverse map for
        writing ({our number: file number})."""
        out = {}
        tables = dict(self.renumber)
        if self.bvlc_layer_numbers and not reading:
            tables[_LAYER] = {**BVLC_LAYER_FIELDS, **tables.get(_LAYER, {})}
        for message, numbers in tables.items():
            fields = _descriptor(message).fields_by_name
            pairs = {wire: fields[name].number for wire, name in numbers.items()}
            out[message] = pairs if reading else {ours: wire for wire, ours in pairs.items()}
        return out

    def displaced(self):
        """{message full name: {our number: our field name}}: our fields whose number this
        dialect's files use for another field, so that they cannot be written in it."""
        out = {}
        for message, pairs in self.numbering(reading=False).items():
            fields = _descriptor(message).fields_by_number
            wire_numbers = set(pairs.values())
            taken = {n: fields[n].name for n in wire_numbers if n in fields and n not in pairs}
            if taken:
                out[message] = taken
        return out


DIALECTS = {
    "segaware": Dialect("segaware", "the segaware fork and this schema (BVLC's clashing fields "
                        "at 1000 + n)"),
    "bvlc": Dialect("bvlc", "BVLC Caffe (LayerParameter 143..148 are BVLC's)",
                    bvlc_layer_numbers=True),
    "ssd": Dialect("ssd", "weiliu89's SSD fork (BVLC's layer numbers; TransformationParameter 8..10 "
                   "and SolverParameter 41/42 are SSD's)",
                   renumber={_TRANSFORM: {8: "resize_param", 9: "noise_param",
                                          10: "emit_constraint"},
                             _SOLVER: {41: "eval_type", 42: "ap_version"}},
                   bvlc_layer_numbers=True),
}
# bvlc reads like segaware (its one clash is settled per layer type), so it is not tried apart
READ_ORDER = ("segaware", "ssd")


def dialect(name):
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown Caffe dialect {name!r}; known: {', '.join(DIALECTS)}") from None


def _descriptor(full_name):
    return caffe_pb2.DESCRIPTOR.pool.FindMessageTypeByName(full_name)


def _all_messages():
    out = []

    def walk(descriptors):
        for d in descriptors:
            out.append(d)
            walk(d.nested_types)
    walk(caffe_pb2.DESCRIPTOR.message_types_by_name.values())
    return out


def _leading_to(targets):
    """Full names of the messages that contain (at any depth) one of the target messages."""
    reach = set(targets)
    messages = _all_messages()
    grew = True
    while grew:
        grew = False
        for d in messages:
            if d.full_name in reach:
                continue
            if any(f.message_type is not None and f.message_type.full_name in reach
                   for f in d.fields):
                reach.add(d.full_name)
                grew = True
    return reach


@dataclass
class _Plan:
    numbers: dict                # {message: {number in: number out}}
    refuse: dict                 # {message: {number: field name}} (writing)
    contested: dict              # {message: set of numbers in} whose fit is checked (reading)
    enter: set                   # messages worth entering
    misfits: list = field(default_factory=list)


def _plan(numbers, refuse=None, contested=None):
    refuse, contested = refuse or {}, contested or {}
    enter = _leading_to(set(numbers) | set(refuse) | set(contested))
    return _Plan(numbers, refuse, contested, enter)


def _contested_numbers(names):
    """{message: set of file numbers} where the given dialects read a number differently."""
    out = {}
    for name in names:
        for message, pairs in DIALECTS[name].numbering(reading=True).items():
            out.setdefault(message, set()).update(pairs)
    return out


class DialectError(CaffeFormatError):
    """A field that the target dialect has no number for."""


def _walk(data, start, end, descriptor, plan, chunks, context):
    """Append the message data[start:end] renumbered by plan to chunks; True if anything
    changed. context: the layer being read (for messages), filled in on the way down."""
    name = descriptor.full_name
    numbers = plan.numbers.get(name, {})
    refused = plan.refuse.get(name, {})
    contested = plan.contested.get(name, ())
    changed = False
    layer_index = 0
    for f in iter_fields(data, start, end):
        if f.number in refused:
            raise DialectError(f"{context.text()}{descriptor.name}.{refused[f.number]} (field "
                               f"{f.number}) has no number of its own in this dialect: the "
                               f"number is another field there; clear it, or write the "
                               f"segaware dialect")
        number = numbers.get(f.number, f.number)
        declared = descriptor.fields_by_number.get(number)
        if f.number in contested and declared is not None:
            if f.wire_type not in expected_wire_types(declared):
                plan.misfits.append((f.start, f"{context.text()}{descriptor.name}.{declared.name} "
                                     f"holds a {'length-delimited' if f.wire_type == LEN else 'scalar'} "
                                     f"value"))
            elif declared.type == declared.TYPE_MESSAGE:
                plan.misfits += [(o, context.text() + t) for o, t in
                                 misfits(data, f.value_start, f.end, declared.message_type)]
        sub_changed = False
        sub_chunks = []
        if (declared is not None and f.wire_type == LEN and declared.message_type is not None
                and declared.message_type.full_name in plan.enter):
            sub_context = context
            if name == "caffe.NetParameter" and declared.name in ("layer", "layers"):
                sub_context = _Context(data, f.value_start, f.end, declared.message_type,
                                       layer_index)
                layer_index += 1
            try:
                sub_changed = _walk(data, f.value_start, f.end, declared.message_type, plan,
                                    sub_chunks, sub_context)
            except WireError as error:
                if getattr(error, "context", None) is None:
                    error.context = sub_context
                raise
        if number != f.number or sub_changed:
            changed = True
            chunks.append(encode_varint(number << 3 | f.wire_type))
            if f.wire_type == LEN:
                payload = b"".join(sub_chunks) if sub_changed else data[f.value_start:f.end]
                chunks.append(encode_varint(len(payload)))
                chunks.append(payload)
            else:
                chunks.append(data[f.value_start:f.end])
        else:
            chunks.append(data[f.start:f.end])
    return changed


class _Context:
    """The layer a walk is inside, described only when an error needs it."""

    def __init__(self, data=None, start=0, end=0, descriptor=None, index=None):
        self.data, self.start, self.end, self.descriptor, self.index = \
            data, start, end, descriptor, index

    def text(self):
        if self.index is None:
            return ""
        return f"layer {layer_label(self.data, self.start, self.end, self.descriptor, self.index)}: "


def layer_label(data, start, end, descriptor, index):
    """"#index 'name' (Type)" of a LayerParameter / V1LayerParameter from its (maybe cut) bytes."""
    name = kind = None
    name_number = descriptor.fields_by_name["name"].number
    type_field = descriptor.fields_by_name["type"]
    try:
        for f in iter_fields(data, start, min(end, len(data))):
            if f.number == name_number and f.wire_type == LEN and name is None:
                name = bytes(data[f.value_start:f.end]).decode("utf-8", "replace")
            elif f.number == type_field.number and kind is None:
                if f.wire_type == LEN:
                    kind = bytes(data[f.value_start:f.end]).decode("utf-8", "replace")
                else:
                    value, _ = read_varint(data, f.value_start, f.end)
                    enum = type_field.enum_type.values_by_number.get(value) \
                        if type_field.enum_type else None
                    kind = enum.name if enum else str(value)
            if name is not None and kind is not None:
                break
    except WireError:
        pass
    text = f"#{index}"
    if name is not None:
        text += f" {name!r}"
    if kind is not None:
        text += f" ({kind})"
    return text


def to_dialect(data, root, name):
    """Our serialisation of a root message -> the bytes `name`'s files hold (for writers)."""
    d = dialect(name)
    plan = _plan(d.numbering(reading=False), d.displaced())
    if not plan.numbers and not plan.refuse:
        return data
    chunks = []
    view = memoryview(data)
    changed = _walk(view, 0, len(data), root.DESCRIPTOR, plan, chunks, _Context())
    return b"".join(chunks) if changed else data


def from_dialect(data, root_descriptor, name, *, check_candidates=READ_ORDER):
    """(bytes in our numbering, misfits) of a file in dialect `name`. Misfits: where the
    dialect's reading of a number the candidates disagree on does not fit the bytes.
    Raises WireError where the bytes are malformed on the way."""
    d = dialect(name)
    plan = _plan(d.numbering(reading=True), contested=_contested_numbers(check_candidates))
    view = memoryview(data)
    chunks = []
    changed = _walk(view, 0, len(data), root_descriptor, plan, chunks, _Context())
    return (b"".join(chunks) if changed else data), plan.misfits
