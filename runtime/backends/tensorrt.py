"""Native TensorRT backend: `EngineLoader` (build or load a cached engine) and `TensorRTRunner`.

Works with both API generations:
- TensorRT 10 (what JetPack ships): fp32 graph + builder flags; FP16 by flag, INT8 by flag with an
  entropy calibrator fed by task images (or by the graph's own Q/DQ nodes where it has them).
- TensorRT 11 (no precision flags, no calibrators): strongly typed networks; the precision is in
  the ONNX itself (fp16 by `exporters.quantize.convert_to_fp16`, int8 by explicit Q/DQ from
  `exporters.quantize.quantize_int8_qdq(target='tensorrt')`); `h2t-edge build-engine` prepares it.

Engines are cached under a key of ONNX sha256, TensorRT version, GPU name, precision and batch
profile; an engine whose recorded key differs (stale or foreign) is rebuilt, never loaded. Every
file is read once and deserialized or parsed from the bytes that were checked; with trusted keys
the cache accepts only engines whose record a trusted key signed (like every other loader).
tensorrt and cuda-python are imported inside functions only (optional extra `[tensorrt]`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import ArtifactError, BackendUnavailable, H2TRuntimeError
from ..io import atomic_write_bytes, atomic_write_json, read_json
from ..trust import SigningKey, TrustedKeys, file_digest, read_file, read_verified, seal, verify_seal
from .base import BatchProfile, Dim, InputSpec, Loader, ModelBytes, Runner

INSTALL_HINT = "pip install 'h2t-edge[tensorrt]' (and cuda-python) on a machine with an NVIDIA GPU"
PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_FORMAT = "h2t-edge/tensorrt-engine"
ENGINE_RECORD_VERSION = 3  # sealed (runtime.trust), engine_blake3; version 2 had engine_sha256, 1 no seal


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"the tensorrt backend needs the 'tensorrt' package ({exc}); {INSTALL_HINT}") from None
    return tensorrt


def _import_cudart():
    """The CUDA runtime API as the TensorRT Python samples use it (cuda-python)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BackendUnavailable(f"the tensorrt backend needs 'cuda-python' ({exc}); {INSTALL_HINT}") from None
    return cudart


def _cuda(result):
    """Unwrap a cuda-python call's (error, *values) tuple, raising on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendUnavailable(f"CUDA call failed: {err}; check the GPU and driver (nvidia-smi)")
    return values[0] if len(values) == 1 else values


def tensorrt_version() -> str:
    return _import_tensorrt().__version__


def gpu_name(device: int = 0) -> str:
    cudart = _import_cudart()
    props = _cuda(cudart.cudaGetDeviceProperties(device))
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00").strip()


# -- cache keys ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Two engines are interchangeable only if keys are equal."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    precision: str
    profile: BatchProfile

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "profile": self.profile.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineKey":
        return cls(d["onnx_sha256"], d["tensorrt_version"], d["gpu_name"], d["precision"], BatchProfile(**d["profile"]))

    def digest(self) -> str:
        """A short stable name for files: sha256 of the canonical JSON of the key."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def timing_digest(self) -> str:
        """Timing caches are valid across models, but not across TensorRT versions or GPUs."""
        return hashlib.sha256(f"{self.tensorrt_version}|{self.gpu_name}".encode()).hexdigest()[:16]


