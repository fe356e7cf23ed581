"""Write a Caffe net as ONNX: the module `export --python` writes, traced by torch.onnx.export
(the TorchScript-based exporter, which needs nothing beyond torch and onnx).

The generated module runs the segmentation-aware ops through `segaware_caffe.kernels` (custom
ops, which ONNX has no operator for). For export, each of them is swapped for its twin in
`onnx_ops`, built from standard ONNX operators:

* functions the generated code calls (`im2dist`, the fused `masked_conv2d`, ...) and helpers it
  defines (`zero_first_element`) are rebound in the loaded module's namespace;
* layer modules the code instantiates (Im2parity, DistLoss, NormConv, NormConvMeanfield,
  NospConvMeanfield, DomainTransform, and a few standard layers whose code a tracer records
  wrongly or not at all: ArgMax, AVE Pooling, SPP, BiasChannel, SoftmaxWithLoss) are wrapped in
  an `OnnxForm` that computes the layer's forward from its settings and parameters.

Refused before anything is traced, all of them named at once: layers with no ONNX form
(DenseCRF builds a permutohedral lattice whose size depends on the data; UniqueLabel and
AdaptiveBiasChannel select from the data in Python), layers that read their tops from files or
arrays on every pass (data layers: ONNX takes those as inputs), layers with effects beyond their
tops (file writers, user Python layers, state kept between passes), and random draws a trace
would freeze (DummyData with random fillers, TRAIN-phase Dropout and STOCHASTIC pooling).

A trace records what the code did for one input; where a layer decides in Python from the data,
the graph is silently wrong for other inputs. So the graph is run in onnxruntime against the Net
before the file is written (`verify_onnx`), and a mismatch is an error.
"""
import contextlib
import io
import os
import types
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from segaware_caffe import kernels
from segaware_caffe.errors import UnsupportedError
from segaware_caffe.files import API_HINT, atomic_write, refuse_existing
from segaware_caffe.kernels import meanfield as _meanfield
from segaware_caffe.kernels import norm_conv as _norm_conv
from segaware_caffe.layer import add_to_registry

from . import onnx_ops
from .python_export import load_source, python_source

__all__ = ["OnnxExport", "OnnxForm", "export_onnx", "onnx_form", "onnx_model", "onnx_refusals",
           "verify_onnx"]

DEFAULT_OPSET = 17

# kernels functions the generated source may call -> their standard-operator twins
PORTABLE_FUNCTIONS = {
    kernels.im2dist: onnx_ops.im2dist,
    kernels.im2parity: onnx_ops.im2parity,
    kernels.dist_loss: onnx_ops.dist_loss,
    kernels.masked_conv2d: onnx_ops.masked_conv2d,
    _norm_conv.norm_conv: onnx_ops.norm_conv,
    _meanfield.normconv_meanfield: onnx_ops.normconv_meanfield,
}

# helpers the generated module defines -> their twins (an exact 0, where the module's keeps the
# gradient path)
PORTABLE_HELPERS = {"zero_first_element": onnx_ops.zero_first_element}

# layer types that have no ONNX form, and why
NO_ONNX_FORM = {
    "DenseCRF": "its permutohedral lattice (a hash table of vertices) is built from the data on "
                "every pass, with a size that depends on the data; ONNX has no such operator",
    "AdaptiveBiasChannel": "it chooses the biased channels from the labels each image holds, "
                           "shuffled with its own copy of C's rand() sequence (state carried "
                           "from one pass to the next)",
    "UniqueLabel": "its top lists the distinct labels of each image, a selection whose size "
                   "depends on the data (the original aborts when it exceeds max_labels)",
}

# the exported graph against the Net (verify_onnx): max error relative to max|ref| per output
VERIFY_MAXREL = 1e-4

# fillers that give the same values on every pass (a DummyData top is then a constant)
DETERMINISTIC_FILLERS = frozenset({"constant", "xy", "bilinear"})
# data-less layers that are no file or array reader
_SOURCES_OK = frozenset({"Input", "DummyData", "Parameter"})

