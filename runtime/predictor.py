"""`Predictor`: classify images with a compiled per-task ONNX graph and its JSON sidecar.

Layout (written by the task compiler): `TASK.onnx` and `TASK.json` side by side. The graph
maps `images: float32[batch, 3, H, W]` (preprocessed as the sidecar's "preprocess" says) to
`probabilities` and `logits`, both float32[batch, C], C = len(sidecar "classes").
A multi-task graph (sidecar version 2, `h2t-edge compile A B ...`) instead has one logits output
per task, float32[batch, C_t], named in the sidecar's "tasks" list with that task's classes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from .backends import create_runner
from .backends.base import LeasedModel, ModelBytes, Runner
from .errors import ArtifactError, ImageError
from .io import parse_json, read_json
from .preprocess import PreprocessConfig, load_image, preprocess_image
from .schema import is_name
from .trust import (
    DIGEST_FIELD,
    ISSUED_FIELD,
    DigestCheck,
    FileChanging,
    FileLease,
    IntegrityError,
    TrustedKeys,
    VersionRecord,
    digest_field,
    read_file,
    resolve_verify_first,
    verify_bytes,
    verify_seal,
    warn_unverified,
)

SIDECAR_FORMAT = "h2t-edge/task-graph"
# Versions 5 and 6 are sealed (runtime.trust): content_sha256, the graph's/engine's BLAKE3 and `issued`
# are mandatory, a signature is checked when keys are trusted. 3 and 4 are the same, with sha256 file
# digests (checked the old way). 1 and 2 are the same layouts from before sealing; they load only with
# allow_unverified.
SIDECAR_VERSION = 5
MULTITASK_SIDECAR_VERSION = 6  # "tasks": [{task, classes, outputs: {logits}}] instead of task/classes/outputs
SHA256_VERSIONS = {3: SIDECAR_VERSION, 4: MULTITASK_SIDECAR_VERSION}  # sealed, sha256 file digests
LEGACY_VERSIONS = {1: SIDECAR_VERSION, 2: MULTITASK_SIDECAR_VERSION}  # unsealed version -> its sealed successor


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """The JSON sidecar of a task graph: same folder, same stem, '.json'."""
    return Path(onnx_path).with_suffix(".json")


@dataclass(frozen=True)
class TaskOutputs:
    """Where one task's scores are in a graph's outputs: `logits` names its float32[batch, C] logits;
    `probabilities` names its softmax output, or is None where the runtime applies softmax."""

    task: str
    classes: tuple[str, ...]
    logits: str
    probabilities: str | None = None


@dataclass(frozen=True)
class TaskSidecar:
    """The contents of `TASK.json`. `extra` keeps any further keys, so a round trip through
    `from_dict` / `to_dict` loses nothing."""

    task: str
    classes: tuple[str, ...]
    preprocess: PreprocessConfig
    backbone: Mapping[str, Any]
    input: str = "images"
    outputs: Mapping[str, str] = field(
        default_factory=lambda: {"probabilities": "probabilities", "logits": "logits"}
    )
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Every task of the graph; a single-task sidecar (version 1) has one, built from task/classes/outputs.
    tasks: tuple[TaskOutputs, ...] = ()

    def __post_init__(self) -> None:
        if not self.tasks:
            one = TaskOutputs(self.task, tuple(self.classes), self.outputs["logits"], self.outputs["probabilities"])
            object.__setattr__(self, "tasks", (one,))

    @property
    def multitask(self) -> bool:
        """Written as a multi-task sidecar (version 4), even when it holds a single task."""
        return not self.outputs

    def to_dict(self) -> dict[str, Any]:
        if self.multitask:
            return {
                "format": SIDECAR_FORMAT,
                "version": MULTITASK_SIDECAR_VERSION,
                "tasks": [{"task": t.task, "classes": list(t.classes), "outputs": {"logits": t.logits}}
                          for t in self.tasks],
                "preprocess": self.preprocess.to_dict(),
                "input": self.input,
                "backbone": dict(self.backbone),
                **self.extra,
            }
        return {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "task": self.task,
            "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(),
            "input": self.input,
            "outputs": dict(self.outputs),
            "backbone": dict(self.backbone),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "TaskSidecar":
        """Parse and validate; `source` (the sidecar path) names the file in errors."""
        fix = "re-compile the task to regenerate it"

        def bad(key: str, why: str) -> ArtifactError:
            return ArtifactError(f"task sidecar {source}: field '{key}' {why}; {fix}")

        if not isinstance(d, dict):
            raise ArtifactError(f"task sidecar {source} must hold a JSON object; {fix}")
        if d.get("format") != SIDECAR_FORMAT:
            raise bad("format", f"is {d.get('format')!r}, expected {SIDECAR_FORMAT!r}")
        if type(d.get("version")) is not int or d["version"] not in (SIDECAR_VERSION, MULTITASK_SIDECAR_VERSION,
                                                                       *LEGACY_VERSIONS, *SHA256_VERSIONS):
            raise ArtifactError(
                f"task sidecar {source}: field 'version' is {d.get('version')!r}, this runtime reads "
                f"versions {SIDECAR_VERSION} and {MULTITASK_SIDECAR_VERSION}; re-compile the task with a matching h2t-edge"
            )
        if {**LEGACY_VERSIONS, **SHA256_VERSIONS}.get(d["version"], d["version"]) == MULTITASK_SIDECAR_VERSION:
            return cls._multitask_from_dict(d, source, bad)
        if not is_name(d.get("task")):
            raise bad("task", f"is {str(d.get('task'))[:80]!r}, not a valid task name (letters, digits, '_', '.', '-'; "
                      "a name is never a path)")
        if not isinstance(d.get("input"), str) or not d["input"]:
            raise bad("input", "must be a non-empty string")
        classes = d.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise bad("classes", "must be a non-empty list of strings")
        outputs = d.get("outputs")
        if not isinstance(outputs, dict) or not all(
            isinstance(outputs.get(k), str) for k in ("probabilities", "logits")
        ):
            raise bad("outputs", "must map 'probabilities' and 'logits' to output names")
        backbone, preprocess = _backbone_and_preprocess(d, source, bad)
        known = {"format", "version", "task", "classes", "preprocess", "input", "outputs", "backbone"}
        return cls(
            task=d["task"],
            classes=tuple(classes),
            preprocess=preprocess,
            backbone=backbone,
            input=d["input"],
            outputs=outputs,
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def _multitask_from_dict(cls, d: dict, source: str, bad) -> "TaskSidecar":
        tasks = d.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise bad("tasks", "must be a non-empty list")
        parsed = []
        for i, t in enumerate(tasks):
            where = f"tasks[{i}]"
            if not isinstance(t, dict) or not is_name(t.get("task")):
                raise bad(where, "must be an object with a valid 'task' name (letters, digits, '_', '.', '-'; a name "
                          "is never a path)")
            classes = t.get("classes")
            if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
                raise bad(f"{where}.classes", "must be a non-empty list of strings")
            outputs = t.get("outputs")
            if not isinstance(outputs, dict) or not isinstance(outputs.get("logits"), str):
                raise bad(f"{where}.outputs", "must map 'logits' to an output name")
            parsed.append(TaskOutputs(t["task"], tuple(classes), outputs["logits"], outputs.get("probabilities")))
        names = [t.task for t in parsed]
        if len(set(names)) != len(names):
            raise bad("tasks", f"names a task twice ({names})")
        if not isinstance(d.get("input"), str) or not d["input"]:
            raise bad("input", "must be a non-empty string")
        backbone, preprocess = _backbone_and_preprocess(d, source, bad)
        known = {"format", "version", "tasks", "preprocess", "input", "backbone"}
        return cls(
            task="+".join(names),
            classes=parsed[0].classes,
            preprocess=preprocess,
            backbone=backbone,
            input=d["input"],
            outputs={},
            extra={k: v for k, v in d.items() if k not in known},
            tasks=tuple(parsed),
        )


def _backbone_and_preprocess(d: dict, source: str, bad) -> tuple[dict, PreprocessConfig]:
    """The 'backbone' and 'preprocess' fields every task sidecar version has, validated."""
    backbone = d.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("name"), str):
        raise bad("backbone", "must be an object with a 'name'")
    if "preprocess" not in d:
        raise bad("preprocess", "is missing")
    return backbone, PreprocessConfig.from_dict(d["preprocess"], source=f"task sidecar {source}")


@dataclass(frozen=True)
class VerifiedTask:
    """A task graph (or engine) checked by `load_task`: its sidecar, the raw sidecar JSON, and the
    model's bytes exactly as they were checked, to be handed to the backend (`create_runner`)."""

    sidecar: "TaskSidecar"
    raw: Mapping[str, Any]
    model: ModelBytes | LeasedModel


