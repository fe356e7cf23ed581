"""Write a Caffe net as a standalone, readable PyTorch module (and, from it, ONNX).

The generated file defines one nn.Module class: one attribute per layer that has parameters or a
stock torch module (attribute name = the Net's layer key, so the tensors of `segaware-caffe
convert` load by name), and a forward that reads like the prototxt, one line per layer, with plain
torch expressions or `kernels` functionals. The code for each layer comes from the emitter
registered for its type (converters.emitters); a layer without one, or a variant its emitter does
not express, becomes an instance of its segaware_caffe layer module built from the same plain
constructor arguments the net used, so every net exports.
"""
import builtins
import contextlib
import dataclasses
import keyword
import os
import re
import types
from dataclasses import dataclass

import numpy as np
import torch

from segaware_caffe import caffe_proto
from segaware_caffe.caffe_proto import caffe_pb2
from segaware_caffe.errors import NetBuildError
from segaware_caffe.layer import layer_class, registered_types
from segaware_caffe.fusion import find_masked_conv_groups
from segaware_caffe.net import WRITES_BOTTOM_DIFFS_ALWAYS

from .caffemodel import blob_attribute_names
from .emitters import Emission, LayerSpec, emitter_for
from .emitters.registry import pair_or_int

# Layer types computed by segmentation-aware kernels (CuPy on CUDA): no ONNX equivalent.
SEGAWARE_TYPES = frozenset({"Im2dist", "Im2parity", "DistLoss", "NormConv", "NormConvMeanfield",
                            "NospConvMeanfield"})
_RESERVED = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {"self", "torch", "nn", "F",
                                                                    "im2dist", "outputs"}


# ---------------------------------------------------------------------------- building the net
@contextlib.contextmanager
def recording_constructor_arguments():
    """While active, every registered layer class keeps the keyword arguments its constructor was
    called with in `module.constructor_kwargs` (from_proto's reading of the prototxt, as plain
    values)."""
    classes = {layer_class(t) for t in registered_types()}
    patched = []

    def wrap(cls, original):
        def __init__(self, *args, **kwargs):
            if "constructor_kwargs" not in self.__dict__:   # the outermost call: the real class
                self.__dict__["constructor_kwargs"] = dict(kwargs) if not args else None
            original(self, *args, **kwargs)
        return __init__

    for cls in classes:
        own = cls.__dict__.get("__init__")
        patched.append((cls, own))
        cls.__init__ = wrap(cls, cls.__init__)
    try:
        yield
    finally:
        for cls, own in patched:
            if own is None:
                del cls.__init__
            else:
                cls.__init__ = own


def override_input_shapes(net_param, shapes):
    """A copy of `net_param` with the declared shapes of the given inputs replaced."""
    net_param = caffe_pb2.NetParameter.FromString(net_param.SerializeToString())
    remaining = dict(shapes)
    for i, name in enumerate(net_param.input):
        if name in remaining:
            dims = list(remaining.pop(name))
            if len(net_param.input_shape):
                del net_param.input_shape[i].dim[:]
                net_param.input_shape[i].dim.extend(dims)
            else:
                net_param.input_dim[4 * i:4 * i + 4] = dims
    for layer in net_param.layer:
        if layer.type != "Input":
            continue
        for j, top in enumerate(layer.top):
            if top in remaining:
                dims = list(remaining.pop(top))
                if len(layer.input_param.shape) == 1 and len(layer.top) > 1:
                    raise NetBuildError(f"{layer.name} (Input): its tops share one shape; give "
                                        f"every top a shape to override {top!r}")
                del layer.input_param.shape[j].dim[:]
                layer.input_param.shape[j].dim.extend(dims)
    if remaining:
        raise NetBuildError(f"net {net_param.name!r} has no input named {', '.join(remaining)}")
    return net_param


def build_net(prototxt, *, variables=None, phase="test", stages=(), level=0, input_shapes=None):
    """The Net to export (no fusion), with every layer's constructor arguments recorded."""
    from segaware_caffe import Net
    net_param = prototxt if isinstance(prototxt, caffe_pb2.NetParameter) else \
        caffe_proto.read_net(prototxt, variables=variables)
    if input_shapes:
        net_param = override_input_shapes(net_param, input_shapes)
    with recording_constructor_arguments():
        return Net(net_param, phase=phase, stages=stages, level=level, fuse=False)


# ---------------------------------------------------------------------------- code generation
class _Names:
    """Python identifiers for blob names: stable, unique, never a keyword or a reserved name."""

    def __init__(self, reserved):
        self.reserved = set(reserved)
        self.by_blob = {}
        self.taken = set()

    def __call__(self, blob):
        if blob not in self.by_blob:
            name = re.sub(r"\W", "_", blob) or "blob"
            if name[0].isdigit() or name in self.reserved:
                name = "_" + name if name[0].isdigit() else name + "_"
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
    """`self.<key> = LayerClass(**constructor arguments)`, checked to rebuild the same state."""
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
    return Emission(f"self.{spec.key}({', '.join(spec.bottoms)})", module=f"{cls.__name__}({arguments})",
                    imports=tuple(sorted(imports)), plain_torch=spec.type not in SEGAWARE_TYPES)


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


