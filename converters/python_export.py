"""Write a Caffe net as a standalone, readable PyTorch module (onnx_export traces it to ONNX).

The source is generated from the net's fx graph (`Net.graph_module`, the interpreter Net.forward
runs), one emitter per kind of node, so the module computes what sc.Net computes:

* a placeholder is a forward argument;
* a layer's `call_module` is the code its type's emitter writes (converters.emitters: plain torch
  expressions, stock torch modules, small plain-torch helper definitions written into the module
  -- CaffeBatchNorm, CaffeScale, ... with the layers' parameter names -- or `kernels`
  functionals), so that a net of standard layers needs only torch; or, for a layer without an
  emitter or a variant its emitter does not express, an instance of its segaware_caffe layer
  class built from the layer's constructor configuration (`layer.config`);
* a fused segmentation-aware convolution is one `masked_conv2d` call;
* the net's helper nodes keep their rules: `.detach()` (no diff computed there),
  `refuse_gradient` (the original cannot backpropagate there), `track_grad` (force_backward
  diffs of data layers) and `zero_first_element` (Net::Forward's zeroing of outputs no layer
  writes), written out in plain torch;
* `getitem` nodes are the names a multi-top line unpacks into.

Attribute names are the Net's layer keys, so the tensors of `segaware-caffe convert` load by name.
Everything taken from the files (net, layer and blob names, strings in parameters) reaches the
source only as a sanitised identifier or a repr()'d literal, never as code.
"""
import builtins
import dataclasses
import inspect
import keyword
import operator
import os
import re
import types
from dataclasses import dataclass

import numpy as np
import torch

from segaware_caffe.errors import NetBuildError, UnsupportedError
from segaware_caffe.files import refuse_existing
from segaware_caffe.layer import layer_class, registered_types
from segaware_caffe.net import _RefuseGradient, refuse_gradient, track_grad, zero_first_element
from segaware_caffe.weights import blob_attributes

from .caffemodel import build_net  # noqa: F401  (the net export builds, re-exported)
from .emitters import Emission, LayerSpec, emitter_for, helper_names, helper_source
from .emitters.registry import attribute_expression, pair_or_int

_HELPER_NAMES = ("zero_first_element", "refuse_gradient", "_RefuseGradient", "track_grad",
                 "masked_conv2d", "im2dist", "load", "load_weights", "DEFAULT_WEIGHTS")
_RESERVED = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {
    "self", "torch", "nn", "F", "os", "outputs"} | frozenset(_HELPER_NAMES)


