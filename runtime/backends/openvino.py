"""OpenVINO backend: `CompiledModelLoader` and `OpenVinoRunner` (CPU, f32 / bf16 / f16 hints).

openvino is imported inside functions only (optional extra `[openvino]`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import ArtifactError, BackendUnavailable, H2TRuntimeError
from .base import Dim, InputSpec, Loader, ModelBytes, Runner

# Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT values.
PRECISION_HINTS = {"fp32": "f32", "f32": "f32", "bf16": "bf16", "fp16": "f16", "f16": "f16"}

INSTALL_HINT = "pip install 'h2t-edge[openvino]'"

ModelSource = Union[str, os.PathLike, bytes, ModelBytes]


def _import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(
            f"the openvino backend needs the 'openvino' package ({exc}); install it with {INSTALL_HINT}"
        ) from None
    return openvino


def openvino_version() -> str:
    return _import_openvino().__version__


# Our reduced precisions -> the OPTIMIZATION_CAPABILITIES entry a device lists when it runs them natively.
_NATIVE_CAPABILITY = {"bf16": "BF16", "fp16": "FP16", "f16": "FP16"}


def supports_precision(precision: str, device: str = "CPU") -> bool:
    """Whether OpenVINO runs `precision` natively on `device` (fp32 always). Where it does not,
    a bf16 or fp16 hint is not an error for OpenVINO: it silently runs f32."""
    if precision not in _NATIVE_CAPABILITY:
        return precision in PRECISION_HINTS
    return _NATIVE_CAPABILITY[precision] in _capabilities(_import_openvino().Core(), device)


def _capabilities(core, device: str) -> list[str]:
    return list(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))


def _inference_precision(compiled) -> str:
    """The precision a compiled model really runs in, e.g. 'bf16' or 'f32'."""
    return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


class CompiledModelLoader:
    """Lazily reads and compiles a model with OpenVINO (a Polygraphy-style loader).

    model: path to an .onnx (or OpenVINO .xml) file, serialized ONNX bytes, or verified `ModelBytes`
        (ONNX, or an IR's XML with its weights), read from memory: the path is not opened again.
    device: OpenVINO device name, 'CPU' by default.
    precision: 'fp32' or 'bf16' (or 'fp16'): the inference precision hint. A CPU without bf16
        support runs in f32, with a RuntimeWarning that says so; `OpenVinoRunner.precision`
        reports what the compiled model uses.
    num_threads: inference threads (None: OpenVINO's default).
    config: further OpenVINO properties, passed as they are.
    """

    def __init__(self, model: ModelSource, device: str = "CPU", precision: str = "fp32",
                 num_threads: int | None = None, config: Mapping[str, Any] | None = None):
        if precision not in PRECISION_HINTS:
            raise BackendUnavailable(
                f"OpenVINO precision {precision!r} is not one of {sorted(PRECISION_HINTS)}; pick fp32 or bf16"
            )
        self.model = model
        self.device = device
        self.precision = precision
        self.num_threads = num_threads
        self.config = dict(config or {})

    @property
    def model_name(self) -> str:
        if isinstance(self.model, ModelBytes):
            return self.model.source
        return "<in-memory model>" if isinstance(self.model, bytes) else str(self.model)

    def _read(self, core, ov):
        """The ov.Model: from memory (bytes, ModelBytes; an IR with its weights) or from a path."""
        if isinstance(self.model, ModelBytes):
            self.model.refuse_external_data()
            weights = np.frombuffer(self.model.weights or b"", np.uint8)
            return core.read_model(self.model.data, ov.Tensor(weights))
        if isinstance(self.model, bytes):  # ONNX bytes with an empty weights tensor
            ModelBytes(self.model, self.model_name).refuse_external_data()
            return core.read_model(self.model, ov.Tensor(np.empty(0, np.uint8)))
        return core.read_model(str(self.model))

    def __call__(self):
        """Compile and return the `openvino.CompiledModel`."""
        ov = _import_openvino()
        if not isinstance(self.model, (bytes, ModelBytes)) and not Path(self.model).is_file():
            raise ArtifactError(f"model {self.model} does not exist; check the path")
        core = ov.Core()
        if self.device.split(":")[0].split(".")[0] not in {d.split(".")[0] for d in core.available_devices}:
            raise BackendUnavailable(
                f"OpenVINO device {self.device!r} is not available here (available: {core.available_devices})"
            )
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[self.precision], **self.config}
        if self.num_threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(self.num_threads)
        try:
            model = self._read(core, ov)
            compiled = core.compile_model(model, self.device, config)
        except RuntimeError as exc:  # OpenVINO raises RuntimeError subclasses for bad models
            if isinstance(self.model, ModelBytes):
                self.model.confirm()  # bytes that fail their digest are refused as such, not as a bad model
            raise ArtifactError(
                f"OpenVINO cannot read or compile {self.model_name}: {exc}; "
                "the file is corrupt or uses an operator OpenVINO lacks, re-export it"
            ) from None
        if isinstance(self.model, ModelBytes):
            self.model.confirm()  # compiled while the digest was computed; nothing runs before it matches
        used = _inference_precision(compiled)
        if used != config["INFERENCE_PRECISION_HINT"]:
            warnings.warn(
                f"OpenVINO runs {self.model_name} in {used}, not the requested {self.precision}: {self.device} "
                f"has no native {self.precision} (its capabilities: "
                f"{', '.join(_capabilities(core, self.device))}); "
                "ask for fp32 (--precision fp32) to run what was asked", RuntimeWarning, stacklevel=2)
        return compiled


class OpenVinoRunner(Runner):
    """Runs a model compiled by OpenVINO.

    loader_or_compiled: a Loader (e.g. `CompiledModelLoader`) called on `activate`, or an
    already compiled `openvino.CompiledModel`.
    """

    def __init__(self, loader_or_compiled: Union[Loader, Any]):
        self._source = loader_or_compiled
        self._compiled = None
        self._request = None

    def activate(self) -> None:
        if self._compiled is not None:
            return
        # A compiled model has `create_infer_request`; anything else is a loader to call.
        self._compiled = self._load(self._source, lambda s: hasattr(s, "create_infer_request"))
        self._request = self._compiled.create_infer_request()

    def deactivate(self) -> None:
        self._compiled = None
        self._request = None
        self._forget_specs()

    @property
    def compiled_model(self):
        if self._compiled is None:
            raise H2TRuntimeError("OpenVinoRunner is not active; use it as `with runner: ...`")
        return self._compiled

    @property
    def device(self) -> str:
        return ",".join(self.compiled_model.get_property("EXECUTION_DEVICES"))

    @property
    def precision(self) -> str:
        """The inference precision the compiled model really uses, e.g. 'bf16' or 'f32'."""
        return _inference_precision(self.compiled_model)

    @property
    def name(self) -> str:
        return f"openvino[{self.device},{self.precision}]"

    @property
    def input_names(self) -> list[str]:
        return [p.get_any_name() for p in self.compiled_model.inputs]

    @property
    def output_names(self) -> list[str]:
        return [_output_name(p) for p in self.compiled_model.outputs]

    def input_shapes(self) -> dict[str, list[Dim]]:
        return {p.get_any_name(): _dims(p.get_partial_shape(), p.get_any_name())
                for p in self.compiled_model.inputs}

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on `feed` (input name -> array of the model's exact dtype and rank); returns
        output name -> array (copies, safe to keep across calls)."""
        self._check_feed(feed)
        results = self._request.infer(feed)
        return {_output_name(p): np.asarray(results[p]) for p in self.compiled_model.outputs}

    def _input_specs(self) -> dict[str, InputSpec]:
        shapes = self.input_shapes()
        return {p.get_any_name(): InputSpec(_numpy_dtype(p.get_element_type()), shapes[p.get_any_name()])
                for p in self.compiled_model.inputs}


def _output_name(port) -> str:
    """The graph's name for an output. Compiling fuses nodes and merges their tensor names (a task's
    logits `t0` also becomes `matmul`), and `get_any_name` may then pick the internal one; the Result
    node the ONNX reader made for the output is still named '<output>/sink_port_0'."""
    names = port.get_names()
    graph_name = port.get_node().get_friendly_name().split("/sink_port_")[0]
    return graph_name if graph_name in names else port.get_any_name()


def _dims(partial_shape, name: str) -> list[Dim]:
    """OpenVINO loses ONNX's symbolic names; a dynamic axis becomes '<name>_dim<i>'."""
    return [d.get_length() if d.is_static else f"{name}_dim{i}" for i, d in enumerate(partial_shape)]


def _numpy_dtype(element_type) -> np.dtype | None:
    try:
        return np.dtype(element_type.to_dtype())
    except (TypeError, AttributeError, RuntimeError):
        return None