def python_source(net, *, class_name=None, source_note="", default_weights=None, fuse=True):
    """Generate the module source for a Net built by `build_net`. Returns a PythonExport.
    fuse: write each segmentation-aware convolution chain (Im2col, Tile, PROD, Convolution with
    bottom_is_im2col) as one kernels.masked_conv2d call, as sc.Net runs it."""
    used_classes = {layer_class(t).__name__ for t in registered_types()}
    class_name = class_name or class_name_for(net.name)
    if class_name in used_classes:  # a net named like a layer class ("reshape") must not shadow it
        class_name += "Net"
    names = _Names(_RESERVED | used_classes | {class_name, "load", "load_weights", "zero_first_element"})
    imports = {"import os", "import torch", "from torch import nn"}
    init_lines, forward_lines, layers = [], [], []
    arguments = [names(b) for b in net.input_names]
    zeroed = net._zeroed_by_forward          # see segaware_caffe.net.zero_first_element
    forward_lines += [f"{names(b)} = zero_first_element({names(b)})  # Caffe's Net::Forward"
                      for b in net.input_names if b in zeroed]
    fused = {g.anchor: (g, op) for g, op in find_masked_conv_groups(net)} if fuse else {}
    folded = {k for g, _ in fused.values() for k in g.record_keys} - {g.key for g, _ in fused.values()}
    for record in net.records:
        if record.type == "Input":
            continue
        if record.key in folded:   # written by the fused call at its convolution
            layers.append(ExportedLayer(record.name, record.type, record.key, "fused", False))
            continue
        if "constructor_kwargs" not in record.module.__dict__:
            raise NetBuildError(f"{record.name} ({record.type}): the net was not built by "
                                f"converters.python_export.build_net (no constructor arguments)")
        kwargs = record.module.__dict__["constructor_kwargs"]
        bottoms = [names(b) for b in record.bottoms]
        if not net.force_backward and record.type not in WRITES_BOTTOM_DIFFS_ALWAYS:
            # propagate_down: false, as sc.Net does it: that bottom gets no gradient
            keep = list(record.param.propagate_down) or [True] * len(bottoms)
            bottoms = [b if k else f"{b}.detach()" for b, k in zip(bottoms, keep)]
        spec = LayerSpec(name=record.name, type=record.type, key=record.key, kwargs=kwargs,
                         module=record.module, bottoms=bottoms,
                         bottom_shapes=[net.blob_shapes[b] for b in record.bottoms],
                         num_tops=len(record.tops), phase=net.phase)
        emitter = emitter_for(record.type)
        emission = emitter(spec) if emitter is not None and kwargs is not None else None
        how = "emitter"
        if emission is None:
            emission, how = fallback_emission(spec), "module"
        elif emission.module is None and blob_attribute_names(record.module):
            raise NetBuildError(f"{record.name} ({record.type}): the emitter wrote inline code for "
                                f"a layer with parameters")
        if record.name in fused:
            emission, how = _fused_emission(*fused[record.name], record, emission, names), "fused"
        imports.update(emission.imports)
        if emission.module is not None:
            init_lines.append(f"self.{record.key} = {emission.module}")
        tops = [names(t) for t in record.tops]
        comment = f"  # {record.name} ({record.type})" if emission.module is None else ""
        if emission.note:
            comment = f"  # {record.name} ({record.type}): {emission.note}"
        if not tops or not emission.expression:
            forward_lines.append(comment.strip() or f"# {record.name} ({record.type})")
        else:
            forward_lines.append(f"{', '.join(tops)} = {emission.expression}{comment}")
        forward_lines += [f"{tops[i]} = zero_first_element({tops[i]})  # Caffe's Net::Forward"
                          for i in range(len(tops)) if (record.name, i) in zeroed]
        layers.append(ExportedLayer(record.name, record.type, record.key, how, emission.plain_torch))
    outputs = list(net.outputs)
    returned = ", ".join(f"{o!r}: {names(o)}" for o in outputs)
    helpers = [_ZERO_FIRST_ELEMENT] if zeroed else []
    source = _render(net, class_name, imports, init_lines, forward_lines, arguments, returned,
                     source_note, default_weights, helpers)
    return PythonExport(source, class_name, layers, list(net.input_names), outputs)


