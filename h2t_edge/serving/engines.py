"""`build_engine`: an optimized model or engine from an exported or compiled ONNX graph, with a
JSON sidecar saying how it was built (source sha256, backend, precision, calibration, versions).

| backend     | fp32 | fp16 | bf16 | int8 |
|-------------|------|------|------|------|
| onnxruntime | -    | fp16 ONNX (norm + head fp32) | - | QDQ ONNX, calibrated (CPU kernels) |
| openvino    | IR   | IR, f16 weights | IR + bf16 hint | - |
| tensorrt    | engine | TRT 10: flag; 11: fp16 ONNX | - | TRT 10: calibrator; 11: QDQ ONNX |

The sidecar is `OUT.json`. For a task graph it is the task's own sidecar (so `Predictor` loads the
result as it loads the task) with a "build" entry added; otherwise it holds only "build".
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from h2t_edge import __version__
from h2t_edge.core.errors import H2TEdgeError
from h2t_edge.core.sidecar import sign
from h2t_edge.steps.extract import LAYOUT_KEY, read_layout
from runtime.backends.base import BatchProfile
from runtime.errors import ArtifactError
from runtime.io import atomic_write_json, file_sha256, read_json
from runtime.predictor import read_task_sidecar
from runtime.preprocess import PreprocessConfig
from runtime.trust import SigningKey, file_digest

BUILD_FORMAT = "h2t-edge/engine-build"
SUFFIX = {"onnxruntime": ".onnx", "openvino": ".xml", "tensorrt": ".engine"}
SUPPORTED = {
    "onnxruntime": ("fp16", "int8"),
    "openvino": ("fp32", "fp16", "bf16"),
    "tensorrt": ("fp32", "fp16", "int8"),
}


class EngineBuildError(H2TEdgeError):
    """A build that cannot be done: an unsupported backend/precision pair, or missing inputs."""


@dataclass
class EngineReport:
    path: Path
    sidecar: Path
    build: dict

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in artifact_files(self.path))


def artifact_files(path: Path) -> list[Path]:
    """The files of one artifact (an OpenVINO IR is .xml + .bin)."""
    return [p for p in (path, path.with_suffix(".bin")) if p.is_file()] if path.suffix == ".xml" else [path]


def default_output(graph: Path, backend: str, precision: str) -> Path:
    return graph.with_name(f"{graph.stem}.{backend}.{precision}{SUFFIX[backend]}")


def graph_preprocess(graph: Path) -> PreprocessConfig:
    """The preprocessing a graph expects: from its task sidecar, else from its layout metadata."""
    sidecar = graph.with_suffix(".json")
    if sidecar.is_file():
        data = read_json(sidecar, "task sidecar")
        if isinstance(data, dict) and "preprocess" in data:
            return PreprocessConfig.from_dict(data["preprocess"], source=str(sidecar))
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    if LAYOUT_KEY not in meta:
        raise EngineBuildError(
            f"{graph} has neither a task sidecar {sidecar.name} nor a feature layout in its metadata, so the "
            "calibration images cannot be preprocessed; keep the sidecar next to the graph"
        )
    return PreprocessConfig.from_dict(read_layout(graph)["preprocess"], source=f"{graph} layout")


def build_engine(
    graph: str | os.PathLike,
    backend: str = "onnxruntime",
    precision: str = "int8",
    output: str | os.PathLike | None = None,
    calib: str | os.PathLike | None = None,
    calib_limit: int = 64,
    max_batch: int = 32,
    cache_dir: str | os.PathLike | None = None,
    signing_key: SigningKey | None = None,
) -> EngineReport:
    """Build `graph` for `backend` at `precision` into `output` (default: next to the graph,
    `STEM.BACKEND.PRECISION.EXT`) and write its sidecar (sealed; signed with `signing_key` when
    given). `calib` is a folder of task images (int8 only); at most `calib_limit` of them are used.
    A task graph is checked against its sidecar before anything is built from it."""
    graph = Path(graph)
    if not graph.is_file():
        raise EngineBuildError(f"graph {graph} does not exist; pass an exported backbone or compiled task .onnx")
    if backend not in SUPPORTED:
        raise EngineBuildError(f"backend {backend!r} is not one of {sorted(SUPPORTED)}")
    if precision not in SUPPORTED[backend]:
        raise EngineBuildError(
            f"{backend} builds {', '.join(SUPPORTED[backend])}, not {precision}"
            + ("; an fp32 ONNX graph runs on onnxruntime as it is" if backend == "onnxruntime" else "")
        )
    if precision == "int8" and calib is None:
        raise EngineBuildError("--precision int8 needs calibration images: pass --calib DIR (a folder of task images)")
    output = Path(output) if output is not None else default_output(graph, backend, precision)
    output.parent.mkdir(parents=True, exist_ok=True)
    batches = []
    if calib is not None:
        from runtime.calibration import calibration_batches

        batches = calibration_batches(calib, graph_preprocess(graph), batch_size=8, limit=calib_limit)
    start = time.perf_counter()
    build = {"backend": backend, "precision": precision}
    if backend == "onnxruntime":
        build |= _build_onnxruntime(graph, output, precision, batches)
    elif backend == "openvino":
        build |= _build_openvino(graph, output, precision)
    else:
        build |= _build_tensorrt(graph, output, precision, batches, BatchProfile.up_to(max_batch), cache_dir)
    build |= {
        "source": str(graph.resolve()),
        "source_sha256": file_sha256(graph),
        "artifact": output.name,
        "artifact_blake3": file_digest(output.read_bytes()),
        **({"weights_blake3": file_digest(output.with_suffix(".bin").read_bytes())} if output.suffix == ".xml" else {}),
        "calibration": {"images": sum(len(b) for b in batches), "source": str(calib)} if batches else None,
        "seconds": round(time.perf_counter() - start, 2),
        "versions": {"h2t-edge": __version__, "python": platform.python_version(), **build.pop("versions", {})},
    }
    sidecar = _write_sidecar(graph, output, build, signing_key)
    return EngineReport(output, sidecar, build)


def _write_sidecar(graph: Path, output: Path, build: dict, signing_key: SigningKey | None = None) -> Path:
    """OUTPUT.json: the task sidecar of GRAPH (checked, as the runtime checks it) with the build
    record added, sealed again (signed with `signing_key` when given): the engine's own sidecar."""
    task_sidecar = graph.with_suffix(".json")
    if task_sidecar.is_file():
        try:
            read_task_sidecar(graph, task_sidecar)  # build only from a graph that is what its sidecar says
        except ArtifactError as exc:
            raise EngineBuildError(str(exc)) from exc
        data = read_json(task_sidecar, "task sidecar")
    else:
        data = {"format": BUILD_FORMAT, "version": 1}
    sidecar = output.with_suffix(".json")
    # An engine's own record (key + checksum, written by the builder) shares the name: keep it.
    if sidecar.is_file() and output.suffix == ".engine":
        record = read_json(sidecar, "engine record")
        data = {**data, "key": record["key"], "engine_blake3": record["engine_blake3"]}
    # the engine is checked by build.artifact_blake3
    data = {k: v for k, v in data.items() if k not in ("graph_sha256", "graph_blake3")}
    data = {**data, "build": build}
    sign(data, signing_key)  # every engine sidecar is sealed; a task sidecar's copy gets a new seal
    return atomic_write_json(sidecar, data)


