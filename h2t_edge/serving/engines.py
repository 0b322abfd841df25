"""`build_engine`: an optimized model or engine from an exported or compiled ONNX graph, with a
JSON sidecar saying how it was built (source sha256, backend, precision, calibration, versions).

| backend     | fp32 | fp16 | bf16 | int8 |
|-------------|------|------|------|------|
| onnxruntime | -    | fp16 ONNX (norm + head fp32) | - | QDQ ONNX, calibrated (CPU kernels) |
| openvino    | IR   | IR, f16 weights | IR + bf16 hint | IR from NNCF's QDQ ONNX, calibrated |
| tensorrt    | engine | TRT 10: flag; 11: fp16 ONNX | - | TRT 10: calibrator; 11: QDQ ONNX |

The sidecar is `OUT.json`. For a task graph it is the task's own sidecar (so `Predictor` loads the
result as it loads the task) with a "build" entry added; otherwise it holds only "build".

A reduced-precision build of a task graph is checked before it is kept (`check_build`): on
held-out images (those of --calib not drawn for calibration, or --check DIR) the new graph's top-1
must agree with its source's on at least `MIN_AGREEMENT` of them and, where the folder's class
subfolders give labels, lose at most `MAX_ACCURACY_DROP` of accuracy. A build that fails is
deleted and refused (BuildCheckError names the drop and the fix: fit at that precision with
`train --precision`), unless accept_drop, which the sidecar records.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    "openvino": ("fp32", "fp16", "bf16", "int8"),
    "tensorrt": ("fp32", "fp16", "int8"),
}
MIN_AGREEMENT = 0.99  # top-1 agreement with the source graph on held-out images
MAX_ACCURACY_DROP = 0.01  # accuracy points (as a fraction) a build may lose where labels are known
CHECK_IMAGES = 256  # held-out images the check runs on at most


class EngineBuildError(H2TEdgeError):
    """A build that cannot be done: an unsupported backend/precision pair, or missing inputs."""


class BuildCheckError(EngineBuildError):
    """A reduced-precision build that does not predict what its source predicts (refused, deleted)."""


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
    check: str | os.PathLike | None = None,
    accept_drop: bool = False,
) -> EngineReport:
    """Build `graph` for `backend` at `precision` into `output` (default: next to the graph,
    `STEM.BACKEND.PRECISION.EXT`) and write its sidecar (sealed; signed with `signing_key` when
    given). `calib` is a folder of task images (int8 only); at most `calib_limit` of them are used.
    A task graph is checked against its sidecar before anything is built from it.

    A task graph built at fp16, bf16 or int8 is then checked against its source (`check_build`) on
    the `check` folder, else on the --calib images not used for calibration; BuildCheckError when
    it fails, unless accept_drop (recorded in the sidecar)."""
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
    task_graph = graph.with_suffix(".json").is_file()
    if task_graph:
        _check_source(graph)  # build only from a graph that is what its sidecar says, before any work
        if precision != "fp32" and check is None and calib is None and not accept_drop:
            raise EngineBuildError(f"a {precision} build of a task graph is checked against its source on held-out "
                                   "images: pass --check DIR (a folder of task images, class subfolders for "
                                   "accuracy), or --accept-drop to build it unchecked")
    output = Path(output) if output is not None else default_output(graph, backend, precision)
    output.parent.mkdir(parents=True, exist_ok=True)
    batches, held_out = [], []
    if calib is not None:
        from runtime.calibration import calibration_batches
        from runtime.preprocess import list_images

        paths = list_images(calib)
        order = np.random.default_rng(0).permutation(len(paths))
        chosen = sorted(order[:calib_limit])
        held_out = [paths[i] for i in sorted(order[calib_limit:calib_limit + CHECK_IMAGES])]
        batches = calibration_batches([paths[i] for i in chosen], graph_preprocess(graph), batch_size=8, limit=None)
    start = time.perf_counter()
    build = {"backend": backend, "precision": precision}
    if backend == "onnxruntime":
        build |= _build_onnxruntime(graph, output, precision, batches)
    elif backend == "openvino":
        build |= _build_openvino(graph, output, precision, batches)
    else:
        build |= _build_tensorrt(graph, output, precision, batches, BatchProfile.up_to(max_batch), cache_dir)
    if precision != "fp32" and task_graph:
        build["check"] = _checked(graph, output, backend, precision, check, calib, held_out, accept_drop)
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


def _checked(graph: Path, output: Path, backend: str, precision: str, check, calib, held_out: list,
             accept_drop: bool) -> dict:
    """Run `check_build` on the check folder (else the held-out calibration images); delete the
    build and raise BuildCheckError when it fails and the drop is not accepted."""
    folder = check if check is not None else calib
    fix = (f"fit the task at this precision instead: `h2t-edge train DATA -o TASK --precision {precision} "
           f"--backend {backend}` (its head is fitted on {precision} features), or pass --accept-drop to keep it")
    if folder is None:
        if accept_drop:
            return {"skipped": "no images (--accept-drop)", "accepted_drop": True}
        raise EngineBuildError(f"a {precision} build of a task graph is checked against its source on held-out "
                               "images: pass --check DIR (a folder of task images, class subfolders for accuracy)")
    from runtime.preprocess import list_images

    images = held_out if check is None else list_images(check)[:CHECK_IMAGES]
    if not images:
        raise EngineBuildError(f"no held-out images to check the {precision} build on: --calib {calib} has no "
                               f"images beyond the calibration draw; pass --check DIR or a larger --calib folder")
    result = check_build(graph, output, backend, precision, images, folder)
    problems = []
    if result["agreement"] < MIN_AGREEMENT:
        problems.append(f"its top-1 agrees with {graph.name} on {100 * result['agreement']:.1f}% of "
                        f"{result['images']} held-out images (at least {100 * MIN_AGREEMENT:.0f}% required)")
    drop = result.get("accuracy_drop")
    if drop is not None and drop > MAX_ACCURACY_DROP:
        problems.append(f"its accuracy drops by {100 * drop:.1f} points ({100 * result['source_accuracy']:.1f}% -> "
                        f"{100 * result['accuracy']:.1f}%; at most {100 * MAX_ACCURACY_DROP:.0f} allowed)")
    result["passed"] = not problems
    if problems and not accept_drop:
        for f in artifact_files(output):  # the IR's .bin too
            f.unlink(missing_ok=True)
        raise BuildCheckError(f"refused the {precision} {backend} build of {graph}: " + "; ".join(problems)
                              + f". The head was fitted on fp32 features. Fix: {fix}")
    result["accepted_drop"] = bool(problems)
    return result


def check_build(graph: Path, output: Path, backend: str, precision: str, images: list, folder) -> dict:
    """Top-1 agreement of the built `output` with its source `graph` (ONNX Runtime, fp32) on
    `images`, over every logits output; with labels (class subfolders of `folder` named after the
    task's classes), both accuracies and the drop. Both graphs see the same preprocessed batches."""
    from runtime.backends import create_runner
    from runtime.preprocess import load_image, preprocess_image

    sidecar = read_json(graph.with_suffix(".json"), "task sidecar")
    tasks = sidecar.get("tasks") or [{"classes": sidecar["classes"], "outputs": sidecar["outputs"]}]
    outputs = [t["outputs"]["logits"] for t in tasks]
    cfg = graph_preprocess(graph)
    labels = _labels(images, folder, tasks[0]["classes"]) if len(tasks) == 1 else None
    x = np.stack([preprocess_image(load_image(p), cfg) for p in images])
    from h2t_edge.steps.precision import runner_options

    hint = runner_options({"precision": precision, "backend": backend})  # how the built graph runs
    preds = {}
    for name, (path, on, options) in {"source": (graph, "onnxruntime", {}), "built": (output, backend, hint)}.items():
        with create_runner(path, on, **options) as runner:
            got = [runner.infer({sidecar["input"]: x[i:i + 16]}) for i in range(0, len(x), 16)]
        preds[name] = [np.concatenate([g[o] for g in got]).argmax(1) for o in outputs]
    agreement = min(float((a == b).mean()) for a, b in zip(preds["source"], preds["built"]))
    result = {"images": len(images), "agreement": agreement, "min_agreement": MIN_AGREEMENT}
    if labels is not None:
        src, built = float((preds["source"][0] == labels).mean()), float((preds["built"][0] == labels).mean())
        result |= {"source_accuracy": src, "accuracy": built, "accuracy_drop": src - built,
                   "max_accuracy_drop": MAX_ACCURACY_DROP}
    return result


def _labels(images: list, folder, classes: list) -> np.ndarray | None:
    """Labels from the class subfolder each image sits in directly under `folder`, when every one is
    a class of the task; else None (agreement only)."""
    root = Path(folder).resolve()
    index = {c: i for i, c in enumerate(classes)}
    labels = []
    for p in images:
        rel = Path(p).resolve().relative_to(root)
        if len(rel.parts) < 2 or rel.parts[0] not in index:
            return None
        labels.append(index[rel.parts[0]])
    return np.asarray(labels)


def _check_source(graph: Path) -> None:
    """The task graph and its sidecar, checked as the runtime checks them (EngineBuildError)."""
    try:
        read_task_sidecar(graph, graph.with_suffix(".json"))
    except ArtifactError as exc:
        raise EngineBuildError(str(exc)) from exc


def _write_sidecar(graph: Path, output: Path, build: dict, signing_key: SigningKey | None = None) -> Path:
    """OUTPUT.json: the task sidecar of GRAPH (checked, as the runtime checks it) with the build
    record added, sealed again (signed with `signing_key` when given): the engine's own sidecar."""
    task_sidecar = graph.with_suffix(".json")
    if task_sidecar.is_file():
        _check_source(graph)  # again: the build took a while, the files may have changed
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


def _build_openvino(graph: Path, output: Path, precision: str, batches) -> dict:
    from runtime.backends.openvino import _import_openvino

    ov = _import_openvino()
    source, method = str(graph), "OpenVINO IR; run it with --backend openvino --precision " + precision
    if precision == "int8":
        import onnx

        from exporters.quantize import quantize_int8_nncf

        staged = output.with_suffix(".nncf.onnx")
        quantize_int8_nncf(graph, staged, batches)
        source = onnx.load(str(staged))
        staged.unlink()
        method = ("OpenVINO IR from NNCF's int8 QDQ ONNX (trunk only; pooling, normalization and head fp32); "
                  "run it with --backend openvino --precision fp32")
    model = ov.convert_model(source)
    ov.save_model(model, str(output), compress_to_fp16=precision == "fp16")
    return {"hint": {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}[precision], "method": method,
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
