"""Text side of Caffe files: `${VAR}` templates, shell-style variable files, and protobuf text parsing
with errors that name the file, line, column and layer."""
import difflib
import os
import re
import shlex

from google.protobuf import text_format

from . import caffe_pb2
from .errors import CaffeFormatError

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_VARIABLE_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


# ------------------------------------------------------------------------------------------------
# Source loading

def _is_path(path_or_text):
    """A str names a file when it is one line with no prototxt syntax (`:` or `{`) in it."""
    if isinstance(path_or_text, os.PathLike):
        return True
    return (isinstance(path_or_text, str) and path_or_text.strip() != "" and "\n" not in path_or_text
            and (os.path.exists(path_or_text) or not re.search(r"[{}]|:(?![\\/])", path_or_text)))


def load_text(path_or_text):
    """(text, where, path or None) for a path, a str of prototxt text, or bytes."""
    if isinstance(path_or_text, (bytes, bytearray)):
        return _decode(bytes(path_or_text), "<bytes>"), "<bytes>", None
    if _is_path(path_or_text):
        path = os.fspath(path_or_text)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CaffeFormatError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise CaffeFormatError(f"{path}: is a directory, expected a text prototxt file") from None
        return _decode(data, path), path, path
    if not isinstance(path_or_text, str):
        raise TypeError(f"expected a path, prototxt text or bytes, got {type(path_or_text).__name__}")
    return path_or_text, "<text>", None


def _decode(data, where):
    if b"\x00" in data[:4096]:
        raise CaffeFormatError(
            f"{where}: this is a binary file, not a text prototxt (for a .caffemodel use "
            f"read_weights, for a .binaryproto mean file read_blob)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaffeFormatError(
            f"{where}: not UTF-8 text (byte {e.start}); is this a binary .caffemodel? "
            f"Use read_weights for those") from None


# ------------------------------------------------------------------------------------------------
# Variables and templates

