"""Errors raised while building or running a net. Messages carry the Caffe layer name and type."""


class NetBuildError(ValueError):
    """The prototxt (or weights) cannot become a net; says which layer and what was expected."""


class LayerSetupError(NetBuildError):
    def __init__(self, layer_name, layer_type, message):
        self.layer_name, self.layer_type = layer_name, layer_type
        super().__init__(f"{layer_name} ({layer_type}): {message}")


class NoBackwardError(RuntimeError):
    """A gradient was asked of a layer (or a bottom of it) that the original Caffe cannot
    backpropagate through; raised during backward, naming the layer, the bottom and the way out."""


class PythonLayerError(RuntimeError):
    """A user's Python layer raised while it ran; names the layer and the user's file and line
    (the original exception is chained)."""