# ---------------------------------------------------------------------------- safe text
def python_identifier(text, fallback="blob"):
    """An ASCII Python identifier made from `text` (other characters become `_`)."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", text) or fallback
    return "_" + name if name[0].isdigit() else name


def comment(text):
    """`text` safe for the rest of a `#` line: no line breaks, control characters escaped."""
    return repr(str(text))[1:-1]


def docstring_text(text):
    """`text` safe inside a triple-quoted docstring (that ends on a line of its own): backslashes
    escaped, a double quote escaped wherever another follows it (so no run of three remains),
    control characters other than newlines written as escapes."""
    text = re.sub(r'"(?=")', r'\\"', str(text).replace("\\", "\\\\"))
    return "".join(c if c == "\n" or c.isprintable() else repr(c)[1:-1] for c in text)


class _Names:
    """Python identifiers for blob names: stable, unique, never a keyword or a reserved name."""

    def __init__(self, reserved):
        self.reserved = set(reserved)
        self.by_blob = {}
        self.taken = set()

    def __call__(self, blob):
        if blob not in self.by_blob:
            name = python_identifier(blob)
            if name in self.reserved:
                name += "_"
            base, i = name, 1
            while name in self.taken:
                i += 1
                name = f"{base}_{i}"
            self.by_blob[blob] = name
            self.taken.add(name)
        return self.by_blob[blob]


def class_name_for(net_name):
    words = re.findall(r"[A-Za-z0-9]+", net_name or "")
    name = "".join(w[:1].upper() + w[1:] for w in words) or "CaffeNet"
    return name if name[0].isalpha() else "Net" + name


def value_source(value, imports, where):
    """Exact Python source for a constructor argument (floats in full precision)."""
    if isinstance(value, (bool, type(None), str, int)):
        return repr(value)
    if isinstance(value, np.integer):
        return repr(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return repr(value) if np.isfinite(value) else f"float({str(value)!r})"
    if isinstance(value, (tuple, torch.Size)):
        items = [value_source(v, imports, where) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, list):
        return "[" + ", ".join(value_source(v, imports, where) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{value_source(k, imports, where)}: {value_source(v, imports, where)}"
                               for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        imports.add(f"from {cls.__module__} import {cls.__name__}")
        fields = ", ".join(f"{f.name}={value_source(getattr(value, f.name), imports, where)}"
                           for f in dataclasses.fields(value))
        return f"{cls.__name__}({fields})"
    raise NetBuildError(f"{where}: constructor argument of type {type(value).__name__} cannot be "
                        f"written as Python source")



def _state_shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def fallback_emission(spec):
    """`self.<key> = LayerClass(**configuration)`, checked to rebuild the same state."""
    where = f"{spec.name} ({spec.type})"
    cls = type(spec.module)
    if spec.kwargs is None:
        raise NetBuildError(f"{where}: {cls.__name__} was constructed with positional arguments; "
                            f"export needs keyword-only constructor arguments")
    imports = {f"from {cls.__module__} import {cls.__name__}"}
    arguments = ", ".join(f"{k}={value_source(v, imports, where)}" for k, v in spec.kwargs.items())
    rebuilt = cls(**spec.kwargs)
    if _state_shapes(rebuilt) != _state_shapes(spec.module):
        raise NetBuildError(f"{where}: {cls.__name__}(**constructor arguments) does not rebuild the "
                            f"layer's parameters and buffers (got {_state_shapes(rebuilt)}, the "
                            f"net's layer has {_state_shapes(spec.module)})")
    return Emission(f"{spec.attr}({', '.join(spec.bottoms)})", module=f"{cls.__name__}({arguments})",
                    imports=tuple(sorted(imports)), plain_torch=not cls.USES_SEGAWARE_KERNELS)


@dataclass
class ExportedLayer:
    name: str
    type: str
    key: str
    how: str                  # "emitter", "module" (the segaware_caffe layer class) or "fused"
    plain_torch: bool


@dataclass
class PythonExport:
    source: str
    class_name: str
    layers: list              # [ExportedLayer], Caffe order (Input layers left out)
    inputs: list              # Caffe input blob names, forward argument order
    outputs: list             # Caffe output blob names (keys of the returned dict)

    @property
    def not_plain_torch(self):
        return [layer for layer in self.layers if not layer.plain_torch]


# ---------------------------------------------------------------------------- node emitters
class _Writer:
    """Walks the graph once; `value[node]` is the Python expression of a node's value."""

    def __init__(self, net, names):
        self.net, self.names = net, names
        self.value = {}
        self.init_lines, self.forward_lines = [], []
        self.imports = {"import os", "import torch", "from torch import nn"}
        self.helpers = {}          # function name -> source of its plain-torch twin
        self.layers = []
        self.arguments = []
        self.inputs = []           # Caffe names of the forward arguments

    def line(self, text, note=""):
        self.forward_lines.append(text + (f"  # {comment(note)}" if note else ""))

    def placeholder(self, node):
        self.value[node] = self.names(node.meta["blob"])
        self.arguments.append(self.value[node])
        self.inputs.append(node.meta["blob"])

    def get_attr(self, node):
        # a learnable blob, read by refuse_gradient: the exported module keeps the Net's layer
        # keys and blob attribute names
        key, attribute = node.target.removeprefix("layers.").rsplit(".", 1)
        self.value[node] = f"{attribute_expression(key)}.{attribute}"

    def call_function(self, node):
        emit = FUNCTION_EMITTERS.get(node.target)
        if emit is None:
            raise NetBuildError(f"net {self.net.name!r}: no exporter for graph function "
                                f"{getattr(node.target, '__name__', node.target)!r}")
        emit(self, node)

    def call_module(self, node):
        record = self.net.records[node.meta["record"]]
        bottoms = [self.value[a] for a in node.args]
        if node.target.startswith("fused."):
            group = next(g for g in self.net.fused_groups if f"fused.{g.key}" == node.target)
            emission = self._fused(group, self.net.fused[group.key], record)
            how = "fused"
            for r in self.net.records:
                if r.key in group.record_keys and r is not record:
                    self.layers.append(ExportedLayer(r.name, r.type, r.key, "fused", False))
        else:
            spec = LayerSpec(name=record.name, type=record.type, key=record.key,
                             kwargs=record.module.config, module=record.module, bottoms=bottoms,
                             bottom_shapes=[self.net.blob_shapes[b] for b in record.bottoms],
                             num_tops=len(record.tops), phase=self.net.phase)
            emitter = emitter_for(record.type)
            emission = emitter(spec) if emitter is not None and spec.kwargs is not None else None
            how = "emitter"
            if emission is None:
                emission, how = fallback_emission(spec), "module"
            elif emission.module is None and blob_attributes(record.module):
                raise NetBuildError(f"{record.name} ({record.type}): the emitter wrote inline code "
                                    f"for a layer with parameters")
        self.imports.update(emission.imports)
        for name in emission.helpers:
            self.helpers[name] = helper_source(name)
        if emission.module is not None:
            target = attribute_expression(record.key)
            self.init_lines.append(f"{target} = {emission.module}" if target.startswith("self.")
                                   else f"self.add_module({record.key!r}, {emission.module})")
        tops = [self.names(t) for t in (record.tops if not node.target.startswith("fused.")
                                        else [node.meta["blob"]])]
        note = f"{record.name} ({record.type})" + (f": {emission.note}" if emission.note else "")
        if not emission.expression:
            self.line(f"# {comment(note)}")
        elif not tops:              # a layer without tops runs for its effects (file writers)
            self.line(emission.expression, note)
        else:
            self.line(f"{', '.join(tops)} = {emission.expression}",
                      note if emission.module is None or emission.note else "")
        self.value[node] = tops[0] if len(tops) == 1 else tuple(tops)
        self.layers.append(ExportedLayer(record.name, record.type, record.key, how,
                                         emission.plain_torch))

    def _fused(self, group, op, record):
        """The convolution's module stays (its parameters keep their names); its forward line
        reads the im2col input and the mask directly through kernels.masked_conv2d."""
        spec = LayerSpec(name=record.name, type=record.type, key=record.key,
                         kwargs=record.module.config, module=record.module, bottoms=[],
                         bottom_shapes=[], num_tops=1, phase=self.net.phase)
        emitter = emitter_for(record.type)
        conv = (emitter(spec) if emitter is not None and spec.kwargs is not None else None) \
            or fallback_emission(spec)
        weight, bias = (blob_attributes(record.module) + [None])[:2]
        arguments = [self.value_of_blob(group.x_blob), f"{spec.attr}.{weight}",
                     f"{spec.attr}.{bias}" if bias else "None",
                     f"mask={self.value_of_blob(group.mask_blob)}",
                     f"kernel_size={pair_or_int(op.kernel_size)}", f"pad={pair_or_int(op.pad)}",
                     f"stride={pair_or_int(op.stride)}", f"dilation={pair_or_int(op.dilation)}",
                     f"group={op.group}"]
        return Emission(f"masked_conv2d({', '.join(arguments)})", module=conv.module,
                        imports=tuple(conv.imports) + ("from segaware_caffe.kernels import masked_conv2d",),
                        plain_torch=False, note="fused with its Im2col, Tile and PROD layers")

    def value_of_blob(self, blob):
        return self.names(blob)

    def output(self, node):
        self.returned = ", ".join(f"{name!r}: {self.value[n]}" for name, n in node.args[0].items())