_FORMS = {}


def onnx_form(*type_names):
    """Decorator: register `fn(layer, *bottoms) -> top(s)`, the forward of a Caffe layer type in
    standard operators (onnx_ops), reading the built layer's settings and parameters."""
    def wrap(fn):
        add_to_registry(_FORMS, type_names, fn, "an ONNX form for layer type")
        return fn
    return wrap


class OnnxForm(nn.Module):
    """A layer module whose forward is its ONNX form (the layer, with its parameters, inside)."""

    def __init__(self, layer, form):
        super().__init__()
        self.layer = layer
        self.form = form

    def forward(self, *bottoms):
        return self.form(self.layer, *bottoms)

    def __getattr__(self, name):
        # the generated forward also reads the layer's blobs by name (refuse_gradient)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


# ---------------------------------------------------------------------------- forms
@onnx_form("Im2dist")
def _im2dist(layer, x):
    return onnx_ops.im2dist(x, layer.kernel, layer.pad, layer.stride, layer.dilation,
                            norm=layer.norm, remove_center=layer.remove_center,
                            remove_bounds=layer.remove_bounds)


@onnx_form("Im2parity")
def _im2parity(layer, labels):
    return onnx_ops.im2parity(labels, layer.kernel, layer.pad, layer.stride, layer.dilation,
                              ignore_label=layer.ignore_label)


@onnx_form("DistLoss")
def _dist_loss(layer, dist, parity):
    return onnx_ops.dist_loss(dist, parity, layer.alpha, layer.beta,
                              ignore_label=layer.ignore_label)


@onnx_form("NormConv")
def _norm_conv_form(layer, x, emb):
    return onnx_ops.norm_conv(x, emb, layer.weight, layer.bias, layer.scale,
                              kernel_size=layer.kernel, pad=layer.pad, stride=layer.stride,
                              dilation=layer.dilation, group=layer.group, norm=layer.norm,
                              remove_center=layer.remove_center,
                              remove_bounds=layer.remove_bounds, scale_term=layer.scale_term)


@onnx_form("NormConvMeanfield")
def _normconv_meanfield(layer, unary, q0, feat_bilateral, feat_spatial):
    return onnx_ops.normconv_meanfield(unary, q0, feat_bilateral, feat_spatial,
                                       layer.spatial_weight, layer.bilateral_weight,
                                       layer.compatibility, num_iterations=layer.num_iterations,
                                       bilateral=layer.bilateral, spatial=layer.spatial)


@onnx_form("NospConvMeanfield")
def _nosp_conv_meanfield(layer, unary, q0, features):
    return onnx_ops.nosp_conv_meanfield(unary, q0, features, layer.compatibility,
                                        num_iterations=layer.num_iterations,
                                        bilateral=layer.bilateral)


@onnx_form("DomainTransform", "DomainTransformForwardOnly")
def _domain_transform(layer, x, g, dims):
    return onnx_ops.domain_transform(x, g, dims, num_iter=layer.num_iter,
                                     spatial_sigma=layer.spatial_sigma,
                                     range_sigma=layer.range_sigma, min_weight=layer.min_weight)


@onnx_form("ArgMax")
def _argmax(layer, x):
    """The layer's ranking by (value, index) descending, with TopK: ONNX's TopK puts the lower
    index first among equal values, so on the flipped axis the higher index wins, as in the
    original's partial_sort."""
    def top(values, dim):
        size = values.shape[dim]
        top_values, flipped_index = torch.topk(values.flip(dim), layer.top_k, dim=dim)
        return top_values, (size - 1) - flipped_index
    if layer.axis is not None:
        values, index = top(x, layer.axis)
        return values if layer.out_max_val else index.to(x.dtype)
    num = x.shape[0]
    values, index = top(x.reshape(num, -1), 1)
    rows = [index.to(x.dtype)] + ([values] if layer.out_max_val else [])
    shape = [1] * max(x.dim(), 3)
    shape[0], shape[1], shape[2] = num, len(rows), layer.top_k
    return torch.stack(rows, dim=1).reshape(shape)


