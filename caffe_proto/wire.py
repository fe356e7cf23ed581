"""The protobuf wire format, walked by hand where the generated parser cannot help: field numbers
that mean different things in different Caffe forks (dialects), and errors that say where a file
breaks (byte offset, the layer being read, truncated or corrupt).

Only messages that can lead to a field of interest are entered; everything else (blob data above
all) is skipped by its length, so a walk of a large .caffemodel costs a few hundred field reads.
"""
from dataclasses import dataclass

from .errors import CaffeFormatError

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
WIRE_NAMES = {VARINT: "varint", I64: "64-bit", LEN: "length-delimited", SGROUP: "group start",
              EGROUP: "group end", I32: "32-bit"}

_VARINT_TYPES = frozenset({"int32", "int64", "uint32", "uint64", "sint32", "sint64", "bool", "enum"})


class WireError(CaffeFormatError):
    """The bytes are not a well-formed protobuf message at `offset`. `past_end` is set when a
    length or value runs past the end of the whole data (the file is cut short there). The
    readers turn it into a message naming the file; it is a CaffeFormatError all the same."""

    def __init__(self, offset, problem, *, past_end=False, number=None, wire_type=None):
        super().__init__(problem)
        self.offset, self.problem, self.past_end = offset, problem, past_end
        self.number, self.wire_type = number, wire_type


def encode_varint(value):
    """The varint bytes of `value`; a negative value is written as its 64-bit two's complement,
    as protobuf writes a negative int32/int64 (ten bytes)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_len_field(number, payload):
    """Wire bytes of length-delimited field `number` holding `payload` (a sub-message, a string or
    a packed array), as any protobuf writer encodes it."""
    return encode_varint(number << 3 | LEN) + encode_varint(len(payload)) + payload


def read_varint(data, pos, end):
    """(value, next position) of the varint at pos, which must end before `end`."""
    result = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise WireError(start, f"a varint at byte {start} runs past the end of "
                            f"{'the data' if end >= len(data) else 'its message'}",
                            past_end=end >= len(data))
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError(start, f"a varint at byte {start} is longer than 10 bytes")


@dataclass(frozen=True)
class Field:
    number: int
    wire_type: int
    start: int          # offset of the field's key
    value_start: int    # offset of the value (the payload for length-delimited fields)
    end: int            # offset just past the field


def iter_fields(data, start=0, end=None):
    """Yield every Field of the message in data[start:end]; WireError where it breaks."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        field = _next_field(data, pos, end)
        if field.wire_type == EGROUP:
            raise WireError(field.start, f"byte {field.start}: a group end with no group open",
                            number=field.number, wire_type=EGROUP)
        yield field
        pos = field.end


def _next_field(data, pos, end):
    field_start = pos
    key, pos = read_varint(data, pos, end)
    number, wire_type = key >> 3, key & 7
    if number == 0:
        raise WireError(field_start, f"byte {field_start}: field number 0 is not valid",
                        number=0, wire_type=wire_type)
    value_start = pos
    if wire_type == VARINT:
        _, pos = read_varint(data, pos, end)
    elif wire_type in (I64, I32):
        pos += 8 if wire_type == I64 else 4
    elif wire_type == LEN:
        length, value_start = read_varint(data, pos, end)
        pos = value_start + length
    elif wire_type == SGROUP:   # no Caffe schema has groups, but another fork's file might
        while True:
            if pos >= end:
                raise WireError(field_start, f"group {number} opened at byte {field_start} is "
                                f"never closed", past_end=end >= len(data), number=number,
                                wire_type=wire_type)
            inner = _next_field(data, pos, end)
            pos = inner.end
            if inner.wire_type == EGROUP:
                if inner.number != number:
                    raise WireError(inner.start, f"byte {inner.start}: group {number} closed "
                                    f"as group {inner.number}", number=number,
                                    wire_type=wire_type)
                break
    elif wire_type != EGROUP:
        raise WireError(field_start, f"byte {field_start}: wire type {wire_type} is not a "
                        f"protobuf wire type", number=number, wire_type=wire_type)
    if pos > end:
        where = "the data" if end >= len(data) else "its enclosing message"
        raise WireError(field_start,
                        f"field {number} ({WIRE_NAMES[wire_type]}) at byte {field_start} needs "
                        f"{pos - value_start} bytes from byte {value_start}, but {where} ends "
                        f"{end - value_start} bytes after it", past_end=pos > len(data),
                        number=number, wire_type=wire_type)
    return Field(number, wire_type, field_start, value_start, pos)


def expected_wire_types(field):
    """The wire types a protobuf writer uses for this field descriptor."""
    kind = _kind(field)
    if kind in ("string", "bytes", "message"):
        return (LEN,)
    if kind == "group":
        return (SGROUP,)
    scalar = VARINT if kind in _VARINT_TYPES else I64 if kind in ("double", "fixed64", "sfixed64") \
        else I32
    repeated = is_repeated(field)
    if repeated and _packed(field):
        return (LEN, scalar)       # readers accept both for packed fields
    return (scalar,)


def _kind(field):
    names = {field.TYPE_DOUBLE: "double", field.TYPE_FLOAT: "float", field.TYPE_INT64: "int64",
             field.TYPE_UINT64: "uint64", field.TYPE_INT32: "int32", field.TYPE_FIXED64: "fixed64",
             field.TYPE_FIXED32: "fixed32", field.TYPE_BOOL: "bool", field.TYPE_STRING: "string",
             field.TYPE_GROUP: "group", field.TYPE_MESSAGE: "message", field.TYPE_BYTES: "bytes",
             field.TYPE_UINT32: "uint32", field.TYPE_ENUM: "enum", field.TYPE_SFIXED32: "sfixed32",
             field.TYPE_SFIXED64: "sfixed64", field.TYPE_SINT32: "sint32",
             field.TYPE_SINT64: "sint64"}
    return names[field.type]


def is_repeated(field):
    """Whether a field descriptor is repeated: runtimes before 6 have only `label`, 7 only
    `is_repeated`."""
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _packed(field):
    packed = getattr(field, "is_packed", None)     # protobuf 4.22+
    if packed is not None:
        return bool(packed)
    options = field.GetOptions()
    return bool(options.packed) if options.HasField("packed") else False


def misfits(data, start, end, descriptor, limit=8):
    """Places in a message (recursively) whose known fields have a wire type their declaration
    cannot produce, or whose bytes are malformed: a list of (offset, text), at most `limit`."""
    found = []
    try:
        for field in iter_fields(data, start, end):
            declared = descriptor.fields_by_number.get(field.number)
            if declared is None:
                continue
            if field.wire_type not in expected_wire_types(declared):
                found.append((field.start, f"{descriptor.name}.{declared.name} (field "
                              f"{field.number}) is {WIRE_NAMES[field.wire_type]}, declared "
                              f"{_kind(declared)}"))
            elif declared.type == declared.TYPE_MESSAGE:
                found += misfits(data, field.value_start, field.end, declared.message_type,
                                 limit - len(found))
            if len(found) >= limit:
                break
    except WireError as error:
        found.append((error.offset, error.problem))
    return found[:limit]
