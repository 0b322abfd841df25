"""Inference backends behind one `Runner` interface. Importing this needs only numpy:
each backend imports its engine (onnxruntime, TensorRT...) when first used."""

from .base import Dim, Loader, Runner
from .onnxruntime import OnnxRuntimeRunner, SessionLoader, available_providers

__all__ = ["Dim", "Loader", "Runner", "OnnxRuntimeRunner", "SessionLoader", "available_providers"]