def read_variables(path):
    """KEY=value pairs from a shell-style file (the run scripts' `export KEY=value` lines).

    Accepts blank lines, `# comments`, an optional `export`, single or double quotes and trailing
    comments; `$KEY`/`${KEY}` inside a value refer to keys defined earlier in the file. Anything
    else (commands, `$(( ))` arithmetic) is an error naming the line.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise CaffeFormatError(f"{path}: variables file not found") from None
    except UnicodeDecodeError:
        raise CaffeFormatError(f"{path}: variables file is not UTF-8 text") from None
    variables = {}
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _VARIABLE_LINE.match(stripped)
        if not match:
            raise CaffeFormatError(
                f"{path}:{number}: expected KEY=value (optionally after `export`), got:\n"
                f"    {line}")
        key, raw = match.groups()
        if "$(" in raw or "`" in raw:
            raise CaffeFormatError(
                f"{path}:{number}: {key}: command substitution and arithmetic ($(...), `...`) "
                f"are not evaluated; write the value itself, got:\n    {line}")
        try:
            words = shlex.split(raw, comments=True, posix=True)
        except ValueError as e:  # unbalanced quotes
            raise CaffeFormatError(f"{path}:{number}: {key}: {e}:\n    {line}") from None
        if len(words) > 1:
            raise CaffeFormatError(
                f"{path}:{number}: {key}: the value has unquoted spaces; quote it, got:\n    {line}")
        value = words[0] if words else ""
        if not raw.lstrip().startswith("'"):  # single quotes keep $ literally, as in the shell
            value = _expand_shell(value, variables, f"{path}:{number}", key)
        variables[key] = value
    return variables


def _expand_shell(value, known, where, key):
    def replace(match):
        name = match.group(1) or match.group(2)
        if name not in known:
            raise CaffeFormatError(f"{where}: {key} refers to ${name}, which is not defined above it")
        return known[name]
    return re.sub(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", replace, value)


def resolve_variables(variables):
    """A {name: str} dict from None, a dict, or a path to a KEY=value file."""
    if variables is None:
        return {}
    if isinstance(variables, (str, os.PathLike)):
        return read_variables(variables)
    if not hasattr(variables, "items"):
        raise TypeError(f"variables must be a dict or a path to a KEY=value file, "
                        f"got {type(variables).__name__}")
    resolved = {}
    for key, value in variables.items():
        if not re.fullmatch(r"[A-Za-z_]\w*", str(key)):
            raise CaffeFormatError(f"variable name {key!r} is not a valid identifier")
        resolved[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    return resolved


def _comment_start(line):
    """Index of a `#` comment in a prototxt line (outside string literals), or len(line)."""
    quote = None
    escaped = False
    for index, char in enumerate(line):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#":
            return index
    return len(line)


def substitute(text, variables, where="<text>"):
    """Replace every `${NAME}` with its value. Placeholders inside `#` comments are replaced when
    known and otherwise left alone; any other unknown one is an error listing all of them."""
    variables = resolve_variables(variables)
    missing = {}
    out_lines = []
    if "${" not in text:
        return text
    for number, line in enumerate(text.split("\n"), 1):
        if "${" not in line:
            out_lines.append(line)
            continue
        code_end = _comment_start(line) if "#" in line else len(line)
        for match in PLACEHOLDER.finditer(line, 0, code_end):
            name = match.group(1)
            if name not in variables:
                lines = missing.setdefault(name, [])
                if number not in lines:
                    lines.append(number)
        out_lines.append(PLACEHOLDER.sub(
            lambda m: variables.get(m.group(1), m.group(0)), line))
    if missing:
        listing = "; ".join(f"${{{name}}} (line{'s' if len(lines) > 1 else ''} "
                            f"{', '.join(map(str, lines))})" for name, lines in sorted(missing.items()))
        raise CaffeFormatError(
            f"{where}: {len(missing)} template variable{'s' if len(missing) > 1 else ''} not set: "
            f"{listing}. Pass variables={{...}} or a KEY=value file "
            f"(segaware-caffe: --set NAME=value / --vars FILE)")
    return "\n".join(out_lines)


# ------------------------------------------------------------------------------------------------
# Parsing with good errors

_LAYER_OPENING = re.compile(r"\blayers?\s*:?\s*$")  # text just before a layer's `{`


def _enclosing_layer(text, offset):
    """(name, type) of the top-level `layer {`/`layers {` block that contains offset, or None."""
    depth = 0
    block_start = None
    index = 0
    length = len(text)
    while index < min(offset, length):
        char = text[index]
        if char == "#":
            newline = text.find("\n", index)
            index = length if newline < 0 else newline
            continue
        if char in "\"'":
            end = index + 1
            while end < length and text[end] != char:
                end += 2 if text[end] == "\\" else 1
            index = end + 1
            continue
        if char == "{":
            if depth == 0:
                opening = _LAYER_OPENING.search(text, max(0, index - 40), index)
                block_start = index if opening else None
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                block_start = None
        index += 1
    if block_start is None:
        return None
    body = _block_body(text, block_start)
    name = re.search(r"\bname\s*:\s*[\"']([^\"']*)[\"']", body)
    kind = re.search(r"\btype\s*:\s*[\"']?([A-Za-z0-9_]+)", body)
    if name is None or kind is None:  # V0: name and type live in the nested `layer { }`
        whole = text[block_start:offset]
        name = name or re.search(r"\bname\s*:\s*[\"']([^\"']*)[\"']", whole)
        kind = kind or re.search(r"\btype\s*:\s*[\"']?([A-Za-z0-9_]+)", whole)
    return (name.group(1) if name else "?", kind.group(1) if kind else "?")


def _block_body(text, open_brace):
    """The text of a brace block at depth 1 only (nested blocks blanked), for name/type lookup."""
    depth = 0
    out = []
    index = open_brace
    while index < len(text):
        char = text[index]
        if char in "\"'":
            end = index + 1
            while end < len(text) and text[end] != char:
                end += 2 if text[end] == "\\" else 1
            if depth == 1:
                out.append(text[index:end + 1])
            index = end + 1
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                break
        elif depth == 1:
            out.append(char)
        index += 1
    return "".join(out)


def _suggest(message):
    """A 'did you mean' hint for unknown fields and enum values, from our schema (or from the
    user's declarations of other forks' fields)."""
    pool = caffe_pb2.DESCRIPTOR.pool
    if "segaware_user." in message:
        from . import extensions
        pool = extensions._pool()
    field = _close_members(message, r'Message type "([\w.]+)" has no field named "(\w+)"',
                           pool.FindMessageTypeByName, "fields", 3, 0.6)
    if field:
        descriptor, names, close = field
        if close:
            return f"did you mean {' or '.join(close)}?"
        return f"fields of {descriptor.name}: {', '.join(sorted(names))}" if len(names) <= 40 else ""
    enum = _close_members(message, r'Enum type "([\w.]+)" has no value named (\w+)',
                          pool.FindEnumTypeByName, "values", 2, 0.5)
    if enum:
        _, names, close = enum
        return (f"did you mean {' or '.join(close)}? " if close else "") + \
            f"allowed: {', '.join(names)}"
    return ""


def _close_members(message, pattern, find, members, n, cutoff):
    """Where `pattern` finds (type name, unknown name) in the error `message`: (descriptor, its
    member names, those close to the unknown one) of the message or enum type that `find` looks
    up, its `members` the fields or values; None when the pattern or the type is not found."""
    unknown = re.search(pattern, message)
    if unknown is None:
        return None
    type_name, name = unknown.groups()
    try:
        descriptor = find(type_name)
    except KeyError:
        return None
    names = [m.name for m in getattr(descriptor, members)]
    return descriptor, names, difflib.get_close_matches(name, names, n=n, cutoff=cutoff)


def _declare_hint(message_name, field, layer_type):
    """How to make an unknown field of another Caffe fork readable."""
    if message_name == "LayerParameter":
        kind = layer_type if layer_type not in ("?", "") else "YourType"
        return (f"if {field} is a parameter of another Caffe fork, declare it with the layer that "
                f"reads it: @segaware_caffe.register_layer({kind!r}, params='optional "
                f"MyParameter {field} = <its field number>; message MyParameter {{ ... }}') "
                f"(README: layers of other forks)")
    return (f"{message_name} of segaware-caffe's schema (segaware fork, BVLC and SSD fields) has "
            f"no {field}; a fork's own fields inside built-in messages cannot be declared, but its "
            f"layer type can be registered with its own *_param (README: layers of other forks)")


def parse_text(text, message, where="<text>"):
    """Parse prototxt text into message; a CaffeFormatError names file, line, column and layer.

    In a NetParameter, LayerParameter fields declared with caffe_proto.extensions (the fields of
    other forks' layers) are read with their declaration and kept in the layer as wire bytes."""
    from . import extensions
    records = []
    parsed = text
    if isinstance(message, caffe_pb2.NetParameter) and extensions.declared_names():
        parsed, records = _cut_declared_fields(text, set(extensions.declared_names()))
    try:
        text_format.Parse(parsed, message, allow_unknown_extension=False)
    except text_format.ParseError as error:
        raise _format_parse_error(error, text, message, where) from None
    for layer_index, name, start, end in records:
        line = text.count("\n", 0, start) + 1
        column = start - (text.rfind("\n", 0, start) + 1)
        block = "\n" * (line - 1) + " " * column + text[start:end]
        try:
            holder = extensions.parse_block(block, name)
        except text_format.ParseError as error:
            raise _format_parse_error(error, text, message, where) from None
        if layer_index >= len(message.layer):
            raise CaffeFormatError(f"{where}:{line}: {name} is outside any layer")
        extensions.attach(message.layer[layer_index], holder)
    return message


def _skip_string(text, index):
    quote = text[index]
    end = index + 1
    while end < len(text) and text[end] != quote:
        end += 2 if text[end] == "\\" else 1
    return end + 1


def _matching(text, index, opening, closing):
    """Index just past the bracket matching text[index] (== opening)."""
    depth = 0
    while index < len(text):
        char = text[index]
        if char in "\"'":
            index = _skip_string(text, index)
            continue
        if char == "#":
            newline = text.find("\n", index)
            index = len(text) if newline < 0 else newline
            continue
        if char == opening:
            depth += 1
        elif char == closing:
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return len(text)


_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def _cut_declared_fields(text, names):
    """(text with the declared fields of top-level `layer` blocks blanked, keeping every line and
    column, [(layer index, field name, start, end)])."""
    records = []
    out = list(text)
    depth = 0
    layer_index = -1
    in_layer = False
    index = 0
    length = len(text)
    expect_value = False
    while index < length:
        char = text[index]
        if char in "\"'":
            index = _skip_string(text, index)
            expect_value = False
            continue
        if char == "#":
            newline = text.find("\n", index)
            index = length if newline < 0 else newline
            continue
        if char == "{":
            if depth == 0:
                opening = _LAYER_OPENING.search(text, max(0, index - 40), index)
                in_layer = bool(opening) and opening.group(0).lstrip().startswith("layer") and \
                    not opening.group(0).lstrip().startswith("layers")
                if in_layer:
                    layer_index += 1
            depth += 1
            index += 1
            expect_value = False
            continue
        if char == "}":
            depth -= 1
            index += 1
            continue
        if char == ":":
            expect_value = True
            index += 1
            continue
        match = _IDENTIFIER.match(text, index) if (char.isalpha() or char == "_") else None
        if match is None:
            if not char.isspace():
                expect_value = False
            index += 1
            continue
        word, end = match.group(0), match.end()
        if depth == 1 and in_layer and not expect_value and word in names and \
                (index == 0 or not (text[index - 1].isalnum() or text[index - 1] == "_")):
            after = end
            while after < length and text[after].isspace():
                after += 1
            if after < length and text[after] in ":{":
                stop = _field_end(text, after)
                records.append((layer_index, word, index, stop))
                for k in range(index, stop):
                    if out[k] != "\n":
                        out[k] = " "
                index = stop
                continue
        expect_value = False
        index = end
    return "".join(out), records


def _field_end(text, index):
    """End of a field's value starting at index (the `:` or `{` after its name)."""
    length = len(text)
    if text[index] == ":":
        index += 1
        while index < length and text[index].isspace():
            index += 1
    if index >= length:
        return length
    if text[index] == "{":
        end = _matching(text, index, "{", "}")
    elif text[index] == "[":
        end = _matching(text, index, "[", "]")
    elif text[index] in "\"'":
        end = _skip_string(text, index)
        while True:                       # adjacent string literals concatenate
            probe = end
            while probe < length and text[probe].isspace():
                probe += 1
            if probe < length and text[probe] in "\"'":
                end = _skip_string(text, probe)
            else:
                break
    else:
        end = index
        while end < length and not (text[end].isspace() or text[end] in ";,}#"):
            end += 1
    if end < length and text[end] in ";,":
        end += 1
    return end


def _format_parse_error(error, text, message, where):
    line_number, column = error.GetLine(), error.GetColumn()
    detail = str(error)
    lines = text.split("\n")
    source_line = lines[line_number - 1] if line_number and 0 < line_number <= len(lines) else ""
    prefix = f"{line_number}:{column} : "
    if detail.startswith(prefix):
        detail = detail[len(prefix):]
    quoted = f"'{source_line}': "
    if detail.startswith(quoted):
        detail = detail[len(quoted):]
    if not line_number:
        return CaffeFormatError(f"{where}: {detail} (parsing a {message.DESCRIPTOR.name})")
    offset = sum(len(line) + 1 for line in lines[:line_number - 1]) + max(column - 1, 0)
    layer = _enclosing_layer(text, offset)
    context = f" in layer {layer[0]!r} ({layer[1]}):" if layer else ""
    hint = _suggest(detail)
    detail = re.sub(r"segaware_user\.d\d+\.", "", detail)   # the declared message's own name
    unknown = re.search(r'Message type "caffe\.(\w+)" has no field named "(\w+)"', detail)
    if unknown and layer:
        hint = (hint + "\n    " if hint else "") + _declare_hint(unknown.group(1), unknown.group(2),
                                                                layer[1])
    caret = " " * (max(column - 1, 0)) + "^"
    parts = [f"{where}:{line_number}:{column}:{context} {detail}",
             f"    {source_line}", f"    {caret}"]
    if hint:
        parts.append(f"    {hint}")
    return CaffeFormatError("\n".join(parts))