@onnx_form("BiasChannel")
def _bias_channel(layer, scores, labels):
    """The layer's sum without its autograd wrapper (the gradient rule does not matter here)."""
    return layer._biased(scores, labels)


class _NoAutograd:
    """Stands in for an autograd.Function's context: runs its forward as plain ops."""

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass


@onnx_form("SoftmaxWithLoss")
def _softmax_loss(layer, scores, labels):
    """The loss (and prob) of the layer's autograd.Function forward, run as plain ops (the
    exporter cannot inline that Function: it returns two tensors, one non-differentiable)."""
    from segaware_caffe.layers.softmax_loss import _SoftmaxLossFunction
    loss, prob = _SoftmaxLossFunction.forward(_NoAutograd(), scores, labels, layer.axis,
                                              layer.ignore_label, layer.normalization)
    return (loss, prob) if layer.with_prob else loss


def _pool(x, method, kernel, pad, stride, out_hw):
    from segaware_caffe.layers.pooling import pool2d
    if method == "AVE":
        return onnx_ops.average_pool2d(x, kernel, pad, stride, out_hw)
    return pool2d(x, method, kernel, pad, stride, out_hw)


@onnx_form("Pooling")
def _pooling(layer, x):
    """Pooling the emitter could not write as a torch module (pads beyond half the kernel,
    windows past the end, mask tops, STOCHASTIC in the TEST phase), with the geometry fixed from
    the traced input size."""
    height, width = int(x.shape[2]), int(x.shape[3])
    if layer.method == "STOCHASTIC" or layer.mask_top:
        return layer(x)
    return _pool(x, layer.method, layer._kernel_for(height, width), layer.pad, layer.stride,
                 layer.output_spatial_size(height, width))


@onnx_form("SPP")
def _spp(layer, x):
    """The layer's forward with the level geometry fixed from the traced input size (a tracer
    turns the size arithmetic into graph ops that shape the pooling wrongly)."""
    from segaware_caffe.layers.spp import check_levels, pyramid
    height, width = int(x.shape[2]), int(x.shape[3])
    problem = check_levels(layer.pyramid_height, layer.method, height, width)
    if problem:
        raise UnsupportedError(f"SPP: {problem}")

    def pool(x, kernel, pad, stride, out):
        return _pool(x, layer.method, kernel, pad, stride, out)
    return pyramid(x, layer.pyramid_height, height, width, pool)


def registered_forms():
    return sorted(_FORMS)


# ---------------------------------------------------------------------------- refusals
def _refusal(record):
    """Why the layer of `record` cannot go to ONNX, or None."""
    module, cls = record.module, type(record.module)
    if record.type in NO_ONNX_FORM:
        return NO_ONNX_FORM[record.type]
    if cls.USES_SEGAWARE_KERNELS and record.type not in _FORMS:
        return "it runs a segmentation-aware kernel that has no ONNX form here"
    if module.HAS_SIDE_EFFECTS:      # an instance may set it (state kept between passes)
        return ("it has effects beyond its tops (writes files, runs Python code or keeps state "
                "between passes), which an ONNX graph cannot have")
    if cls.BOTTOMS[1] == 0 and not cls.NET_INPUT and record.type not in _SOURCES_OK:
        return ("it reads its tops from files or arrays on every pass; an ONNX graph takes "
                "them as inputs (replace the layer by an Input layer of its top shapes)")
    if record.type in ("Dropout", "Pooling") and module.train_phase \
            and (record.type == "Dropout" or module.method == "STOCHASTIC"):
        return ("it draws random samples on every pass in the TRAIN phase; export the TEST "
                "phase")
    if record.type == "SPP" and module.method == "STOCHASTIC":
        return "its STOCHASTIC levels draw random samples on every pass (their phase is TRAIN)"
    if record.type == "DummyData":
        random = sorted({f.type for f in module.fillers} - DETERMINISTIC_FILLERS)
        if random:
            return (f"its {', '.join(random)} filler draws new values on every pass; a trace "
                    f"would freeze one draw")
    return None


