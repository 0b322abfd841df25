"""Fit at the deployed precision: the extraction graph built at the precision and on the backend
the task will run on, so that selection, the head and CV see the features the device computes.

A head fitted on fp32 features and deployed at int8 is fitted on features the device never sees:
the error of int8 backbone features grows with depth, and a Head2Toe head (large weights over
thousands of features) turns it into a logit shift that collapses the predictions. The head is
cheap to fit, so it is fitted on the int8 features instead.

`precision_graph` writes, next to the fp32 export, `STEM.BACKEND.PRECISION.onnx`:

| backend     | fp16                        | bf16              | int8                                        |
|-------------|-----------------------------|-------------------|---------------------------------------------|
| onnxruntime | fp16 ONNX (pool/norm fp32)  | -                 | QDQ, uint8 activations (ORT's CPU kernels)  |
| openvino    | fp32 ONNX + f16 hint        | fp32 ONNX + hint  | QDQ made by NNCF (symmetric activations)    |
| tensorrt    | fp16 ONNX (strongly typed)  | -                 | QDQ, symmetric int8 (explicit quantization) |

Only the backbone's trunk is quantized; tap pooling, normalization, gather and head stay fp32
(`exporters.quantize.trunk_nodes`). Int8 is calibrated on training images, and a disjoint held-out
part of them measures how close the graph's features stay to fp32 (recorded, not used to fit).
The graph carries its precision record in its ONNX metadata (`PRECISION_KEY`): precision,
backend, the fp32 source's sha256 and the calibration (method, image count, digest of the
preprocessed batches, held-out fidelity). Feature caches, task artifacts and compiled sidecars
copy it, and `compile` cuts the task graph from this same file (`exporters.attach`), so the
deployed graph has the fitted graph's quantization parameters node for node.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h2t_edge.core.errors import H2TEdgeError
from runtime.io import atomic_write_bytes, file_sha256

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
PRECISION_KEY = "h2t_edge.precision"
SUPPORTED = {"onnxruntime": ("fp32", "fp16", "int8"), "openvino": ("fp32", "fp16", "bf16", "int8"),
             "tensorrt": ("fp32", "fp16", "int8")}
HELD_OUT_IMAGES = 32  # training images kept out of calibration to measure the graph's fidelity
Log = Callable[[str], None]


class PrecisionError(H2TEdgeError):
    """A precision/backend pair that cannot be built, or a graph whose precision record is wrong."""


@dataclass(frozen=True)
class PrecisionGraph:
    """An extraction graph at a precision: `path` and its record (None: the fp32 export itself,
    run on ONNX Runtime, the default)."""

    path: Path
    record: dict | None

    @property
    def precision(self) -> str:
        return "fp32" if self.record is None else self.record["precision"]

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.record is None else self.record["backend"]

    def runner_options(self) -> dict:
        """`runtime.backends.create_runner` options that run this graph as it was fitted."""
        return runner_options(self.record)


def runner_options(record: dict | None) -> dict:
    """Backend options for a graph with precision `record` (OpenVINO: its inference precision hint;
    TensorRT: the builder precision). None or ONNX Runtime: none, the graph holds the precision."""
    if record is None or record["backend"] == "onnxruntime":
        return {}
    if record["backend"] == "openvino":
        return {"precision": record["precision"] if record["precision"] in ("fp16", "bf16") else "fp32"}
    return {"precision": record["precision"]}


def check_supported(precision: str, backend: str) -> None:
    if backend not in SUPPORTED:
        raise PrecisionError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if precision not in SUPPORTED[backend]:
        hint = "; bf16 runs on --backend openvino" if precision == "bf16" else ""
        raise PrecisionError(f"{backend} runs {', '.join(SUPPORTED[backend])}, not {precision}{hint}")


def read_precision_record(model, source: str | Path = "the graph") -> dict | None:
    """The precision record in an ONNX model's metadata (None for a plain fp32 export)."""
    return record_from_metadata({p.key: p.value for p in model.metadata_props}, source)


