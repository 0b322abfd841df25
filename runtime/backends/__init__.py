"""Inference backends behind one `Runner` interface. Importing this needs only numpy:
each backend imports its engine (onnxruntime, OpenVINO, TensorRT) when first used.

`create_runner(model, backend, **options)` picks the backend by name; the extractor, the
Predictor and the CLI all go through it.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Union

from ..errors import BackendUnavailable
from .base import BatchProfile, Dim, InputSpec, Loader, Runner, check_feed
from .onnxruntime import OnnxRuntimeRunner, SessionLoader, available_providers, tensorrt_ep_options

BACKENDS = ("onnxruntime", "openvino", "tensorrt")


def _loader_and_runner(backend: str) -> tuple[type, type]:
    if backend == "onnxruntime":
        return SessionLoader, OnnxRuntimeRunner
    if backend == "openvino":
        from .openvino import CompiledModelLoader, OpenVinoRunner

        return CompiledModelLoader, OpenVinoRunner
    if backend == "tensorrt":
        from .tensorrt import EngineLoader, TensorRTRunner

        return EngineLoader, TensorRTRunner
    raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def create_runner(model: Union[str, os.PathLike, bytes], backend: str = "onnxruntime", **options: Any) -> Runner:
    """A runner (not yet active) for `model` on `backend`.

    options go to the backend's loader: `SessionLoader` (providers, intra_op_threads,
    provider_options), `openvino.CompiledModelLoader` (device, precision, num_threads, config) or
    `tensorrt.EngineLoader` (precision, profile, cache_dir, calibration...). An option the
    loader does not take is an error that lists the ones it does.
    """
    loader_cls, runner_cls = _loader_and_runner(backend)
    accepted = [p for p in inspect.signature(loader_cls).parameters if p != "model"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BackendUnavailable(
            f"backend {backend!r} takes no option(s) {unknown}; it takes {accepted}"
        )
    return runner_cls(loader_cls(model, **options))


__all__ = [
    "BACKENDS", "BatchProfile", "Dim", "InputSpec", "Loader", "Runner", "check_feed", "create_runner",
    "OnnxRuntimeRunner", "SessionLoader", "available_providers", "tensorrt_ep_options",
]