def read_task_sidecar(path: str | os.PathLike, sidecar_file: str | os.PathLike | None = None, *,
                      trusted_keys: TrustedKeys | Sequence[str | os.PathLike] | None = None,
                      allow_unverified: bool = False,
                      version_record: VersionRecord | str | os.PathLike | None = None) -> "TaskSidecar":
    """The checked sidecar of the task graph (or engine) PATH (see `load_task`, which also returns the
    checked bytes: use it where the graph is then run)."""
    return load_task(path, sidecar_file, trusted_keys=trusted_keys, allow_unverified=allow_unverified,
                     version_record=version_record).sidecar


def load_task(path: str | os.PathLike, sidecar_file: str | os.PathLike | None = None, *,
              trusted_keys: TrustedKeys | Sequence[str | os.PathLike] | None = None,
              allow_unverified: bool = False,
              version_record: VersionRecord | str | os.PathLike | None = None,
              files: Mapping[Path, bytes] | None = None, parse_while_hashing: bool = False,
              lease: bool = False) -> VerifiedTask:
    """The one reader of task-graph sidecars: the checked sidecar of the task graph (or engine) PATH
    and the graph's bytes, read once; hand `.model` to the backend, never PATH.

    Refuses a missing graph or sidecar; a sidecar without its seal, edited after it was written, or
    malformed; a graph or engine whose bytes do not match the digest the sidecar records (BLAKE3; sha256
    in versions 3 and 4); a graph that keeps tensors in external files; with trusted keys (here or in
    $H2T_EDGE_TRUSTED_KEYS) a sidecar not signed by one of them; with a version record (here or
    $H2T_EDGE_VERSION_RECORD) an older artifact of a task than the device already loaded. Each error
    names the file and the fix. A sidecar from before sealing (versions 1 and 2) loads only with
    `allow_unverified`, loudly. sidecar_file: where the sidecar is (default: next to the graph).
    files: path -> bytes already read once (and checked) by the caller; those files are not read again.
    parse_while_hashing: return as soon as the bytes are read, their digest still being computed
    (`ModelBytes.checks`): the engine loader given `.model` parses them meanwhile and confirms the
    digest before it returns (`Predictor.load`). Everything else is checked before this returns.
    lease: an ONNX task graph comes as a leased file where the system grants a lease (`LeasedModel`;
    ONNX Runtime opens it, nothing is copied), else as bytes."""
    path = Path(path)
    files = files or {}
    if not path.is_file():
        raise ArtifactError(f"task graph {path} does not exist; pass the .onnx written by the compiler")
    sidecar_file = Path(sidecar_file) if sidecar_file is not None else sidecar_path(path)
    if not sidecar_file.is_file():
        raise ArtifactError(
            f"task sidecar {sidecar_file} is missing; it must sit next to {path.name} with the "
            "same stem. Copy it along with the graph or re-compile the task"
        )
    raw = (parse_json(files[sidecar_file], sidecar_file, "task sidecar") if sidecar_file in files
           else read_json(sidecar_file, "task sidecar"))
    trusted = TrustedKeys.resolve(trusted_keys)
    record = VersionRecord.resolve(version_record)
    fix = "re-compile the task (and rebuild its engine)"
    version = raw.get("version") if isinstance(raw, dict) else None
    if type(version) is int and version in LEGACY_VERSIONS:
        if not allow_unverified or trusted:
            raise IntegrityError(
                f"task sidecar {sidecar_file} is format version {version}, from before h2t-edge sealed its artifacts "
                f"(this runtime reads {LEGACY_VERSIONS[version]}); {fix}"
                + ("" if trusted else " (or load it with --allow-unverified)"))
        warn_unverified(str(sidecar_file), f"is format version {version} (unsealed)")
        # what that format checked, when present, is still checked: its digest and the graph's hash
        if DIGEST_FIELD in raw:
            verify_seal(raw, f"task sidecar {sidecar_file}", fix=fix)
        sidecar = TaskSidecar.from_dict(raw, source=str(sidecar_file))
        if "graph_sha256" in raw or isinstance(raw.get("build"), Mapping):
            return VerifiedTask(sidecar, raw, read_artifact(path, raw, sidecar_file, legacy=True, files=files))
        data = files[path] if path in files else read_file(path, what="task graph", fix=fix)
        return VerifiedTask(sidecar, raw, _model_bytes(path, data, raw))
    if isinstance(raw, dict):
        verify_seal(raw, f"task sidecar {sidecar_file}", fix=fix, trusted=trusted)
    sidecar = TaskSidecar.from_dict(raw, source=str(sidecar_file))
    model = read_artifact(path, raw, sidecar_file, legacy=version in SHA256_VERSIONS, files=files,
                          parse_while_hashing=parse_while_hashing, lease=lease)
    if record is not None:
        update = _VersionUpdate(record, [t.task for t in sidecar.tasks], raw.get(ISSUED_FIELD), sidecar_file)
        if parse_while_hashing:  # the device records the version once the graph is confirmed, not before
            return VerifiedTask(sidecar, raw, replace(model, checks=(*model.checks, update)))
        update.verify()
    return VerifiedTask(sidecar, raw, model)