def record_from_metadata(meta: dict[str, str], source: str | Path) -> dict | None:
    """The precision record among ONNX metadata properties `meta` of `source` (None: none)."""
    if PRECISION_KEY not in meta:
        return None
    fix = "build the graph again (rerun the train or extract command with --precision)"
    try:
        record = json.loads(meta[PRECISION_KEY])
    except ValueError as exc:
        raise PrecisionError(f"{source}: its {PRECISION_KEY} metadata is not JSON ({exc}); {fix}") from None
    if (not isinstance(record, dict) or record.get("precision") not in PRECISIONS
            or record.get("backend") not in BACKENDS):
        raise PrecisionError(f"{source}: its {PRECISION_KEY} metadata names no known precision and backend; {fix}")
    return record


def precision_graph_path(source: Path, precision: str, backend: str, method: str, images: int,
                         images_sha256: str | None = None) -> Path:
    suffix = f".{method}{images}.{images_sha256[:12]}" if precision == "int8" else ""
    return source.with_name(f"{source.stem}.{backend}.{precision}{suffix}.onnx")


def split_calibration(paths: Sequence[Path], images: int, held_out: int = HELD_OUT_IMAGES,
                      seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Disjoint (calibration, held-out) draws from the training images, at random with `seed`."""
    order = np.random.default_rng(seed).permutation(len(paths))
    held = min(held_out, len(paths) // 4)
    chosen = order[held:held + images]
    return [paths[i] for i in sorted(chosen)], [paths[i] for i in sorted(order[:held])]


def precision_graph(source: str | Path, precision: str, backend: str, train_images: Sequence[Path],
                    preprocess, *, method: str | None = None, images: int | None = None, seed: int = 0,
                    log: Log | None = None) -> PrecisionGraph:
    """The extraction graph `source` (an fp32 export) at `precision` for `backend`, built next to
    it on first use (an existing one is kept when its record matches).

    train_images: the training images; int8 calibrates on `images` of them (default
    `exporters.quantize.DEFAULT_CALIBRATION_IMAGES`) with `method` (default
    `DEFAULT_CALIBRATION`; NNCF on OpenVINO), and measures fidelity on a disjoint held-out draw.
    preprocess: `runtime.preprocess.PreprocessConfig` of the graph's input."""
    import onnx

    from exporters.quantize import DEFAULT_CALIBRATION, DEFAULT_CALIBRATION_IMAGES, convert_to_fp16

    log = log or (lambda message: None)
    check_supported(precision, backend)
    source = Path(source)
    if precision == "fp32" and backend == "onnxruntime":
        return PrecisionGraph(source, None)
    method = "nncf" if precision == "int8" and backend == "openvino" else (method or DEFAULT_CALIBRATION)
    images = images or DEFAULT_CALIBRATION_IMAGES
    draw = split_calibration(list(train_images), images, seed=seed) if precision == "int8" else None
    # int8 graphs are this task's own: keyed by the bytes of the images drawn for calibration, so a
    # cache folder shared between tasks never hands one task another's calibration
    images_sha = _files_sha256(draw[0]) if draw else None
    out = precision_graph_path(source, precision, backend, method, images, images_sha)
    source_sha = file_sha256(source)
    if out.is_file():
        record = read_precision_record(onnx.load(str(out), load_external_data=False), out)
        if (record is not None and record.get("source_sha256") == source_sha
                and (record.get("calibration") or {}).get("images_sha256") == images_sha):
            log(f"kept {precision} graph {out}")
            return PrecisionGraph(out, record)
    record = {"precision": precision, "backend": backend, "source_sha256": source_sha, "calibration": None}
    if precision == "int8":
        model, record["calibration"], record["method"] = _int8(source, backend, *draw, preprocess, method, log)
        record["calibration"]["images_sha256"] = images_sha
    elif precision == "fp16" and backend != "openvino":
        model = convert_to_fp16(source)
        record["method"] = "fp16 ONNX; tap pooling in fp16, L2 normalization and what follows in fp32"
    else:  # OpenVINO fp32/fp16/bf16, TensorRT fp32: the fp32 graph, run with the backend's precision
        model = onnx.load(str(source))
        record["method"] = f"fp32 ONNX run by {backend} at {precision}"
    meta = [p for p in model.metadata_props if p.key != PRECISION_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(meta)
    model.metadata_props.add(key=PRECISION_KEY, value=json.dumps(record, sort_keys=True))
    atomic_write_bytes(out, model.SerializeToString())
    log(f"built {precision} extraction graph for {backend}: {out}")
    return PrecisionGraph(out, record)


def _files_sha256(paths: Sequence[Path]) -> str:
    """sha256 over the bytes of `paths`, in order (what a calibration was drawn from)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def _int8(source: Path, backend: str, calib: list[Path], held: list[Path], preprocess, method: str, log: Log):
    import tempfile

    import onnx

    from exporters.quantize import quantize_int8_nncf, quantize_int8_qdq
    from runtime.calibration import calibration_batches

    if len(calib) < 8:
        raise PrecisionError(f"int8 calibration needs at least 8 training images beside {len(held)} held out, "
                             f"got {len(calib) + len(held)} in all; give more training images or fit at fp32")
    log(f"calibrating int8 ({method}) on {len(calib)} training images, {len(held)} held out ...")
    batches = calibration_batches(calib, preprocess, batch_size=8, limit=None)
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "int8.onnx"
        if backend == "openvino":
            report = quantize_int8_nncf(source, staged, batches)
        else:
            target = "cpu" if backend == "onnxruntime" else "tensorrt"
            report = quantize_int8_qdq(source, staged, batches, target=target,
                                       method=method)
        model = onnx.load(str(staged))
    fidelity = feature_fidelity(source, model, calibration_batches(held, preprocess, batch_size=8, limit=None),
                                backend)
    calibration = {"method": report.method, "images": report.calibration_images, "sha256": report.calibration_sha256,
                   "held_out_images": len(held), **fidelity}
    log(f"int8 features of the held-out images: cosine {fidelity['feature_cosine']:.3f} to fp32")
    what = ("NNCF nncf.quantize, symmetric int8 activations" if backend == "openvino" else
            f"onnxruntime quantize_static ({method}), QDQ, per-channel int8 weights, "
            f"{'uint8' if backend == 'onnxruntime' else 'symmetric int8'} activations")
    return model, calibration, what + "; trunk only, pooling/normalization/gather/head fp32"


def feature_fidelity(source: Path, model, batches: Sequence[np.ndarray], backend: str) -> dict:
    """How close `model`'s features stay to the fp32 `source`'s on `batches`: mean cosine of the
    concatenated outputs per image and the relative L2 error of the worst output. Both run on ONNX
    Runtime's CPU kernels with the runtime's session options (OpenVINO/TensorRT graphs: the QDQ
    arithmetic as ONNX Runtime does it)."""
    from runtime.backends.onnxruntime import SessionLoader

    if not batches:
        return {"feature_cosine": None, "feature_rel_error_max": None}
    reference = SessionLoader(str(source), providers=["CPUExecutionProvider"])()
    reduced = SessionLoader(model.SerializeToString(), providers=["CPUExecutionProvider"])()
    name = reference.get_inputs()[0].name
    a = [np.concatenate(o) for o in zip(*(reference.run(None, {name: b}) for b in batches))]
    q = [np.concatenate(o) for o in zip(*(reduced.run(None, {name: b}) for b in batches))]
    A, Q = np.concatenate(a, 1), np.concatenate(q, 1)
    cosine = (A * Q).sum(1) / np.maximum(np.linalg.norm(A, axis=1) * np.linalg.norm(Q, axis=1), 1e-12)
    rel = [float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12)) for x, y in zip(a, q)]
    return {"feature_cosine": round(float(cosine.mean()), 4), "feature_rel_error_max": round(max(rel), 4)}
