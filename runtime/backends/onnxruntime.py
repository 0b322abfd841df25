"""ONNX Runtime backend: provider probing, `SessionLoader` and `OnnxRuntimeRunner`.

onnxruntime is imported inside functions only, so `import runtime.backends` works on a
machine that has another engine but no onnxruntime.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import ArtifactError, BackendUnavailable, H2TRuntimeError
from .base import BatchProfile, Dim, InputSpec, LeasedModel, Loader, ModelBytes, Runner, external_data_error

# Most preferred first; CPU always works and comes last.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# ORT's own default logger severity (WARNING); it has no getter, so this is what we restore.
_ORT_DEFAULT_LOG_SEVERITY = 2
_ORT_SILENT = 4  # FATAL only
_ORT_ERRORS_ONLY = 3

# int8 graphs multiply uint8 activations by int8 weights. On x86 CPUs without VNNI (AVX2, AVX-512
# without VNNI) ONNX Runtime's fast u8s8 kernels add pairs of products in saturating int16, which
# full-range int8 weights overflow: on an AVX2 CPU a task graph's int8 logits moved by 0.29 from
# fp32 where a VNNI CPU moved them by 0.04. This session option makes ORT run those products as
# u8u8 on such CPUs (0.04 again; tested); VNNI CPUs and fp32 graphs are unaffected.
_ORT_X64_QUANT_PRECISION = ("session.x64quantprecision", "1")

# A serialized ONNX model `y = Identity(x)`, x: float32[1] (opset 13, IR 7), used to probe
# providers without needing the `onnx` package on the device. Built with onnx.helper
# (make_graph/make_model, producer 'h2t-edge'); tests/runtime rebuild it and compare.
PROBE_MODEL = (
    b"\x08\x07\x12\x08h2t-edge:;\n\x10\n\x01x\x12\x01y\"\x08Identity\x12\x05probeZ\x0f\n\x01x"
    b"\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02"
    b"\x08\x01B\x04\n\x00\x10\r"
)

# ORT's tensor type strings -> numpy dtypes, for feed validation.
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}

ModelSource = Union[str, os.PathLike, bytes, ModelBytes, LeasedModel]

# A graph given as bytes has no folder of its own, and ONNX Runtime would resolve its external data files
# against the working directory, where no digest covers them: point it at an empty private folder
# instead, so any external reference fails (at no cost to graphs without one).
_EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


@functools.cache
def _empty_folder() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="h2t-no-external-data-")  # 0700, ours, never written to


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(
            f"the onnxruntime backend needs the 'onnxruntime' package ({exc}); "
            "install onnxruntime (CPU) or onnxruntime-gpu"
        ) from None
    return onnxruntime


@contextlib.contextmanager
def _silenced_output() -> Iterator[None]:
    """Silence stdout and stderr, at the file-descriptor level too: failing EPs print from
    C++ (fd 2) and from onnxruntime's Python fallback code (`print`, stdout)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None under pythonw
            stream.flush()
    saved = {}
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):  # a closed fd has nothing to silence
                saved[fd] = os.dup(fd)
                os.dup2(devnull, fd)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


@functools.cache
def _provider_initializes(provider: str) -> bool:
    """True if a session with only `provider` really runs on it here.

    The onnxruntime-gpu wheel lists TensorRT and CUDA even where their libraries are missing
    and then silently falls back to CPU, so listing is not enough: build a tiny session.
    """
    ort = _import_onnxruntime()
    if provider not in ort.get_available_providers():
        return False
    options = ort.SessionOptions()
    options.log_severity_level = _ORT_SILENT
    ort.set_default_logger_severity(_ORT_SILENT)
    try:
        with _silenced_output():
            session = ort.InferenceSession(PROBE_MODEL, sess_options=options, providers=[provider])
            return session.get_providers()[0] == provider
    except Exception:  # noqa: BLE001 - any failure to build the session means "not usable"
        return False
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)


def available_providers() -> list[str]:
    """ONNX Runtime providers that actually initialize here, most preferred first
    (TensorRT, CUDA, CPU). Probing prints nothing; each probe's result is cached."""
    # A fresh list each call, so a caller editing it cannot change the cached answer.
    return [p for p in PROVIDER_PREFERENCE if _provider_initializes(p)]


def tensorrt_ep_options(
    inputs: Mapping[str, Sequence[int]] | None = None,
    profile: BatchProfile | None = None,
    fp16: bool = False,
    cache_dir: Union[str, os.PathLike, None] = None,
    timing_cache: bool = True,
) -> dict[str, str]:
    """Provider options of ONNX Runtime's TensorRT EP, for `SessionLoader(provider_options=
    {'TensorrtExecutionProvider': ...})`.

    inputs: input name -> per-sample shape (e.g. {'images': (3, 224, 224)}); with `profile`,
        the engine is built once for batch sizes profile.min..max instead of once per new shape.
    fp16: let TensorRT pick fp16 kernels (the EP's builder flag).
    cache_dir: keep built engines (and the timing cache) there; the EP rebuilds when the model,
        the TensorRT version or the GPU changes.
    """
    options: dict[str, str] = {"trt_fp16_enable": str(bool(fp16))}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        options |= {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir)}
        if timing_cache:
            options |= {"trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache_dir)}
    elif timing_cache:
        options["trt_timing_cache_enable"] = "True"
    if profile is not None:
        if not inputs:
            raise ValueError("a batch profile needs `inputs` (name -> per-sample shape)")
        for key, index in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1), ("trt_profile_max_shapes", 2)):
            options[key] = ",".join(
                f"{name}:{'x'.join(map(str, profile.shapes(shape)[index]))}" for name, shape in inputs.items()
            )
    return options