@dataclass(frozen=True)
class _VersionUpdate:
    """`VersionRecord.check_and_update` as a check of `ModelBytes.checks`, run after the digests."""

    record: VersionRecord
    tasks: list[str]
    issued: Any
    sidecar_file: Path

    def verify(self) -> None:
        self.record.check_and_update(self.tasks, self.issued, self.sidecar_file)


def _model_bytes(path: Path, data: bytes, raw: Mapping[str, Any], weights: bytes | None = None,
                 checks: tuple = ()) -> ModelBytes:
    kind = {".engine": "engine", ".plan": "engine", ".xml": "ir"}.get(path.suffix, "onnx")
    return ModelBytes(data, str(path), kind, weights, raw, checks)


def read_artifact(path: str | os.PathLike, sidecar: Mapping[str, Any], sidecar_file: str | os.PathLike, *,
                  legacy: bool = False, files: Mapping[Path, bytes] | None = None,
                  parse_while_hashing: bool = False, lease: bool = False) -> ModelBytes | LeasedModel:
    """The graph or engine at `path`, read once and checked against the digest its sidecar recorded:
    `build.artifact_blake3` (an engine from `h2t-edge build-engine`; an OpenVINO IR's weights too, as
    `build.weights_blake3`) or else `graph_blake3` (a compiled task graph); one of them is mandatory.
    legacy: a sidecar of the previous sealed format, whose digests are the `*_sha256` fields.
    files: path -> bytes the caller has read already (checked here all the same, not read again).
    parse_while_hashing: the digests are computed on another thread, and the returned bytes carry
    them (`ModelBytes.checks`, confirmed by the engine loader before it returns).
    lease: a task graph (not an engine) not in `files` is leased rather than read where the system
    grants a lease (`runtime.trust.FileLease`); its digest is of the leased inode's bytes."""
    path, files = Path(path), files or {}
    build = sidecar.get("build")
    fix = "re-compile the task or rebuild the engine"
    checks: list[DigestCheck] = []

    def checked(file: Path, record: Mapping[str, Any], name: str, field: str, what: str) -> bytes:
        data = files[file] if file in files else read_file(file, what=what, fix=fix)
        if parse_while_hashing:
            checks.append(DigestCheck(data, record.get(name), field=field, path=file, descriptor=sidecar_file,
                                      fix=fix, what=what))
            return data
        return verify_bytes(data, record.get(name), field=field, path=file, descriptor=sidecar_file, fix=fix,
                            what=what)

    if isinstance(build, Mapping):
        name = digest_field("artifact", legacy=legacy)
        data = checked(path, build, name, f"build.{name}", "engine")
        weights = None
        if path.suffix == ".xml":  # the IR's weights are the .bin beside it
            name = digest_field("weights", legacy=legacy)
            weights = checked(path.with_suffix(".bin"), build, name, f"build.{name}", "engine weights")
        return _model_bytes(path, data, sidecar, weights, tuple(checks))
    name = digest_field("graph", legacy=legacy)
    held = FileLease.take(path) if lease and path not in files else None
    if held is not None:
        try:
            check = DigestCheck(held, sidecar.get(name), field=name, path=path, descriptor=sidecar_file, fix=fix,
                                what="task graph", threads=1 if parse_while_hashing else None)
            if not parse_while_hashing:
                check.verify()
        except BaseException:
            held.close()
            raise
        return LeasedModel(held, str(path), sidecar, (check, held) if parse_while_hashing else (held,))
    data = checked(path, sidecar, name, name, "task graph")
    return _model_bytes(path, data, sidecar, checks=tuple(checks))


