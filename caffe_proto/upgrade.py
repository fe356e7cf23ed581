"""Old Caffe formats to the current one, with the same result as BVLC Caffe's upgrade_proto.

* V0 nets (`layers { layer { type: "conv" ... } }`, 2013) become V1 first: padding layers fold
  into the conv/pool layer they feed, flat V0 fields move into the per-type `*_param` messages.
* V1 nets (`layers { type: CONVOLUTION blobs_lr: 1 ... }`, 2014) become `layer` messages: the enum
  type becomes the type string, blobs_lr/weight_decay become param { lr_mult decay_mult }.
* V1 data layers keep transformation fields in data_param/image_data_param/window_data_param;
  they move to transform_param (BVLC's "data upgrade").
* Net-level `input`/`input_shape`/`input_dim` become one Input layer named "input" at the front,
  only when asked (the net builder reads legacy inputs itself, as the fork does).
* Solvers: the `solver_type` enum becomes the `type` string.

BVLC's newest BatchNorm upgrade (zeroing lr_mult of 3 declared params) is not applied: the fork
predates it and trains BatchNorm blobs with whatever multipliers the file gives.
"""
import warnings

from . import caffe_pb2
from .errors import CaffeFormatError
from .wire import is_repeated

V1 = caffe_pb2.V1LayerParameter

# V1 enum value -> current type string (BVLC's table; NONE -> "")
V1_TYPE_NAMES = {
    V1.NONE: "", V1.ABSVAL: "AbsVal", V1.ACCURACY: "Accuracy", V1.ARGMAX: "ArgMax",
    V1.BNLL: "BNLL", V1.CONCAT: "Concat", V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    V1.CONVOLUTION: "Convolution", V1.DECONVOLUTION: "Deconvolution", V1.DATA: "Data",
    V1.DROPOUT: "Dropout", V1.DUMMY_DATA: "DummyData", V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    V1.ELTWISE: "Eltwise", V1.EXP: "Exp", V1.FLATTEN: "Flatten", V1.HDF5_DATA: "HDF5Data",
    V1.HDF5_OUTPUT: "HDF5Output", V1.HINGE_LOSS: "HingeLoss", V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData", V1.INFOGAIN_LOSS: "InfogainLoss",
    V1.INNER_PRODUCT: "InnerProduct", V1.LRN: "LRN", V1.MEMORY_DATA: "MemoryData",
    V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss", V1.MVN: "MVN",
    V1.POOLING: "Pooling", V1.POWER: "Power", V1.RELU: "ReLU", V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax", V1.SOFTMAX_LOSS: "SoftmaxWithLoss", V1.SPLIT: "Split",
    V1.SLICE: "Slice", V1.TANH: "TanH", V1.WINDOW_DATA: "WindowData",
    V1.THRESHOLD: "Threshold",
}