def onnx_refusals(net, export=None):
    """[(layer name, type, reason)] of the layers of `net` that cannot be exported to ONNX
    (fused layers are judged by the records they replace)."""
    names = None if export is None else {layer.key for layer in export.layers}
    out = []
    for record in net.records:
        if names is not None and record.key not in names:
            continue
        reason = _refusal(record)
        if reason is not None:
            out.append((record.name, record.type, reason))
    return out


def _refuse(net, refusals):
    listing = "; ".join(f"{name} ({type_}): {reason}" for name, type_, reason in refusals)
    raise UnsupportedError(f"cannot export net {net.name!r} to ONNX: {len(refusals)} layer(s) "
                           f"have no ONNX form: {listing}")


# ---------------------------------------------------------------------------- the tracer
def _trunc_symbolic(g, x):
    """aten::trunc, which torch's exporter lacks (layers truncate labels as C++'s int() does):
    Ceil below zero, Floor elsewhere."""
    negative = g.op("Less", x, g.op("Constant", value_t=torch.tensor(0.0)))
    return g.op("Where", negative, g.op("Ceil", x), g.op("Floor", x))


def _and_symbolic(g, a, b):
    """aten::__iand_ (`mask &= other` on booleans): a tracer records the in-place op and reads
    its result afterwards, so it is an And."""
    return g.op("And", a, b)


def _or_symbolic(g, a, b):
    return g.op("Or", a, b)


_EXTRA_SYMBOLICS = {"aten::trunc": _trunc_symbolic, "aten::__iand_": _and_symbolic,
                    "aten::__ior_": _or_symbolic}


@contextlib.contextmanager
def _extra_symbolics(opset):
    """Symbolics for the aten ops the layers use and torch's exporter has none for, registered
    for the duration of one export."""
    for name, symbolic in _EXTRA_SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, symbolic, opset)
    try:
        yield
    finally:
        for name in _EXTRA_SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


# ---------------------------------------------------------------------------- the model
class _TupleOutputs(nn.Module):
    """ONNX wants a tuple of outputs; the exported module returns a dict."""

    def __init__(self, model, outputs):
        super().__init__()
        self.model, self.outputs = model, list(outputs)

    def forward(self, *inputs):
        result = self.model(*inputs)
        return tuple(result[o] for o in self.outputs)


def _swap_functions(namespace, net):
    """Rebind the kernels functions the generated module imported, and the helpers it defines,
    to their twins."""
    for name, value in list(namespace.items()):
        if not isinstance(value, types.FunctionType):
            continue
        twin = PORTABLE_FUNCTIONS.get(value)
        if twin is None and value.__module__ == namespace.get("__name__"):
            twin = PORTABLE_HELPERS.get(name)
        if twin is not None:
            namespace[name] = twin
        elif (value.__module__ or "").startswith("segaware_caffe.kernels"):
            raise UnsupportedError(f"cannot export net {net.name!r} to ONNX: the generated module "
                                   f"calls {value.__module__}.{value.__name__}, which has no ONNX "
                                   f"form")