def _emit_getitem(writer, node):
    source, index = node.args
    writer.value[node] = writer.value[source][index]


def _emit_detach(writer, node):
    writer.value[node] = f"{writer.value[node.args[0]]}.detach()"


def _emit_refuse(writer, node):
    writer.helpers["refuse_gradient"] = _REFUSE_GRADIENT
    top, refusals = node.args
    pairs = "".join(f"({writer.value[bottom]}, {message!r}), " for bottom, message in refusals)
    name = writer.names(node.meta["blob"])
    writer.line(f"{name} = refuse_gradient({writer.value[top]}, ({pairs.rstrip()}))",
                "the original cannot backpropagate there")
    writer.value[node] = name


def _emit_zero(writer, node):
    writer.helpers["zero_first_element"] = _ZERO_FIRST_ELEMENT
    name = writer.names(node.meta["blob"])
    writer.line(f"{name} = zero_first_element({writer.value[node.args[0]]})", "Caffe's Net::Forward")
    writer.value[node] = name


def _emit_track(writer, node):
    writer.helpers["track_grad"] = _TRACK_GRAD
    name = writer.names(node.meta["blob"])
    writer.line(f"{name} = track_grad({writer.value[node.args[0]]})", "force_backward")
    writer.value[node] = name


FUNCTION_EMITTERS = {operator.getitem: _emit_getitem, torch.detach: _emit_detach,
                     refuse_gradient: _emit_refuse, zero_first_element: _emit_zero,
                     track_grad: _emit_track}


