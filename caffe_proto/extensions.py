"""LayerParameter fields of other Caffe forks, declared by the user in proto2 syntax.

    declare('''
        optional UpsampleParameter upsample_param = 320;
        message UpsampleParameter {
          optional int32 scale = 1 [default = 2];
          enum Mode { NEAREST = 0; BILINEAR = 1; }
          optional Mode mode = 2 [default = NEAREST];
        }''')

Top-level `optional/repeated TYPE NAME = NUMBER;` lines are fields of LayerParameter; `message`
and `enum` blocks define their types (types of caffe.proto, FillerParameter say, may be used by
name). After that, a prototxt's `upsample_param { scale: 4 }` parses (the block is read with the
declared schema and kept in the LayerParameter as the wire bytes of field 320, which is also how
a binary file of that fork carries it), and values(layer_param, ["upsample_param"]) gives plain
Python values: {"upsample_param": {"scale": 4, "mode": "NEAREST"}}.
"""
import re
import threading

from google.protobuf import descriptor_pb2, descriptor_pool, text_format

from . import caffe_pb2
from .errors import CaffeFormatError
from .wire import LEN, is_repeated, iter_fields

_LOCK = threading.Lock()
_POOL = None
_DECLARED = {}        # LayerParameter field name -> _Declaration
_COUNTER = [0]

_SCALARS = {
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "float": descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "fixed64": descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64,
    "fixed32": descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "sfixed32": descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32,
    "sfixed64": descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64,
    "sint32": descriptor_pb2.FieldDescriptorProto.TYPE_SINT32,
    "sint64": descriptor_pb2.FieldDescriptorProto.TYPE_SINT64,
}
_LABELS = {"optional": 1, "required": 2, "repeated": 3}
_TOKEN = re.compile(r'\s+|//[^\n]*|/\*.*?\*/|(?P<tok>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[A-Za-z_][\w.]*|'
                    r'-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|-?\.\d+(?:[eE][-+]?\d+)?|[{}\[\]=;,])', re.S)


class DeclarationError(CaffeFormatError):
    """A params declaration that cannot be used; says what and where in the snippet."""


class _Declaration:
    def __init__(self, text, fields, holder_class, owner):
        self.text, self.fields, self.holder_class, self.owner = text, fields, holder_class, owner


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = descriptor_pool.DescriptorPool()
        _POOL.AddSerializedFile(caffe_pb2.DESCRIPTOR.serialized_pb)
    return _POOL


def _tokens(text):
    out = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            line = text.count("\n", 0, pos) + 1
            raise DeclarationError(f"params line {line}: cannot read {text[pos:pos + 20]!r}")
        if match.group("tok"):
            out.append((match.group("tok"), text.count("\n", 0, pos) + 1))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text):
        self.tokens = _tokens(text)
        self.index = 0

    def peek(self):
        return self.tokens[self.index][0] if self.index < len(self.tokens) else None

    def take(self, expected=None):
        if self.index >= len(self.tokens):
            raise DeclarationError(f"params: unexpected end, expected {repr(expected) if expected else 'more'}")
        token, line = self.tokens[self.index]
        if expected is not None and token != expected:
            raise DeclarationError(f"params line {line}: expected {expected!r}, got {token!r}")
        self.index += 1
        return token

    def line(self):
        return self.tokens[min(self.index, len(self.tokens) - 1)][1] if self.tokens else 1

    def body(self, closing):
        """(fields, messages, enums) until `closing` (None: the end)."""
        fields, messages, enums = [], [], []
        while self.peek() != closing:
            if self.peek() is None:
                raise DeclarationError(f"params: missing '}}' (a message or enum is not closed)")
            word = self.peek()
            if word == "message":
                messages.append(self.message())
            elif word == "enum":
                enums.append(self.enum())
            elif word in _LABELS:
                fields.append(self.field())
            elif word == "syntax" or word == "package" or word == "import":
                raise DeclarationError(f"params line {self.line()}: {word!r} is not needed here: "
                                       f"give fields, messages and enums only")
            else:
                raise DeclarationError(f"params line {self.line()}: expected optional, repeated, "
                                       f"required, message or enum, got {word!r}")
        return fields, messages, enums

    def message(self):
        self.take("message")
        name = self.take()
        self.take("{")
        fields, messages, enums = self.body("}")
        self.take("}")
        return name, fields, messages, enums

    def enum(self):
        self.take("enum")
        name = self.take()
        self.take("{")
        values = []
        while self.peek() != "}":
            value_name = self.take()
            self.take("=")
            number = self.take()
            self.take(";")
            values.append((value_name, int(number)))
        self.take("}")
        if not values:
            raise DeclarationError(f"params: enum {name} has no values")
        return name, values

    def field(self):
        line = self.line()
        label = self.take()
        type_name = self.take()
        name = self.take()
        self.take("=")
        number = self.take()
        if not number.isdigit():
            raise DeclarationError(f"params line {line}: field {name}: number must be a positive "
                                   f"integer, got {number!r}")
        options = {}
        if self.peek() == "[":
            self.take("[")
            while True:
                key = self.take()
                self.take("=")
                options[key] = self.take()
                if self.peek() == ",":
                    self.take(",")
                    continue
                break
            self.take("]")
        self.take(";")
        unknown = set(options) - {"default", "packed"}
        if unknown:
            raise DeclarationError(f"params line {line}: field {name}: option {sorted(unknown)[0]} "
                                   f"is not supported (default and packed are)")
        return dict(label=label, type=type_name, name=name, number=int(number), options=options,
                    line=line)