# V0 type string -> V1 enum
V0_TYPES = {
    "accuracy": V1.ACCURACY, "bnll": V1.BNLL, "concat": V1.CONCAT, "conv": V1.CONVOLUTION,
    "data": V1.DATA, "dropout": V1.DROPOUT, "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN, "hdf5_data": V1.HDF5_DATA, "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL, "images": V1.IMAGE_DATA, "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT, "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": V1.POOLING,
    "relu": V1.RELU, "sigmoid": V1.SIGMOID, "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS, "split": V1.SPLIT, "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

_ANY = "*"  # a V0 field that moves to the same place whatever the layer type

# V0 flat field -> {V0 type (or _ANY): (target *_param field of V1LayerParameter, target field)}
V0_FIELD_MOVES = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"),
                   "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},  # V0 and current PoolMethod share numbers
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"),
               "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "scale": {_ANY: ("transform_param", "scale")},
    "meanfile": {_ANY: ("transform_param", "mean_file")},
    "batchsize": {"data": ("data_param", "batch_size"),
                  "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "cropsize": {_ANY: ("transform_param", "crop_size")},
    "mirror": {_ANY: ("transform_param", "mirror")},
    "rand_skip": {"data": ("data_param", "rand_skip"),
                  "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}

# V1 data layer type -> its param message holding legacy transformation fields
_V1_DATA_PARAMS = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
                   V1.WINDOW_DATA: "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

SOLVER_TYPE_NAMES = {
    caffe_pb2.SolverParameter.SGD: "SGD", caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad", caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta", caffe_pb2.SolverParameter.ADAM: "Adam",
}


def net_format(net):
    """"V0", "V1" or "V2" (current) for a NetParameter."""
    if any(layer.HasField("layer") for layer in net.layers):
        return "V0"
    return "V1" if len(net.layers) else "V2"


def upgrade_net(net, where="<net>", upgrade_inputs=False):
    """Upgrade a NetParameter in place to the current format; returns it."""
    if len(net.layers) and len(net.layer):
        raise CaffeFormatError(
            f"{where}: the net mixes current `layer {{ }}` ({len(net.layer)}) and legacy "
            f"`layers {{ }}` ({len(net.layers)}) entries; Caffe would drop the `layer` ones. "
            f"Write all layers in one format")
    if net_format(net) == "V0":
        _upgrade_v0_net(net, where)
    if _needs_data_upgrade(net):
        _upgrade_data_transformation(net)
    if len(net.layers):
        _upgrade_v1_net(net, where)
    if upgrade_inputs and len(net.input):
        upgrade_net_input(net, where)
    return net


# ------------------------------------------------------------------------------------------------
# V0 -> V1

def _upgrade_v0_net(net, where):
    padded = _fold_v0_padding_layers(net, where)
    upgraded = caffe_pb2.NetParameter()
    if padded.HasField("name"):
        upgraded.name = padded.name
    for connection in padded.layers:
        _upgrade_v0_layer(connection, upgraded.layers.add(), where)
    upgraded.input.extend(padded.input)
    upgraded.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        upgraded.force_backward = padded.force_backward
    # like BVLC, every other net-level field of a V0 net is dropped
    net.CopyFrom(upgraded)


def _fold_v0_padding_layers(net, where):
    """Copy of net without V0 "padding" layers; their pad goes to the conv/pool layer they feed."""
    result = caffe_pb2.NetParameter()
    result.CopyFrom(net)
    del result.layers[:]
    last_producer = {name: -1 for name in net.input}  # blob -> index of the layer writing it
    for index, connection in enumerate(net.layers):
        v0 = connection.layer
        if v0.type != "padding":
            result.layers.add().CopyFrom(connection)
        for slot, blob in enumerate(connection.bottom):
            if blob not in last_producer:
                raise CaffeFormatError(
                    f"{where}: V0 layer {v0.name!r} ({v0.type}) reads blob {blob!r}, which no "
                    f"earlier layer or net input produces")
            producer_index = last_producer[blob]
            if producer_index < 0:
                continue
            producer = net.layers[producer_index]
            if producer.layer.type != "padding":
                continue
            if v0.type not in ("conv", "pool"):
                raise CaffeFormatError(
                    f"{where}: V0 padding layer {producer.layer.name!r} feeds layer {v0.name!r} "
                    f"of type {v0.type!r}; only conv and pool layers can absorb padding")
            if len(connection.bottom) != 1 or len(producer.bottom) != 1 or len(producer.top) != 1:
                raise CaffeFormatError(
                    f"{where}: V0 padding layer {producer.layer.name!r} and the layer it feeds "
                    f"({v0.name!r}) must each have exactly one input (and the padding one output)")
            target = result.layers[len(result.layers) - 1]
            target.layer.pad = producer.layer.pad
            target.bottom[slot] = producer.bottom[0]
        for blob in connection.top:
            last_producer[blob] = index
    return result


def _put(message, field_name, value):
    field = message.DESCRIPTOR.fields_by_name[field_name]
    if field.message_type is not None:
        getattr(message, field_name).CopyFrom(value)
    elif is_repeated(field):
        getattr(message, field_name).append(value)
    else:
        setattr(message, field_name, value)


def _upgrade_v0_layer(connection, out, where):
    out.bottom.extend(connection.bottom)
    out.top.extend(connection.top)
    if not connection.HasField("layer"):
        return
    v0 = connection.layer
    if v0.HasField("name"):
        out.name = v0.name
    v0_type = v0.type
    if v0.HasField("type"):
        if v0_type not in V0_TYPES:
            raise CaffeFormatError(
                f"{where}: V0 layer {v0.name!r} has unknown type {v0_type!r}; V0 types are "
                f"{', '.join(sorted(V0_TYPES))}")
        out.type = V0_TYPES[v0_type]
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for field_name, moves in V0_FIELD_MOVES.items():
        if not v0.HasField(field_name):
            continue
        target = moves.get(v0_type) or moves.get(_ANY)
        if target is None:
            # BVLC logs an error and goes on without the field
            warnings.warn(f"{where}: V0 layer {v0.name!r} ({v0_type}): field {field_name} does "
                          f"not apply to this layer type; dropped", stacklevel=3)
            continue
        param_name, target_field = target
        value = getattr(v0, field_name)
        if target_field is None:
            getattr(out, param_name).CopyFrom(value)
        else:
            _put(getattr(out, param_name), target_field, value)


# ------------------------------------------------------------------------------------------------
# V1 data transformation fields

def _needs_data_upgrade(net):
    for layer in net.layers:
        param_name = _V1_DATA_PARAMS.get(layer.type)
        if param_name and any(getattr(layer, param_name).HasField(f) for f in _TRANSFORM_FIELDS):
            return True
    return False


def _upgrade_data_transformation(net):
    for layer in net.layers:
        param_name = _V1_DATA_PARAMS.get(layer.type)
        if not param_name:
            continue
        param = getattr(layer, param_name)
        for field_name in _TRANSFORM_FIELDS:
            if param.HasField(field_name):
                setattr(layer.transform_param, field_name, getattr(param, field_name))
                param.ClearField(field_name)


# ------------------------------------------------------------------------------------------------
# V1 -> current

def _upgrade_v1_net(net, where):
    legacy = list(net.layers)
    del net.layers[:]
    for index, v1 in enumerate(legacy):
        _upgrade_v1_layer(v1, net.layer.add(), f"{where}: layer {index} ({v1.name!r})")


_V1_PARAM_FIELDS = [f.name for f in V1.DESCRIPTOR.fields
                    if f.name.endswith("_param") and f.message_type is not None
                    and f.name in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name]


def _upgrade_v1_layer(v1, layer, where):
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        if v1.type not in V1_TYPE_NAMES:
            raise CaffeFormatError(f"{where}: unknown V1 layer type number {v1.type}")
        layer.type = V1_TYPE_NAMES[v1.type]
    layer.blobs.extend(v1.blobs)

    def spec(i):
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]
    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        spec(i).share_mode = mode  # V1 and ParamSpec DimCheckMode share numbers
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for field_name in _V1_PARAM_FIELDS:
        if v1.HasField(field_name):
            getattr(layer, field_name).CopyFrom(getattr(v1, field_name))
    if v1.HasField("layer"):
        warnings.warn(f"{where}: a V1 layer also holds a V0 `layer {{ }}`; ignored (as Caffe does)",
                      stacklevel=3)


# ------------------------------------------------------------------------------------------------
# Legacy net inputs -> Input layer

def upgrade_net_input(net, where="<net>"):
    """Turn net-level input/input_shape/input_dim into an Input layer named "input" at the front
    (in place). Inputs without shapes (old caffemodels) are simply dropped, like BVLC does."""
    has_shape, has_dim = len(net.input_shape) > 0, len(net.input_dim) > 0
    if has_shape or has_dim:
        if has_shape and len(net.input_shape) != len(net.input):
            raise CaffeFormatError(f"{where}: {len(net.input)} net inputs but "
                                   f"{len(net.input_shape)} input_shape entries")
        if not has_shape and len(net.input_dim) != 4 * len(net.input):
            raise CaffeFormatError(f"{where}: {len(net.input)} net inputs need "
                                   f"{4 * len(net.input)} input_dim values, got {len(net.input_dim)}")
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, blob in enumerate(net.input):
            layer.top.append(blob)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        layers = [layer] + list(net.layer)
        del net.layer[:]
        net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")
    return net


# ------------------------------------------------------------------------------------------------
# Solver

def upgrade_solver(solver, where="<solver>"):
    """solver_type enum -> type string (in place); returns the solver."""
    if not solver.HasField("solver_type"):
        return solver
    if solver.HasField("type"):
        old = caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)
        raise CaffeFormatError(
            f"{where}: both the old `solver_type` ({old}) and the new `type` ({solver.type!r}) "
            f"are set; keep only `type`")
    solver.type = SOLVER_TYPE_NAMES[solver.solver_type]
    solver.ClearField("solver_type")
    return solver