def _fused_emission(group, op, record, conv_emission, names):
    """The convolution's module stays (its parameters keep their names); its forward line reads
    the im2col input and the mask directly through kernels.masked_conv2d."""
    weight, bias = (blob_attribute_names(record.module) + [None])[:2]
    arguments = [names(group.x_blob), f"self.{record.key}.{weight}",
                 f"self.{record.key}.{bias}" if bias else "None", f"mask={names(group.mask_blob)}",
                 f"kernel_size={pair_or_int(op.kernel_size)}", f"pad={pair_or_int(op.pad)}",
                 f"stride={pair_or_int(op.stride)}", f"dilation={pair_or_int(op.dilation)}",
                 f"group={op.group}"]
    return Emission(f"masked_conv2d({', '.join(arguments)})", module=conv_emission.module,
                    imports=tuple(conv_emission.imports) + ("from segaware_caffe.kernels import masked_conv2d",),
                    plain_torch=False, note="fused with its Im2col, Tile and PROD layers")


# Plain-torch twin of segaware_caffe.net.zero_first_element for exported modules
_ZERO_FIRST_ELEMENT = '''def zero_first_element(x):
    """The original's Net::Forward sets element 0 of every net output to 0 before the layers run;
    no layer writes this one, so the 0 stays (the gradient passes unchanged)."""
    first = torch.zeros_like(x, dtype=torch.bool)
    first.view(-1)[0] = True
    return torch.where(first, x - x.detach(), x)'''


def _render(net, class_name, imports, init_lines, forward_lines, arguments, returned, source_note,
            default_weights, helpers=()):
    plain = sorted(i for i in imports if i.startswith("import "))
    froms = sorted(i for i in imports if i.startswith("from ") and not i.startswith(("from segaware_caffe.kernels",
                                                                                      "from segaware_caffe")))
    ours = sorted(i for i in imports if i.startswith(("from segaware_caffe.kernels", "from segaware_caffe")))
    shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in net.input_shapes.items())
    doc = [f'"""PyTorch module for the Caffe net {net.name!r}, written by `segaware-caffe export`.', ""]
    if source_note:
        doc.append(source_note)
    doc += [f"Phase {net.phase}. Inputs (as built): {shapes or 'none'}.",
            f"forward() returns {{blob name: tensor}} for {', '.join(net.outputs)}.",
            "Weights: load(\"model.safetensors\") or load_weights(model, path), with the tensors of",
            "`segaware-caffe convert NET.prototxt WEIGHTS.caffemodel -o model.safetensors`.",
            '"""']
    init_body = ["super().__init__()"] + init_lines
    out = doc + [""] + plain + froms + ([""] + ours if ours else []) + ["", ""]
    for helper in helpers:
        out += helper.splitlines() + ["", ""]
    out.append(f"class {class_name}(nn.Module):")
    out.append("    def __init__(self):")
    out += [f"        {line}" for line in init_body]
    out.append("")
    out.append(f"    def forward(self, {', '.join(arguments)}):" if arguments else "    def forward(self):")
    out += [f"        {line}" for line in forward_lines]
    out.append(f"        return {{{returned}}}")
    out += ["", ""]
    if default_weights is None or os.path.isabs(default_weights):
        weights_default = repr(default_weights and str(default_weights))
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
    """The module in eval mode, with weights when a path is given (default: the weights written
    with this file, if any)."""
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


# ---------------------------------------------------------------------------- ONNX
class _TupleOutputs(torch.nn.Module):
    """ONNX wants a tuple of outputs; the exported module returns a dict."""

    def __init__(self, model, outputs):
        super().__init__()
        self.model, self.outputs = model, list(outputs)

    def forward(self, *inputs):
        result = self.model(*inputs)
        return tuple(result[o] for o in self.outputs)


def export_onnx(net, export, path, *, opset=17, overwrite=False):
    """Write `export` (from python_source(net)) as ONNX, with the Net's parameters and its input
    shapes. Refuses, naming them, when layers use segmentation-aware kernels."""
    import warnings
    if any(layer.how == "fused" for layer in export.layers):   # ONNX has no masked_conv2d
        export = python_source(net, class_name=export.class_name, fuse=False)
    blocked = export.not_plain_torch
    if blocked:
        raise NotImplementedError(
            f"cannot export net {net.name!r} to ONNX: {len(blocked)} layer(s) run segmentation-aware "
            f"kernels that ONNX has no operator for: "
            + ", ".join(f"{layer.name} ({layer.type})" for layer in blocked))
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path}: file exists; pass --force (overwrite=True) to replace it")
    model = _TupleOutputs(instantiate(export, net), export.outputs)
    example = tuple(torch.zeros(shape) for shape in net.input_shapes.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, example, path, input_names=list(export.inputs),
                              output_names=list(export.outputs), opset_version=opset,
                              dynamo=False)
        except Exception as e:  # the tracer's message plus the layers most likely responsible
            modules = [f"{layer.name} ({layer.type})" for layer in export.layers if layer.how == "module"]
            raise NotImplementedError(
                f"ONNX export of net {net.name!r} failed: {e}. Layers exported as segaware_caffe "
                f"modules: {', '.join(modules) or 'none'}") from None
    return path