def onnx_model(net, export=None):
    """A torch module computing `net`'s outputs (as a tuple, in `export.outputs` order) with
    standard ONNX operators only, holding the Net's current parameters. Raises UnsupportedError,
    naming every layer that has no ONNX form. Returns (model, export)."""
    if export is None:
        export = python_source(net)
    refusals = onnx_refusals(net, export)
    if refusals:
        _refuse(net, refusals)
    module = load_source(export.source)
    _swap_functions(vars(module), net)
    model = getattr(module, export.class_name)()
    state = {k[len("layers."):]: v for k, v in net.state_dict().items() if k.startswith("layers.")}
    model.load_state_dict(state, strict=False)
    records = {record.key: record for record in net.records}
    for layer in export.layers:
        if layer.how != "module" or layer.key not in model._modules:
            continue
        form = _FORMS.get(layer.type)
        if form is not None:
            model._modules[layer.key] = OnnxForm(model._modules[layer.key], form)
        elif type(records[layer.key].module).USES_SEGAWARE_KERNELS:   # caught above; kept safe
            _refuse(net, [(layer.name, layer.type, "no ONNX form")])
    return _TupleOutputs(model.eval(), export.outputs), export


@dataclass
class OnnxExport:
    path: str
    inputs: list              # ONNX input names (the net's input blobs the outputs depend on)
    outputs: list             # ONNX output names, in the net's output order
    renamed: dict             # net output blob -> ONNX output name, where an input has its name
    left_out: list            # net outputs left out: inputs passed through, written by no layer
    errors: dict = None       # ONNX output name -> max relative error against the Net (verify)
    unverified: str = None    # why the graph was not verified

    @property
    def verified(self):
        return self.errors is not None


def _passed_through(net, blob):
    """Whether `blob` is a net input that no layer writes (an output that is just the input)."""
    return blob in net.input_names and not any(
        blob in record.tops for record in net.records if not type(record.module).NET_INPUT)


def _output_names(net, outputs):
    """ONNX output names: the blob names, except that a name an input already has (ONNX names
    each value once) gets `_out` (and a number where that is taken too)."""
    taken = set(net.input_names) | set(outputs)
    names = {}
    for blob in outputs:
        name = blob
        if blob in net.input_names:
            name, i = f"{blob}_out", 1
            while name in taken:
                i += 1
                name = f"{blob}_out{i}"
            taken.add(name)
        names[blob] = name
    return names


def _relative_error(got, ref):
    """max|got - ref| / max|ref| over the entries that are not BIG (removed Im2dist taps); inf
    when the shapes differ, or BIG or NaN entries sit in different places."""
    ref = ref.detach().double().numpy()
    got = np.asarray(got, dtype=np.float64)
    if got.shape != ref.shape:
        return float("inf")
    big, nan = ref == np.float64(kernels.BIG), np.isnan(ref)
    if (big != (got == np.float64(kernels.BIG))).any() or (nan != np.isnan(got)).any():
        return float("inf")
    keep = ~(big | nan)
    if not keep.any():
        return 0.0
    scale = float(np.abs(ref[keep]).max())
    diff = float(np.abs(got[keep] - ref[keep]).max())
    return diff / scale if scale else diff


def _verification_inputs(net, seed):
    """Candidate inputs, most informative first: normal noise; then small non-negative integers
    (for nets that read labels or indices and refuse noise there); then zeros."""
    generator = torch.Generator().manual_seed(seed)
    shapes = net.input_shapes.items()
    yield {name: torch.randn(shape, generator=generator) for name, shape in shapes}
    yield {name: torch.randint(0, 2, shape, generator=generator).float() for name, shape in shapes}
    yield {name: torch.zeros(shape) for name, shape in shapes}