def python_source(net, *, class_name=None, source_note="", default_weights=None, fuse=True):
    """Generate the module source of a Net from its graph. Returns a PythonExport.
    fuse: write each segmentation-aware convolution chain (Im2col, Tile, PROD, Convolution with
    bottom_is_im2col) as one kernels.masked_conv2d call, as sc.Net runs it."""
    used_classes = {layer_class(t).__name__ for t in registered_types()}
    if not (class_name and class_name.isidentifier() and class_name.isascii()
            and not keyword.iskeyword(class_name)):
        class_name = class_name_for(class_name or net.name)
    if class_name in used_classes:  # a net named like a layer class ("reshape") must not shadow it
        class_name += "Net"
    names = _Names(_RESERVED | used_classes | helper_names() | {class_name})
    writer = _Writer(net, names)
    unused = unused_inputs(net)
    outputs = [o for o in net.outputs if o not in unused]
    graph = net.graph_module(outputs, fuse=fuse).graph
    live = _live_nodes(net, graph)
    for node in graph.nodes:
        if node in live:
            getattr(writer, node.op)(node)
    source = _render(net, class_name, writer, source_note, default_weights, unused)
    return PythonExport(source, class_name, writer.layers, list(writer.inputs), outputs)


def unused_inputs(net):
    """Net inputs that no layer reads but Silence (the vgg deploy net's `label`): the exported
    module leaves them out of its arguments and outputs."""
    read = {b for r in net.records if r.type != "Silence" for b in r.bottoms}
    return [name for name in net.input_names if name not in read]


def _live_nodes(net, graph):
    """The nodes the exported forward needs: the output, every layer but Silence (layers without
    tops run for their effects), and what they read."""
    live = set()
    for node in reversed(graph.nodes):
        if node.op == "output" or any(user in live for user in node.users) or (
                node.op == "call_module" and net.records[node.meta["record"]].type != "Silence"):
            live.add(node)
    return live


# segaware_caffe.net's graph helpers as exported modules define them, so that they need only
# torch: a plain-torch twin of zero_first_element (a tracer records torch.where, not the
# library's autograd.Function, and loses an in-place write into a fresh mask); refuse_gradient
# and track_grad are the library's own source
_ZERO_FIRST_ELEMENT = '''def zero_first_element(x):
    """The original's Net::Forward sets element 0 of every net output to 0 before the layers run;
    no layer writes this one, so the 0 stays (the gradient passes unchanged)."""
    first = torch.arange(x.numel(), device=x.device).reshape(x.shape) == 0
    return torch.where(first, x - x.detach(), x)'''