@dataclass
class Prediction:
    """The result for one image. On a skipped image `error` says why, `label` is '',
    `index` is -1 and `probability` is 0.0."""

    path: str
    label: str
    index: int
    probability: float
    probabilities: np.ndarray | None = None  # float32[C], in sidecar class order
    error: str | None = None
    # Per task, for graphs with several tasks (the fields above are then the first task's).
    tasks: dict[str, "Prediction"] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the full probability vector)."""
        return {
            "path": self.path,
            "label": self.label,
            "index": self.index,
            "probability": self.probability,
            "error": self.error,
            **({"tasks": {name: {"label": t.label, "index": t.index, "probability": t.probability}
                          for name, t in self.tasks.items()}} if len(self.tasks) > 1 else {}),
        }


class Predictor:
    """Runs a compiled task graph on images. Build with `Predictor.load(path)`; close with
    `close()` or use as a context manager."""

    def __init__(self, runner: Runner, sidecar: TaskSidecar, path: str | os.PathLike = "<task graph>"):
        self.sidecar = sidecar
        self.path = Path(path)
        self._runner = runner
        self._runner.activate()
        self._check_graph_matches_sidecar()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        providers: Union[str, Sequence[str]] = "auto",
        intra_op_threads: int | None = None,
        backend: str = "onnxruntime",
        *,
        trusted_keys: TrustedKeys | Sequence[str | os.PathLike] | None = None,
        allow_unverified: bool = False,
        version_record: VersionRecord | str | os.PathLike | None = None,
        verify_first: bool | None = None,
        **backend_options: Any,
    ) -> "Predictor":
        """Load `TASK.onnx` and its sidecar `TASK.json` with `backend` ('onnxruntime',
        'openvino' or 'tensorrt'; see `runtime.backends.create_runner`).

        providers applies to onnxruntime only; intra_op_threads to onnxruntime and openvino;
        backend_options go to the backend's loader as they are. The sidecar and the graph are
        read once and checked (`load_task`), and the backend gets those bytes: trusted_keys
        (public key files, added to those in $H2T_EDGE_TRUSTED_KEYS) makes a signature by one of
        them mandatory; version_record (a file the device keeps, or $H2T_EDGE_VERSION_RECORD)
        refuses rollbacks; allow_unverified loads an unsealed sidecar of the old format, with a
        warning. The backend parses the graph's bytes while their BLAKE3 is computed on another thread, and
        the runner is handed over (and the version recorded) only once the digest matches: nothing
        runs before. verify_first (or $H2T_EDGE_VERIFY_FIRST=1) finishes the digest before the
        backend sees a byte, at the cost of the hash (`benchmarks/results/trust.md`).
        Raises ArtifactError when either file is missing or malformed, and BackendUnavailable
        when the backend or an explicitly requested provider does not initialize.
        """
        path = Path(path)
        parse_while_hashing = not resolve_verify_first(verify_first)

        def load(lease: bool) -> Predictor:
            task = load_task(path, trusted_keys=trusted_keys, allow_unverified=allow_unverified,
                             version_record=version_record, parse_while_hashing=parse_while_hashing, lease=lease)
            options = fitted_precision_options(task.sidecar, path, backend, backend_options)
            # The bytes that were checked are the bytes the backend gets: the path is not opened again.
            options = runner_options(backend, providers, intra_op_threads, options)
            return cls(create_runner(task.model, backend, **options), task.sidecar, path)

        if backend == "onnxruntime":  # ONNX Runtime opens a leased graph file itself: no copy of it
            try:
                return load(lease=True)
            except FileChanging:  # someone asked to write the graph meanwhile: load a copy of its bytes
                pass
        return load(lease=False)

    # -- properties -------------------------------------------------------------------------

    @property
    def classes(self) -> tuple[str, ...]:
        return self.sidecar.classes

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.sidecar.preprocess

    @property
    def runner(self) -> Runner:
        return self._runner

    @property
    def backend(self) -> str:
        """Which backend runs the graph, e.g. 'onnxruntime[CPUExecutionProvider]'."""
        return self._runner.name

    # -- inference --------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[TaskOutputs, ...]:
        """The tasks this graph answers, in output order (one for a single-task graph)."""
        return self.sidecar.tasks

    def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images: float32[n, 3, H, W], already preprocessed.
        Returns (probabilities float32[n, C], logits float32[n, C]) of the graph's task; a graph
        with several tasks answers through `predict_tasks`."""
        if len(self.tasks) > 1:
            raise ArtifactError(f"task graph {self.path} holds {len(self.tasks)} tasks "
                                f"({', '.join(t.task for t in self.tasks)}); use predict_tasks")
        return self.predict_tasks(images)[self.tasks[0].task]

    def predict_tasks(self, images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """images: float32[n, 3, H, W], already preprocessed. Returns, per task in output order,
        (probabilities float32[n, C_t], logits float32[n, C_t])."""
        return self._scores(self._infer(images))

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if not np.isfinite(images).all():
            raise ImageError("the preprocessed images hold NaN/inf values; preprocess them with "
                             "runtime.preprocess (pixels scaled to [0, 1], then the sidecar's mean and std)")
        return self._runner.infer({self.sidecar.input: images})

    def _scores(self, outputs: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each task's (probabilities, logits) from the named outputs of one inference."""
        scores = {}
        for t in self.tasks:
            logits = outputs[t.logits]
            probabilities = outputs[t.probabilities] if t.probabilities else softmax(logits)
            if probabilities.shape[-1] != len(t.classes):
                raise ArtifactError(
                    f"task graph {self.path} outputs {probabilities.shape[-1]} classes for task {t.task!r} but its "
                    f"sidecar {sidecar_path(self.path)} lists {len(t.classes)} in 'classes'; re-compile the task"
                )
            # A NaN score would still argmax to a confident-looking label: refuse it instead.
            if not (np.isfinite(probabilities).all() and np.isfinite(logits).all()):
                raise ArtifactError(f"task graph {self.path} produced NaN/inf scores from finite images (damaged "
                                    "weights?); re-compile the task")
            scores[t.task] = (probabilities, logits)
        return scores

    def predict_paths(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 32,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> list[Prediction]:
        """Classify image files, `batch_size` at a time; results come in input order.

        on_error='raise' raises ImageError at the first bad file; 'skip' returns it as a
        Prediction with `error` set and carries on.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        results: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            results.extend(self._predict_chunk([str(p) for p in paths[start:start + batch_size]], on_error))
        return results

    def _predict_chunk(self, paths: list[str], on_error: str) -> list[Prediction]:
        by_position: dict[int, Prediction] = {}
        arrays, positions = [], []
        for i, path in enumerate(paths):
            try:
                arrays.append(preprocess_image(load_image(path), self.preprocess))
                positions.append(i)
            except ImageError as exc:
                if on_error == "raise":
                    raise
                by_position[i] = Prediction(path=path, label="", index=-1, probability=0.0, error=str(exc))
        if arrays:
            scores = self.predict_tasks(np.stack(arrays))
            for row, i in enumerate(positions):
                per_task = {}
                for t in self.tasks:
                    probs = scores[t.task][0][row]
                    best = int(np.argmax(probs))
                    per_task[t.task] = Prediction(path=paths[i], label=t.classes[best], index=best,
                                                  probability=float(probs[best]), probabilities=probs)
                first = per_task[self.tasks[0].task]
                by_position[i] = Prediction(
                    path=paths[i],
                    label=first.label,
                    index=first.index,
                    probability=first.probability,
                    probabilities=first.probabilities,
                    tasks=per_task,
                )
        return [by_position[i] for i in range(len(paths))]

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._runner.deactivate()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _check_graph_matches_sidecar(self) -> None:
        """Catch a sidecar from another compile before it gives wrong labels."""
        where = f"task graph {self.path} and its sidecar {sidecar_path(self.path)}"
        if self.sidecar.input not in self._runner.input_names:
            raise ArtifactError(
                f"{where} disagree: sidecar 'input' is {self.sidecar.input!r}, graph inputs are "
                f"{self._runner.input_names}; re-compile the task"
            )
        named = {n for t in self.tasks for n in (t.logits, t.probabilities) if n}
        missing = sorted(n for n in named if n not in self._runner.output_names)
        if missing:
            raise ArtifactError(
                f"{where} disagree: sidecar 'outputs' names {missing}, graph outputs are "
                f"{self._runner.output_names}; re-compile the task"
            )
        shape = self._runner.input_shapes()[self.sidecar.input]
        expected = list(self.preprocess.input_size)
        if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected)):
            raise ArtifactError(
                f"{where} disagree: graph input shape is {shape}, sidecar 'preprocess.input_size' "
                f"is {expected}; re-compile the task"
            )
        # One probe inference: the class count and finite scores show only in the outputs, and a
        # loaded Predictor must never give labels from a mismatched or damaged graph.
        self.predict_tasks(np.zeros((1, *expected), dtype=np.float32))


def fitted_precision_options(sidecar: TaskSidecar, path: Path, backend: str, options: Mapping[str, Any]) -> dict:
    """A graph fitted at a precision (its sidecar's `precision` record, `train --precision`) runs as
    fitted: OpenVINO gets the recorded inference precision unless one is given; another backend
    than the recorded one computes other features than the head was fitted on, which is said."""
    options = dict(options)
    record = sidecar.extra.get("precision")
    if not isinstance(record, Mapping):
        return options
    if record.get("backend") != backend:
        warnings.warn(f"{path} was fitted on {record.get('precision')} features computed by {record.get('backend')}; "
                      f"{backend} computes other features than its head was fitted on. Load it with "
                      f"backend={record.get('backend')!r} (predict --backend {record.get('backend')})",
                      RuntimeWarning, stacklevel=3)
    elif backend == "openvino" and record.get("precision") in ("fp16", "bf16"):
        options.setdefault("precision", record["precision"])
    return options


def runner_options(backend: str, providers, intra_op_threads: int | None, options: Mapping[str, Any]) -> dict:
    """`create_runner` options from `Predictor.load`'s arguments: providers apply to onnxruntime
    only, intra_op_threads to onnxruntime and openvino; the rest go to the backend as they are."""
    options = dict(options)
    if backend == "onnxruntime":
        return {"providers": providers, "intra_op_threads": intra_op_threads, **options}
    if backend == "openvino" and intra_op_threads is not None:
        options.setdefault("num_threads", intra_op_threads)
    return options


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float32[n, C] logits, shifted by the row maximum so it cannot overflow."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