def _build(text, owner):
    parser = _Parser(text)
    fields, messages, enums = parser.body(None)
    if not fields:
        raise DeclarationError("params declares no LayerParameter field (a top-level line such as "
                               "`optional MyParameter my_param = 300;`)")
    _COUNTER[0] += 1
    package = f"segaware_user.d{_COUNTER[0]}"
    file_proto = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package,
                                                    syntax="proto2", dependency=["caffe.proto"])
    known = {}       # simple and dotted names -> full name, kind

    def collect(prefix, messages, enums):
        for name, values in enums:
            full = f"{prefix}.{name}"
            known.setdefault(name, (full, "enum"))
            known[full[len(package) + 1:]] = (full, "enum")
        for name, _, nested_messages, nested_enums in messages:
            full = f"{prefix}.{name}"
            known.setdefault(name, (full, "message"))
            known[full[len(package) + 1:]] = (full, "message")
            collect(full, nested_messages, nested_enums)
    collect(package, messages, enums)

    def resolve(type_name, line, scope):
        for candidate in ([f"{scope}.{type_name}"[len(package) + 1:]] if scope != package else []) \
                + [type_name]:
            if candidate in known:
                return known[candidate]
        try:
            _pool().FindMessageTypeByName(f"caffe.{type_name}")
            return f"caffe.{type_name}", "message"
        except KeyError:
            pass
        try:
            _pool().FindEnumTypeByName(f"caffe.{type_name}")
            return f"caffe.{type_name}", "enum"
        except KeyError:
            raise DeclarationError(f"params line {line}: unknown type {type_name!r} (not a scalar "
                                   f"type, a message or enum of the snippet, or one of "
                                   f"caffe.proto)") from None

    def fill_field(proto, spec, scope):
        if spec["label"] not in _LABELS:
            raise DeclarationError(f"params line {spec['line']}: label must be optional, repeated "
                                   f"or required, got {spec['label']!r}")
        field = proto.field.add(name=spec["name"], number=spec["number"],
                                label=_LABELS[spec["label"]])
        if spec["type"] in _SCALARS:
            field.type = _SCALARS[spec["type"]]
        else:
            full, kind = resolve(spec["type"], spec["line"], scope)
            field.type = (descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE if kind == "message"
                          else descriptor_pb2.FieldDescriptorProto.TYPE_ENUM)
            field.type_name = "." + full
        options = spec["options"]
        if "default" in options:
            if spec["label"] == "repeated" or field.type == field.TYPE_MESSAGE:
                raise DeclarationError(f"params line {spec['line']}: field {spec['name']}: only "
                                       f"optional scalar fields take a default")
            value = options["default"]
            field.default_value = value[1:-1] if value[:1] in "\"'" else value
        if options.get("packed") == "true":
            field.options.packed = True

    def add_enums(enum_types, enums):
        for enum_name, values in enums:
            enum = enum_types.add(name=enum_name)
            for value_name, number in values:
                enum.value.add(name=value_name, number=number)

    def fill_message(proto, name, fields, messages, enums, scope):
        proto.name = name
        inner = f"{scope}.{name}"
        add_enums(proto.enum_type, enums)
        for m in messages:
            fill_message(proto.nested_type.add(), *m, inner)
        for spec in fields:
            fill_field(proto, spec, inner)

    add_enums(file_proto.enum_type, enums)
    for m in messages:
        fill_message(file_proto.message_type.add(), *m, package)
    holder = file_proto.message_type.add(name="LayerFields")
    layer = caffe_pb2.LayerParameter.DESCRIPTOR
    for spec in fields:
        if spec["name"] in layer.fields_by_name:
            raise DeclarationError(f"params line {spec['line']}: LayerParameter already has a field "
                                   f"named {spec['name']!r} (number "
                                   f"{layer.fields_by_name[spec['name']].number})")
        if spec["number"] in layer.fields_by_number:
            taken = layer.fields_by_number[spec["number"]].name
            raise DeclarationError(
                f"params line {spec['line']}: field {spec['name']}: number {spec['number']} is "
                f"LayerParameter.{taken} in segaware-caffe's schema; choose a free number (text "
                f"prototxts name the field, so only binary files of your fork care about it)")
        fill_field(holder, spec, package)
    try:
        file_descriptor = _pool().Add(file_proto)
    except (TypeError, ValueError) as e:
        raise DeclarationError(f"params: the declaration does not build: {e}") from None
    holder_class = _message_class(file_descriptor.message_types_by_name["LayerFields"])
    return _Declaration(text, {spec["name"]: spec["number"] for spec in fields}, holder_class, owner)