def _build_onnxruntime(graph: Path, output: Path, precision: str, batches) -> dict:
    import onnx
    import onnxruntime

    from exporters.quantize import convert_to_fp16, fp32_region, quantize_int8_qdq

    if precision == "int8":
        report = quantize_int8_qdq(graph, output, batches, target="cpu")
        info = {"quantized_nodes": report.quantized_nodes, "op_types": list(report.op_types),
                "method": "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, min/max"}
    else:
        model = onnx.load(str(graph))
        kept = sorted(fp32_region(model))
        onnx.save(convert_to_fp16(model, set(kept)), str(output))
        info = {"fp32_nodes": len(kept), "method": "fp16 ONNX; L2 normalization and head kept in fp32"}
    return {**info, "versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}}


def _build_openvino(graph: Path, output: Path, precision: str) -> dict:
    from runtime.backends.openvino import _import_openvino

    ov = _import_openvino()
    model = ov.convert_model(str(graph))
    ov.save_model(model, str(output), compress_to_fp16=precision == "fp16")
    return {"hint": {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}[precision],
            "method": "OpenVINO IR; run it with --backend openvino --precision " + precision,
            "versions": {"openvino": ov.__version__}}


def _build_tensorrt(graph: Path, output: Path, precision: str, batches, profile: BatchProfile, cache_dir) -> dict:
    from runtime.backends import tensorrt as trt_backend

    trt = trt_backend._import_tensorrt()
    strongly_typed = int(trt.__version__.split(".")[0]) >= 11
    source, method = graph, f"TensorRT {trt.__version__} builder flags"
    if strongly_typed and precision != "fp32":
        # TensorRT 11: the precision must be in the ONNX; prepare it beside the output.
        import onnx

        from exporters.quantize import convert_to_fp16, quantize_int8_qdq

        source = output.with_suffix(f".{precision}.onnx")
        if precision == "fp16":
            onnx.save(convert_to_fp16(graph), str(source))
            method = "strongly typed; fp16 ONNX with L2 normalization and head in fp32"
        else:
            quantize_int8_qdq(graph, source, batches, target="tensorrt")
            method = "strongly typed; explicit Q/DQ (symmetric int8), calibrated by ONNX Runtime"
    elif precision == "int8":
        method += "; INT8 with IInt8EntropyCalibrator2 on task images"
    loader = trt_backend.EngineLoader(source, precision, profile, batches or None, cache_dir)
    engine = loader()
    output.write_bytes(engine)
    trt_backend.write_engine_record(output, loader.key, engine)
    return {"method": method, "profile": profile.to_dict(), "gpu": loader.key.gpu_name,
            "engine_source": str(source), "versions": {"tensorrt": trt.__version__}}