_REFUSE_GRADIENT = inspect.getsource(_RefuseGradient) + "\n\n" + inspect.getsource(refuse_gradient)
_TRACK_GRAD = inspect.getsource(track_grad)


def _render(net, class_name, writer, source_note, default_weights, unused=()):
    imports = writer.imports
    ours = sorted(i for i in imports if i.startswith("from segaware_caffe"))
    plain = sorted(i for i in imports if i.startswith("import "))
    froms = sorted(i for i in imports if i.startswith("from ") and i not in ours)
    shapes = ", ".join(f"{name!r} {tuple(net.input_shapes[name])}" for name in writer.inputs)
    doc = [f"PyTorch module for the Caffe net {net.name!r}, written by `segaware-caffe export`.", ""]
    if source_note:
        doc.append(source_note)
    outputs = [o for o in net.outputs if o not in unused]
    doc += [f"Phase {net.phase}. Inputs (as built; other sizes run where the layers allow them): "
            f"{shapes or 'none'}."]
    if unused:
        doc.append(f"Inputs no layer reads are left out: {', '.join(map(repr, unused))}.")
    doc += [f"forward() returns {{blob name: tensor}} for {', '.join(map(repr, outputs))}.",
            "Weights: load(\"model.safetensors\") or load_weights(model, path), with the tensors of",
            "`segaware-caffe convert NET.prototxt WEIGHTS.caffemodel -o model.safetensors`."]
    out = ['"""' + docstring_text("\n".join(doc)) + '\n"""', ""]
    out += plain + froms + ([""] + ours if ours else []) + ["", ""]
    for name in sorted(writer.helpers):
        out += writer.helpers[name].splitlines() + ["", ""]
    out.append(f"class {class_name}(nn.Module):")
    out.append("    def __init__(self):")
    out += [f"        {line}" for line in ["super().__init__()"] + writer.init_lines]
    out.append("")
    out.append(f"    def forward(self, {', '.join(writer.arguments)}):" if writer.arguments
               else "    def forward(self):")
    out += [f"        {line}" for line in writer.forward_lines]
    out.append(f"        return {{{writer.returned}}}")
    out += ["", ""]
    if default_weights is None or os.path.isabs(default_weights):
        # a path of the machine that exported would not hold elsewhere: the caller names the file
        weights_default = "None"
    else:  # a file next to the module
        weights_default = f"os.path.join(os.path.dirname(os.path.abspath(__file__)), {str(default_weights)!r})"
    out.append(f"DEFAULT_WEIGHTS = {weights_default}")
    out += ["", ""]
    out += _LOADERS.format(class_name=class_name).splitlines()
    return "\n".join(out) + "\n"


_LOADERS = '''def load_weights(model, path):
    """Copy named tensors (.safetensors, or a .pt state_dict) into `model`; every parameter must
    be given."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    parameters = dict(model.named_parameters())
    missing = [k for k in missing if k in parameters]
    if missing or unexpected:
        raise KeyError(f"{{path}}: missing {{missing}}, unexpected {{unexpected}}")
    return model


def load(weights=DEFAULT_WEIGHTS, device="cpu"):
    """The module in eval mode, with the weights of the file `weights` (.safetensors or .pt;
    default: the file written next to this module by the export, if there was one); None gives
    torch's default initialisation."""
    model = {class_name}()
    if weights is not None and os.path.exists(weights):
        load_weights(model, weights)
    elif weights is not None:
        raise FileNotFoundError(weights)
    return model.eval().to(device)'''


def load_source(source, name="exported_caffe_net", filename="<segaware-caffe export>"):
    """Execute generated source as a module object (what `import model` would give)."""
    module = types.ModuleType(name)
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def instantiate(export, net):
    """An instance of the exported class holding the Net's current parameters."""
    module = load_source(export.source)
    model = getattr(module, export.class_name)()
    state = {k[len("layers."):]: v for k, v in net.state_dict().items() if k.startswith("layers.")}
    model.load_state_dict(state, strict=False)
    return model.eval()