def _message_class(descriptor):
    from google.protobuf import message_factory
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


def declare(text, owner=None):
    """Declare LayerParameter fields (see the module docstring); returns their names. Declaring
    the same text again is a no-op; another declaration of a declared name is an error."""
    if not isinstance(text, str):
        raise TypeError(f"params must be proto2 text (str), got {type(text).__name__}")
    with _LOCK:
        normalised = " ".join(t for t, _ in _tokens(text))
        names = []
        for existing in set(_DECLARED.values()):
            if " ".join(t for t, _ in _tokens(existing.text)) == normalised:
                return list(existing.fields)
        declaration = _build(text, owner)
        for name in declaration.fields:
            if name in _DECLARED:
                raise DeclarationError(f"params: LayerParameter field {name!r} is already declared "
                                       f"(for {_DECLARED[name].owner or 'another layer'}) "
                                       f"differently")
        for name in declaration.fields:
            _DECLARED[name] = declaration
            names.append(name)
        return names


def declared(name):
    """The declaration of LayerParameter field `name`, or None."""
    return _DECLARED.get(name)


def declared_names():
    return sorted(_DECLARED)


def holder_for(name):
    """An empty message with the declared field `name` (and those declared with it)."""
    declaration = _DECLARED[name]
    return declaration.holder_class()


def attach(layer_param, holder):
    """Store the declared fields set in holder inside layer_param, as their wire bytes."""
    layer_param.MergeFromString(holder.SerializeToString())


def values(layer_param, names):
    """{name: plain Python value} of the declared LayerParameter fields `names`, decoded from the
    wire bytes the layer carries (from a prototxt or a binary file), with Caffe's defaults for
    what is absent: a message gives a dict of its fields, a repeated field a list, an enum its
    value's name."""
    result = {}
    raw = None
    for name in names:
        declaration = _DECLARED.get(name)
        if declaration is None:
            raise KeyError(f"LayerParameter field {name!r} is not declared")
        if raw is None:
            raw = layer_param.SerializeToString()
        wanted = set(declaration.fields.values())
        chunks = [raw[f.start:f.end] for f in iter_fields(raw) if f.number in wanted]
        holder = declaration.holder_class()
        holder.MergeFromString(b"".join(chunks))
        result[name] = to_python(holder, holder.DESCRIPTOR.fields_by_name[name])
    return result


def given(layer_param, names):
    """Dotted names of the declared fields (and their sub-fields) the layer sets explicitly."""
    out = set()
    raw = layer_param.SerializeToString()
    for name in names:
        declaration = _DECLARED[name]
        wanted = set(declaration.fields.values())
        holder = declaration.holder_class()
        holder.MergeFromString(b"".join(raw[f.start:f.end] for f in iter_fields(raw)
                                        if f.number in wanted))
        _collect_given(holder, "", out, only={name})
    return out


def _collect_given(message, prefix, out, only=None):
    for field, value in message.ListFields():
        if only is not None and field.name not in only:
            continue
        path = prefix + field.name
        out.add(path)
        if field.message_type is not None and not is_repeated(field):
            _collect_given(value, path + ".", out)


def to_python(message, field):
    value = getattr(message, field.name)
    if is_repeated(field):
        return [_scalar(field, v) for v in value]
    return _scalar(field, value)


def _scalar(field, value):
    if field.message_type is not None:
        return {f.name: to_python(value, f) for f in field.message_type.fields}
    if field.enum_type is not None:
        number = int(value)
        enum = field.enum_type.values_by_number.get(number)
        return enum.name if enum is not None else number
    return value


def parse_block(text, name):
    """A holder message with `name`'s field parsed from prototxt text `text` (raises
    text_format.ParseError with the positions of text)."""
    holder = holder_for(name)
    text_format.Parse(text, holder, allow_unknown_extension=False)
    return holder