def verify_onnx(net, model_bytes, names, *, inputs=None, seed=0, threads=None):
    """Run the ONNX graph in onnxruntime and the Net on the same inputs (given, or random ones
    the Net accepts); returns ({ONNX output name: max relative error}, None), or (None, why not)
    when onnxruntime is not importable or the Net accepts none of the inputs tried. Raises
    UnsupportedError when an output is missing or off by more than VERIFY_MAXREL."""
    try:
        import onnxruntime
    except ImportError as e:
        return None, f"onnxruntime is not importable ({e})"
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()   # as many as torch uses
    session = onnxruntime.InferenceSession(model_bytes, options,
                                           providers=["CPUExecutionProvider"])
    present = {o.name for o in session.get_outputs()}
    missing = [name for name in names.values() if name not in present]
    if missing:
        raise UnsupportedError(
            f"ONNX export of net {net.name!r}: the traced graph has no output {missing} (found "
            f"{sorted(present)}); a layer computed it outside the graph (from Python values or "
            f"the data), so the trace froze it")
    blobs = list(names)
    refused = None
    for candidate in ([inputs] if inputs is not None else _verification_inputs(net, seed)):
        try:
            with torch.no_grad():
                ref = net.forward(outputs=blobs, **candidate)
        except ValueError as e:      # the Net's own input checks (labels, indices)
            refused = e
            continue
        break
    else:
        return None, f"the Net refuses the verification inputs ({refused})"
    feed = {i.name: candidate[i.name].numpy() for i in session.get_inputs()}
    got = session.run([names[b] for b in blobs], feed)
    errors = {names[b]: _relative_error(value, ref[b]) for b, value in zip(blobs, got)}
    bad = {name: error for name, error in errors.items() if not error <= VERIFY_MAXREL}
    if bad:
        listing = ", ".join(
            f"{name} (" + ("shape, BIG or NaN entries differ" if error == float("inf")
                           else f"max relative error {error:.2g}") + ")"
            for name, error in bad.items())
        raise UnsupportedError(
            f"ONNX export of net {net.name!r}: onnxruntime does not reproduce the Net: "
            f"{listing}. A layer computes something the trace did not capture; layers exported "
            f"as segaware_caffe modules are the likely cause")
    return errors, None


def export_onnx(net, export, path, *, opset=DEFAULT_OPSET, overwrite=False, hint=API_HINT,
                verify=True, verify_inputs=None):
    """Write `net` as ONNX at `path` (with the Net's parameters and input shapes), from `export`
    (python_source(net); None builds it). Refuses, naming them, the layers that have no ONNX
    form; an existing file is replaced only with overwrite. Net outputs that are inputs passed
    through unchanged (a deploy net's unused `label`) are left out, and inputs nothing then reads
    are dropped. verify: before writing, check the graph in onnxruntime against the Net on random
    inputs, or on `verify_inputs` ({input blob: tensor}); see verify_onnx. Returns an OnnxExport."""
    import onnx
    path = os.fspath(path)
    refuse_existing(path, overwrite, hint)
    model, export = onnx_model(net, export)
    # inputs passed through: those python_source left out already (no layer reads them) and
    # those it returns unchanged
    left_out = [blob for blob in net.outputs if _passed_through(net, blob)]
    kept = [blob for blob in export.outputs if blob not in left_out]
    if not kept:
        raise UnsupportedError(f"cannot export net {net.name!r} to ONNX: it computes no output "
                               f"(its outputs {export.outputs} are inputs passed through)")
    model.outputs = kept
    names = _output_names(net, kept)
    example = tuple(torch.zeros(net.input_shapes[name]) for name in export.inputs)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _extra_symbolics(opset):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, example, buffer, input_names=list(export.inputs),
                              output_names=[names[blob] for blob in kept], opset_version=opset,
                              dynamo=False)
        except Exception as e:  # the tracer's message plus the layers most likely responsible
            modules = [f"{layer.name} ({layer.type})" for layer in export.layers
                       if layer.how == "module"]
            raise UnsupportedError(
                f"ONNX export of net {net.name!r} failed: {e}. Layers exported as segaware_caffe "
                f"modules: {', '.join(modules) or 'none'}") from None
    data = buffer.getvalue()
    errors, unverified = verify_onnx(net, data, names, inputs=verify_inputs) if verify else \
        (None, "not asked")
    graph = onnx.load_from_string(data).graph
    atomic_write(path, data, overwrite=overwrite, hint=hint)
    return OnnxExport(path, [i.name for i in graph.input], [o.name for o in graph.output],
                      {blob: name for blob, name in names.items() if blob != name}, left_out,
                      errors, unverified)