class EngineCache:
    """A folder of engines `<digest>.engine`, each with `<digest>.json` recording its EngineKey,
    plus timing caches `timing-<digest>.cache` shared by builds on the same TensorRT and GPU.

    trusted_keys (plus $H2T_EDGE_TRUSTED_KEYS): `lookup` returns only engines whose sealed record one
    of them signed; signing_key: `store` signs the records it writes (a device that trusts keys can
    then reuse its own builds)."""

    def __init__(self, root: Union[str, os.PathLike], *,
                 trusted_keys: "TrustedKeys | Sequence[str | os.PathLike] | None" = None,
                 signing_key: SigningKey | None = None):
        self.root = Path(root)
        self.trusted = TrustedKeys.resolve(trusted_keys)
        self.signing_key = signing_key

    def engine_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.digest()}.engine"

    def timing_cache_path(self, key: EngineKey) -> Path:
        return self.root / f"timing-{key.timing_digest()}.cache"

    def lookup(self, key: EngineKey) -> Optional[bytes]:
        """The cached engine for `key` (its bytes, read once and checked), or None when there is none,
        its record does not match, is not sealed, or (with trusted keys) is not signed by one of them:
        a stale, foreign or planted engine is never returned; the caller rebuilds and overwrites it."""
        path = self.engine_path(key)
        record = path.with_suffix(".json")
        if not (path.is_file() and record.is_file()):
            return None
        try:
            stored = read_json(record, "engine record")
            if not isinstance(stored, dict) or stored.get("version") != ENGINE_RECORD_VERSION:
                return None
            verify_seal(stored, record, fix="rebuild the engine", trusted=self.trusted)
            if stored.get("format") != ENGINE_FORMAT or EngineKey.from_dict(stored["key"]) != key:
                return None
            return read_verified(path, stored.get("engine_blake3"), field="engine_blake3", descriptor=record,
                                 fix="rebuild the engine", what="engine")
        except (H2TRuntimeError, KeyError, TypeError, ValueError, AttributeError):
            return None

    def store(self, key: EngineKey, engine: bytes) -> Path:
        path = self.engine_path(key)
        atomic_write_bytes(path, engine)
        # The record is written last: an engine without a matching record is never loaded.
        write_engine_record(path, key, engine, signing_key=self.signing_key)
        return path


def write_engine_record(engine_path: Union[str, os.PathLike], key: EngineKey, engine: bytes | None = None, *,
                        signing_key: SigningKey | None = None, **extra: Any) -> Path:
    """Write `ENGINE.json` next to an engine: its key and BLAKE3 (of `engine`, the bytes written; read
    from the file when not given), plus `extra`, e.g. how it was built; sealed (runtime.trust) and
    signed with `signing_key`, so an edited record (precision, onnx_sha256...) is refused."""
    engine_path = Path(engine_path)
    if engine is None:
        engine = read_file(engine_path, what="engine", fix="build it again")
    return atomic_write_json(engine_path.with_suffix(".json"), seal({
        "format": ENGINE_FORMAT, "version": ENGINE_RECORD_VERSION, "key": key.to_dict(),
        "engine_blake3": file_digest(engine), **extra,
    }, signing_key))


