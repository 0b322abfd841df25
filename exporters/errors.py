"""Typed errors of the torch-side exporters."""


class ExportError(Exception):
    """Base class of every error that the exporters raise for bad user input."""


class UnknownBackbone(ExportError):
    """A backbone name that is neither registered nor known to timm."""


class WeightsError(ExportError):
    """Weights that cannot be found, read or matched to the model's parameters."""


class GraphError(ExportError):
    """An ONNX file that cannot be read, or a graph that an engine builder or quantizer refuses."""