class SessionLoader:
    """Lazily builds an `onnxruntime.InferenceSession` (a Polygraphy-style loader).

    model: path to an .onnx file, the serialized model bytes, a leased file (`LeasedModel`: the
        session opens the leased inode) or verified `ModelBytes` (handed to
        ONNX Runtime as they are: the path is not opened again).
    providers: 'auto' (every provider that initializes, best first) or explicit names.
    intra_op_threads: threads per operator (None: ORT's default, one per physical core).
    provider_options: provider name -> its options dict (e.g. {'CUDAExecutionProvider':
        {'device_id': 1}}).
    """

    def __init__(
        self,
        model: ModelSource,
        providers: Union[str, Sequence[str]] = "auto",
        intra_op_threads: int | None = None,
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.model = model
        if isinstance(providers, str) and providers != "auto":
            providers = [providers]  # a single name is a common slip; accept it
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.provider_options = dict(provider_options or {})

    @property
    def model_name(self) -> str:
        if isinstance(self.model, (ModelBytes, LeasedModel)):
            return self.model.source
        return "<in-memory model>" if isinstance(self.model, bytes) else str(self.model)

    def resolve_providers(self) -> list[str]:
        """The provider list the session will get; raises BackendUnavailable for an explicit
        provider that does not initialize here."""
        if self.providers == "auto":
            return available_providers()
        requested = list(self.providers)
        unusable = [p for p in requested if not _provider_initializes(p)]
        if unusable:
            raise BackendUnavailable(
                f"ONNX Runtime provider(s) {unusable} requested for {self.model_name} do not "
                f"initialize on this machine; available: {available_providers()}. "
                "Use providers='auto' or pick one of those"
            )
        return requested

    def __call__(self):
        """Build and return the `onnxruntime.InferenceSession`."""
        ort = _import_onnxruntime()
        checked = isinstance(self.model, (ModelBytes, LeasedModel))
        if not checked and not isinstance(self.model, bytes) and not Path(self.model).is_file():
            raise ArtifactError(f"ONNX model {self.model} does not exist; check the path")
        providers = self.resolve_providers()
        options = ort.SessionOptions()
        # Warnings such as "some nodes were not assigned to the preferred provider" are
        # expected on edge devices; keep the console for errors.
        options.log_severity_level = _ORT_ERRORS_ONLY
        options.add_session_config_entry(*_ORT_X64_QUANT_PRECISION)
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = int(self.intra_op_threads)
        model = (self.model.data if isinstance(self.model, ModelBytes) else self.model.path
                 if isinstance(self.model, LeasedModel) else self.model if isinstance(self.model, bytes)
                 else str(self.model))
        if isinstance(model, bytes) or isinstance(self.model, LeasedModel):
            options.add_session_config_entry(_EXTERNAL_DATA_FOLDER, _empty_folder())
        provider_specs = [(p, dict(self.provider_options.get(p, {}))) for p in providers]
        try:
            session = ort.InferenceSession(model, sess_options=options, providers=provider_specs)
        except Exception as exc:  # ORT raises its own pybind exception types for bad models
            if checked:
                self.model.confirm()  # bytes that fail their digest are refused as such, not as a bad graph
            if "External data path" in str(exc):
                raise external_data_error(self.model_name) from None
            raise ArtifactError(
                f"ONNX Runtime cannot load model {self.model_name}: {exc}; "
                "the file is corrupt or not an ONNX model, re-create it"
            ) from None
        if checked:
            self.model.confirm()  # parsed while the digest was computed; nothing runs before it matches
        return session


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model with ONNX Runtime.

    loader_or_session: a Loader (e.g. `SessionLoader`) called on `activate`, or an
    already-built `onnxruntime.InferenceSession`.
    """

    def __init__(self, loader_or_session: Union[Loader, Any]):
        self._source = loader_or_session
        self._session = None

    def activate(self) -> None:
        if self._session is not None:
            return
        # A session has `run`; anything else is a loader to call.
        self._session = self._load(self._source, lambda s: hasattr(s, "run") and hasattr(s, "get_inputs"))

    def deactivate(self) -> None:
        self._session = None
        self._forget_specs()

    @property
    def session(self):
        if self._session is None:
            raise H2TRuntimeError("OnnxRuntimeRunner is not active; use it as `with runner: ...`")
        return self._session

    @property
    def provider(self) -> str:
        """The execution provider in use, e.g. 'CUDAExecutionProvider'."""
        return self.session.get_providers()[0]

    @property
    def name(self) -> str:
        return f"onnxruntime[{self.provider}]"

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def input_shapes(self) -> dict[str, list[Dim]]:
        return {
            i.name: [d if isinstance(d, (int, str)) else "?" for d in i.shape]
            for i in self.session.get_inputs()
        }

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on `feed` (input name -> array of the model's exact dtype and rank).

        Raises ArtifactError when names, dtype or static dimensions do not match the model
        (see `check_feed`).
        """
        self._check_feed(feed)
        names = self.output_names
        return dict(zip(names, self.session.run(names, feed)))

    def _input_specs(self) -> dict[str, InputSpec]:
        shapes = self.input_shapes()
        return {i.name: InputSpec(_ORT_DTYPES.get(i.type), shapes[i.name]) for i in self.session.get_inputs()}