def check_engine_key(stored: Any, source: Union[str, os.PathLike], current_version: str,
                     current_gpu: str) -> EngineKey:
    """The EngineKey in a verified record or engine sidecar, after checking it was built for this
    TensorRT and GPU."""
    try:
        key = EngineKey.from_dict(stored["key"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"engine record {source}: field 'key' is malformed ({exc}); rebuild the engine") from None
    if (key.tensorrt_version, key.gpu_name) != (current_version, current_gpu):
        raise ArtifactError(
            f"the engine of {source} was built with TensorRT {key.tensorrt_version} on '{key.gpu_name}', this "
            f"machine has TensorRT {current_version} on '{current_gpu}'; rebuild it here from the ONNX "
            f"with `h2t-edge build-engine`"
        )
    return key


def check_engine_record(engine_path: Union[str, os.PathLike], current_version: str, current_gpu: str,
                        trusted_keys: "TrustedKeys | Sequence[str | os.PathLike] | None" = None) -> EngineKey:
    """The key of a prebuilt engine file, after the checks of `read_engine`."""
    return read_engine(engine_path, current_version, current_gpu, trusted_keys)[0]


def read_engine(engine_path: Union[str, os.PathLike], current_version: str, current_gpu: str,
                trusted_keys: "TrustedKeys | Sequence[str | os.PathLike] | None" = None) -> tuple[EngineKey, bytes]:
    """The key of a prebuilt engine file and its bytes (read once, checked against the record), after
    checking the record's seal (and signature, with trusted keys) and that it was built for this
    TensorRT and GPU."""
    engine_path = Path(engine_path)
    record = engine_path.with_suffix(".json")
    if not record.is_file():
        raise ArtifactError(f"engine {engine_path} has no record {record.name}; rebuild it with `h2t-edge build-engine`")
    stored = read_json(record, "engine record")
    if not isinstance(stored, dict):
        raise ArtifactError(f"engine record {record} must hold a JSON object; rebuild the engine")
    fix = "rebuild the engine with `h2t-edge build-engine`"
    verify_seal(stored, f"engine record {record}", fix=fix, trusted=TrustedKeys.resolve(trusted_keys))
    key = check_engine_key(stored, record, current_version, current_gpu)
    field = "engine_sha256" if stored.get("version") == 2 else "engine_blake3"
    return key, read_verified(engine_path, stored.get(field), field=field, descriptor=record, fix=fix, what="engine")


# -- building -----------------------------------------------------------------------------------

class EngineLoader:
    """Builds (or loads from `cache_dir`) a serialized TensorRT engine (a Polygraphy-style loader).

    model: an .onnx file (built, or loaded from the cache), an .engine file with its .json record
        (loaded if it was built for this TensorRT version and GPU), or verified `ModelBytes` (an
        engine, whose descriptor's key is checked against this TensorRT and GPU, or ONNX to build).
        Every file is read once; the engine is deserialized from the bytes that were checked.
    precision: 'fp32', 'fp16' or 'int8'. On TensorRT 10 these are builder flags (int8 calibrates
        on `calibration` unless the graph carries Q/DQ nodes); on TensorRT 11 the ONNX must already
        hold the precision (see module doc) and the label only keys the cache.
    profile: the batch sizes (min/opt/max) for the dynamic batch axis of every input.
    calibration: float32[b, 3, H, W] batches of task images, for TensorRT 10 int8.
    cache_dir: where engines and timing caches are kept (None: build every time).
    trusted_keys / signing_key: the cache's (`EngineCache`) and an .engine record's trusted keys, and
        the key that signs the cache records this writes.
    """

    def __init__(
        self,
        model: Union[str, os.PathLike, ModelBytes],
        precision: str = "fp32",
        profile: BatchProfile | None = None,
        calibration: Sequence[np.ndarray] | None = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        workspace_bytes: int | None = None,
        trusted_keys: "TrustedKeys | Sequence[str | os.PathLike] | None" = None,
        signing_key: SigningKey | None = None,
    ):
        if precision not in PRECISIONS:
            raise BackendUnavailable(f"TensorRT precision {precision!r} is not one of {PRECISIONS}")
        self.model = model if isinstance(model, ModelBytes) else Path(model)
        self.precision = precision
        self.profile = profile or BatchProfile()
        self.calibration = list(calibration) if calibration is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.workspace_bytes = workspace_bytes
        self.trusted_keys, self.signing_key = trusted_keys, signing_key
        self.key: EngineKey | None = None
        self.built = False  # True when the last call built rather than loaded

    def engine_key(self, onnx: bytes) -> EngineKey:
        return EngineKey(hashlib.sha256(onnx).hexdigest(), tensorrt_version(), gpu_name(), self.precision,
                         self.profile)

    def _source(self) -> tuple[str, bytes]:
        """(kind, bytes) of the model, each file read once: an engine checked against its record, or ONNX."""
        if isinstance(self.model, ModelBytes):
            # An engine is deserialized (and ONNX built) from checked bytes only: no overlap here.
            self.model.confirm()
            self.model.refuse_external_data()
            if self.model.kind == "engine":
                self.key = check_engine_key(self.model.record or {}, self.model.source, tensorrt_version(), gpu_name())
            return self.model.kind, self.model.data
        if not self.model.is_file():
            raise ArtifactError(f"model {self.model} does not exist; check the path")
        if self.model.suffix in (".engine", ".plan"):
            self.key, data = read_engine(self.model, tensorrt_version(), gpu_name(), self.trusted_keys)
            return "engine", data
        model = ModelBytes(read_file(self.model, what="ONNX model", fix="check the path"), str(self.model))
        model.refuse_external_data()
        return "onnx", model.data

    def __call__(self) -> bytes:
        """The serialized engine (bytes)."""
        kind, data = self._source()
        if kind == "engine":
            self.built = False
            return data
        key = self.key = self.engine_key(data)
        cache = (EngineCache(self.cache_dir, trusted_keys=self.trusted_keys, signing_key=self.signing_key)
                 if self.cache_dir is not None else None)
        if cache is not None and (engine := cache.lookup(key)) is not None:
            self.built = False
            return engine
        timing_path = cache.timing_cache_path(key) if cache is not None else None
        source = self.model.source if isinstance(self.model, ModelBytes) else str(self.model)
        engine = build_engine(data, self.precision, self.profile, self.calibration, timing_path,
                              self.workspace_bytes, source=source)
        self.built = True
        if cache is not None:
            cache.store(key, engine)
        return engine


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def build_engine(
    onnx: Union[str, os.PathLike, bytes],
    precision: str = "fp32",
    profile: BatchProfile | None = None,
    calibration: Sequence[np.ndarray] | None = None,
    timing_cache: Union[str, os.PathLike, None] = None,
    workspace_bytes: int | None = None,
    source: str | None = None,
) -> bytes:
    """Parse `onnx` (a path, or the ONNX bytes, read from `source`) and build a serialized engine with
    a batch optimization profile. Bytes are parsed as they are: nothing is read again."""
    onnx_path = source or ("<in-memory ONNX>" if isinstance(onnx, bytes) else str(onnx))
    trt = _import_tensorrt()
    profile = profile or BatchProfile()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = _major(trt) >= 11
    # TensorRT 11 networks are always strongly typed; 10 is weakly typed unless asked.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not (parser.parse(onnx) if isinstance(onnx, bytes) else parser.parse_from_file(str(onnx))):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(
            f"TensorRT cannot parse {onnx_path}: {errors}. Run `h2t-edge check --tensorrt {onnx_path}` for the nodes to fix"
        )
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        sample = list(tensor.shape)[1:]
        if any(d < 0 for d in sample):
            raise ArtifactError(
                f"{onnx_path}: input '{tensor.name}' has dynamic dimensions {list(tensor.shape)} besides the "
                "batch; the engine's profile covers only the batch axis. Export with a fixed image size"
            )
        opt_profile.set_shape(tensor.name, *profile.shapes(sample))
    config.add_optimization_profile(opt_profile)

    has_qdq = any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers))
    if not strongly_typed:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # int8 engines run their non-int8 layers in fp16
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if not has_qdq:
                if not calibration:
                    raise ArtifactError(
                        f"an int8 engine of {onnx_path} needs calibration images (--calib DIR) or Q/DQ nodes"
                    )
                config.int8_calibrator = _entropy_calibrator(trt, calibration)
                config.set_calibration_profile(opt_profile)
    elif precision == "int8" and not has_qdq:
        raise ArtifactError(
            f"TensorRT {trt.__version__} builds int8 only from explicit Q/DQ nodes and {onnx_path} has none; "
            "make the int8 graph with `h2t-edge build-engine --backend tensorrt --precision int8 --calib DIR`"
        )

    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {onnx_path} ({precision}); see the log above")
    if cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _entropy_calibrator(trt, batches: Sequence[np.ndarray]):
    """An IInt8EntropyCalibrator2 that feeds `batches` (all of one batch size) from device memory."""
    cudart = _import_cudart()
    size = len(batches[0])
    usable = [np.ascontiguousarray(b, dtype=np.float32) for b in batches if len(b) == size]

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.index = 0
            self.device = _cuda(cudart.cudaMalloc(usable[0].nbytes))
            self.cache: bytes | None = None

        def get_batch_size(self) -> int:
            return size

        def get_batch(self, names):
            if self.index >= len(usable):
                _cuda(cudart.cudaFree(self.device))
                return None
            batch = usable[self.index]
            self.index += 1
            _cuda(cudart.cudaMemcpy(self.device, batch.ctypes.data, batch.nbytes,
                                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            return [int(self.device)]

        def read_calibration_cache(self):
            return self.cache

        def write_calibration_cache(self, cache) -> None:
            self.cache = bytes(cache)

    return EntropyCalibrator()


# -- running ------------------------------------------------------------------------------------

class TensorRTRunner(Runner):
    """Runs a TensorRT engine with device buffers (cuda-python); numpy in, numpy out.

    loader_or_engine: a Loader returning serialized engine bytes (e.g. `EngineLoader`), or bytes.
    """

    def __init__(self, loader_or_engine: Union[Loader, bytes]):
        self._source = loader_or_engine
        self._engine = None
        self._context = None
        self._stream = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def activate(self) -> None:
        if self._engine is not None:
            return
        trt, cudart = _import_tensorrt(), _import_cudart()
        data = self._load(self._source, lambda s: isinstance(s, (bytes, bytearray)))
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise ArtifactError("TensorRT could not deserialize the engine; rebuild it for this TensorRT version")
        self._context = self._engine.create_execution_context()
        self._stream = _cuda(cudart.cudaStreamCreate())
        self._trt = trt

    def deactivate(self) -> None:
        if self._engine is None:
            return
        cudart = _import_cudart()
        for pointer, _ in self._buffers.values():
            cudart.cudaFree(pointer)
        self._buffers.clear()
        cudart.cudaStreamDestroy(self._stream)
        self._engine = self._context = self._stream = None
        self._forget_specs()

    @property
    def engine(self):
        if self._engine is None:
            raise H2TRuntimeError("TensorRTRunner is not active; use it as `with runner: ...`")
        return self._engine

    def _names(self, mode) -> list[str]:
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return [n for n in names if engine.get_tensor_mode(n) == mode]

    @property
    def name(self) -> str:
        return f"tensorrt[{self._trt.__version__}]" if self._engine is not None else "tensorrt"

    @property
    def input_names(self) -> list[str]:
        return self._names(self._trt.TensorIOMode.INPUT)

    @property
    def output_names(self) -> list[str]:
        return self._names(self._trt.TensorIOMode.OUTPUT)

    def input_shapes(self) -> dict[str, list[Dim]]:
        return {n: [d if d >= 0 else f"{n}_dim{i}" for i, d in enumerate(self.engine.get_tensor_shape(n))]
                for n in self.input_names}

    def _input_specs(self) -> dict[str, InputSpec]:
        shapes = self.input_shapes()
        return {n: InputSpec(np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(n))), shapes[n])
                for n in self.input_names}

    def _device_buffer(self, name: str, nbytes: int) -> int:
        cudart = _import_cudart()
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:  # grow only; a smaller batch reuses the buffer
            if pointer:
                _cuda(cudart.cudaFree(pointer))
            pointer = _cuda(cudart.cudaMalloc(nbytes))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart, engine, context = self._trt, _import_cudart(), self.engine, self._context
        self._check_feed(feed)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in feed.items():
            array = np.ascontiguousarray(array)
            if not context.set_input_shape(name, array.shape):
                raise ArtifactError(
                    f"input '{name}' shape {list(array.shape)} is outside the engine's batch profile; "
                    "rebuild it with a larger --max-batch"
                )
            pointer = self._device_buffer(name, array.nbytes)
            _cuda(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, h2d, self._stream))
            context.set_tensor_address(name, pointer)
        outputs = {}
        for name in self.output_names:
            host = np.empty(tuple(context.get_tensor_shape(name)), dtype=trt.nptype(engine.get_tensor_dtype(name)))
            context.set_tensor_address(name, self._device_buffer(name, host.nbytes))
            outputs[name] = host
        if not context.execute_async_v3(self._stream):
            raise ArtifactError("TensorRT execution failed; check the input shapes against the engine's profile")
        for name, host in outputs.items():
            _cuda(cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name][0], host.nbytes, d2h, self._stream))
        _cuda(cudart.cudaStreamSynchronize(self._stream))
        return outputs
