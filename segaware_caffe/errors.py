"""Errors the project raises on purpose. Each message names the file (and line, layer, field or
blob) and what was expected; every class derives from `SegawareError`, so a caller (the command
line, a fuzz test) can tell a reported problem from a bug."""


class SegawareError(Exception):
    """Base of every error this project raises on purpose about its inputs. Subclasses also derive
    from the builtin class that fits (ValueError, OSError, RuntimeError), so existing `except
    ValueError` code keeps working."""


class NetBuildError(SegawareError, ValueError):
    """The prototxt (or weights) cannot become a net; says which layer and what was expected."""


class LayerSetupError(NetBuildError):
    def __init__(self, layer_name, layer_type, message):
        self.layer_name, self.layer_type = layer_name, layer_type
        super().__init__(f"{layer_name} ({layer_type}): {message}")


class NoBackwardError(SegawareError, RuntimeError):
    """A gradient was asked of a layer (or a bottom of it) that the original Caffe cannot
    backpropagate through; raised during backward, naming the layer, the bottom and the way out."""


class OutputExistsError(SegawareError, FileExistsError):
    """A writer was asked to create a file (or fill a folder) that already exists and was not
    told to replace it."""


class TensorFileError(SegawareError, ValueError):
    """A .safetensors or .pt file that cannot be read safely: a header that lies about lengths,
    offsets, dtypes or shapes, a pickle that is not plain tensors. Names the file and the tensor."""


class UnsupportedError(SegawareError, NotImplementedError):
    """A valid Caffe feature this project does not run (a layer variant, a file format); says
    which and, where there is one, the way around it."""


class SolverError(SegawareError, ValueError):
    """A solver file, solver state or snapshot that cannot be used; names the file."""


class PythonLayerError(SegawareError, RuntimeError):
    """A user's Python layer raised while it ran; names the layer and the user's file and line
    (the original exception is chained)."""


class MemoryBudgetError(SegawareError, ValueError):
    """A size from the input (a blob, a top, a batch, a pad) would need more memory than the
    budget allows (segaware_caffe.budget); names the layer, the blob and its shape, and how to
    raise the budget."""


class SizeLimitError(SegawareError, ValueError):
    """A configured count (iter_size, test_iter, max_iter, a batch size, --iterations) is beyond
    what any run plausibly means (segaware_caffe.limits); names the field and how to raise the
    limit."""


class NonFiniteError(SegawareError, FloatingPointError):
    """Training produced a NaN or an infinity (the loss, a layer's output or a gradient); names
    the iteration and the first layer where it appeared."""


class NonFiniteWarning(UserWarning):
    """Numbers that are NaN or infinite where a model's values are expected (weights files)."""
