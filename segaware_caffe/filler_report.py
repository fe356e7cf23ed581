"""Which layers of a net start from their fillers rather than from a weights file, and which of
those start with all-zero weights.

Caffe's default filler is constant 0, so a layer without `weight_filler` starts at zero. That is
harmless for a layer a weights file then sets, and a trap otherwise: a zero convolution gives a
constant output (the released vgg config leaves 15 layers without a weight_filler, so fine-tuning
it from a file that does not name them, such as an embs snapshot, gives spatially constant
scores); with lr_mult 0 it stays zero for good.
"""
from dataclasses import dataclass

# layer type -> (*_param, field) of the filler of blob 0, the blob that multiplies the input
WEIGHT_FILLERS = {
    "Convolution": ("convolution_param", "weight_filler"),
    "Deconvolution": ("convolution_param", "weight_filler"),
    "NormConv": ("convolution_param", "weight_filler"),
    "InnerProduct": ("inner_product_param", "weight_filler"),
    "Embed": ("embed_param", "weight_filler"),
    "Scale": ("scale_param", "filler"),
    "RNN": ("recurrent_param", "weight_filler"),
    "LSTM": ("recurrent_param", "weight_filler"),
}


@dataclass(frozen=True)
class FillerLayer:
    """A layer with parameters that no weights file set."""
    name: str
    type: str
    filler: str             # how its blob 0 was filled, in words
    zero: bool              # blob 0 is all zeros (and multiplies the input)
    frozen: bool            # blob 0 has lr_mult 0: it stays as filled


def filler_text(record):
    """'weight_filler xavier', 'no weight_filler (constant 0)', ... for a record's blob 0."""
    where = WEIGHT_FILLERS.get(record.type)
    if where is None:
        return "its fillers"
    message, field = where
    param = getattr(record.param, message)
    if not param.HasField(field):
        return f"no {field}: Caffe's default, constant 0"
    filler = getattr(param, field)
    kind = filler.type or "constant"
    return f"{field} {kind}" + (f" {filler.value:g}" if kind == "constant" else "")


def layers_at_fillers(net, reports=None):
    """[FillerLayer] of the net's layers with parameters that none of the WeightsReports
    `reports` set (all of them when `reports` is None or empty), in net order."""
    loaded = set()
    for report in reports or ():
        loaded.update(report.loaded)
    seen, out = set(), []
    for record in net.records:
        blobs = record.module.caffe_blobs()
        if not blobs or record.name in loaded or record.name in seen:
            continue
        seen.add(record.name)
        weight = blobs[0]
        zero = record.type in WEIGHT_FILLERS and weight.numel() > 0 and not bool(weight.detach().any())
        out.append(FillerLayer(record.name, record.type, filler_text(record), zero,
                               float(getattr(weight, "lr_mult", 1.0)) == 0.0))
    return out


def _names(layers, limit=40):
    """'a, b (no weight_filler: ...); c (weight_filler constant 0); d, e': the all-zero layers
    grouped by how they were filled, in net order."""
    groups = {}
    for layer in layers:
        groups.setdefault(layer.filler if layer.zero else None, []).append(layer.name)
    parts = []
    for filler, names in groups.items():
        shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
        parts.append(f"{shown} ({filler})" if filler is not None else shown)
    return "; ".join(parts)


def report_fillers(net, reports, log):
    """Log the layers left at their fillers (when weights were loaded) and warn, naming them,
    about those whose weights are all zero (nothing is logged with log=None). Returns the
    [FillerLayer]."""
    layers = layers_at_fillers(net, reports)
    if log is None:
        return layers
    if reports and layers:
        log.info(f"{len(layers)} layer(s) with parameters are not in the weights file(s) and start "
                 f"from their fillers: {_names(layers)}")
    zero = [layer for layer in layers if layer.zero]
    if zero:
        frozen = [layer.name for layer in zero if layer.frozen]
        log.warning(
            f"{len(zero)} layer(s) start with ALL-ZERO weights, so their outputs are constant until "
            f"training moves them: {_names(zero)}"
            + (f"; {', '.join(frozen)} have lr_mult 0 and stay zero" if frozen else "")
            + ("; a weights file sets a layer only where it has a layer of the same name "
               "(--rename maps the names of a file's layers)" if reports else
               "; give them a weight_filler or start from a weights file (--weights)"))
    return layers
