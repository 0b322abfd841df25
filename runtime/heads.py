"""`SharedBackbonePredictor`: many tasks on one shipped backbone, each task a tiny head file.

A deployment folder (written by `h2t-edge deploy`):

    backbone.onnx          the exported backbone with all taps: images -> one float32[batch, f_t]
                           output per tap, pooled and unit-normalised (the graph features came from)
    backbone.json          format "h2t-edge/shared-backbone" (version 3): preprocess, input, feature
                           layout, layout_sha256, graph_blake3; sealed (runtime.trust), maybe signed
    heads.json             format "h2t-edge/deployment-heads" (version 1): every head of the folder,
                           task -> BLAKE3 of heads/TASK.json; sealed, maybe signed
    heads/TASK.safetensors features int64[k] (indices into the layout's concatenated features),
                           weight float32[k, C], bias float32[C]
    heads/TASK.json        format "h2t-edge/task-head" (version 3): task, classes, layout_sha256,
                           head_blake3; sealed, maybe signed, each on its own

The backbone runs once per batch; each head gathers its k features from the tap outputs and applies
its linear layer in numpy. heads.json lists the heads: a missing, extra or renamed head file is
refused, so a deleted head cannot silently leave the others running. A device adds a task by copying
its two head files and the re-signed heads.json that `h2t-edge deploy TASK -o DIR` writes. Every
file is read once; the backbone runs from the bytes that were checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import create_runner
from .backends.base import ModelBytes
from .errors import ArtifactError
from .io import read_json
from .predictor import (
    MULTITASK_SIDECAR_VERSION,
    SIDECAR_FORMAT,
    Predictor,
    TaskOutputs,
    TaskSidecar,
    runner_options,
    softmax,
)
from .schema import is_name
from .trust import (
    ISSUED_FIELD,
    IntegrityError,
    TrustedKeys,
    VersionRecord,
    file_digest,
    read_checking,
    read_file,
    read_verified,
    resolve_verify_first,
    verify_bytes,
    verify_seal,
)

BACKBONE_FORMAT = "h2t-edge/shared-backbone"
HEAD_FORMAT = "h2t-edge/task-head"
HEADS_MANIFEST_FORMAT = "h2t-edge/deployment-heads"
HEADS_MANIFEST = "heads.json"
# backbone.json and heads/TASK.json: sealed, BLAKE3 file digests, listed by heads.json. Version 2 had
# sha256 digests and no heads.json, version 1 no seal: both are refused (deploy again).
SHARED_VERSION = 3


def layout_sha256(layout: Mapping[str, Any]) -> str:
    """A fingerprint of a feature layout (canonical JSON), so heads and backbone can be matched."""
    return hashlib.sha256(json.dumps(layout, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class SharedHead:
    """One task's head on the shared backbone, split by tap for the gather.

    taps: (tap output name, int64[k_t] local indices) in layout order; weight float32[k, C] rows in
    the same order (k = sum of k_t); bias float32[C]."""

    task: str
    classes: tuple[str, ...]
    taps: tuple[tuple[str, np.ndarray], ...]
    weight: np.ndarray
    bias: np.ndarray

    def logits(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Tap outputs {name: float32[n, f_t]} -> float32[n, C]."""
        x = np.concatenate([outputs[name][:, idx] for name, idx in self.taps], axis=1)
        return x @ self.weight + self.bias


def load_head(meta_path: Path, layout: Mapping[str, Any], layout_hash: str, *,
              trusted: TrustedKeys | None = None, record: VersionRecord | None = None,
              listed: str | None = None) -> SharedHead:
    """Read heads/TASK.json and its safetensors, each once, checked: the JSON against `listed` (its
    BLAKE3 in heads.json), the seal (and signature, with trusted keys), the tensors' BLAKE3, the file
    name against the signed task name, the backbone's layout and, with a version record, that it is not
    older than the head this device loaded before."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    fix = "copy the head again from `h2t-edge deploy`"
    blob = read_file(meta_path, what="task head", fix=fix)
    if listed is not None:
        verify_bytes(blob, listed, field=f"heads.{meta_path.stem}", path=meta_path,
                     descriptor=meta_path.parent.parent / HEADS_MANIFEST, fix=fix, what="task head",
                     algorithm="blake3")
    try:
        meta = json.loads(blob)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"task head {meta_path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT or meta.get("version") != SHARED_VERSION:
        raise IntegrityError(f"{meta_path} is not an h2t-edge task head (format {HEAD_FORMAT!r}, version "
                             f"{SHARED_VERSION}; older heads were not listed or sealed); deploy the task again")
    verify_seal(meta, f"task head {meta_path}", fix=fix, trusted=trusted)
    if meta.get("task") != meta_path.stem:
        raise IntegrityError(f"task head {meta_path} holds task {meta.get('task')!r}, not {meta_path.stem!r}: it was "
                             f"renamed or swapped in from another task; {fix}")
    if meta.get("layout_sha256") != layout_hash:
        raise ArtifactError(
            f"task head {meta_path}: field 'layout_sha256' does not match the backbone's in "
            f"{meta_path.parent.parent / 'backbone.json'}: the task was fitted on another backbone export; "
            "deploy it with its own backbone"
        )
    tensors_path = meta_path.with_suffix(".safetensors")
    blob = read_verified(tensors_path, meta.get("head_blake3"), field="head_blake3", descriptor=meta_path, fix=fix,
                         what="head tensors")
    if record is not None:
        record.check_and_update([meta_path.stem], meta.get(ISSUED_FIELD), meta_path)
    try:
        t = load(blob)
        features, weight, bias = t["features"].astype(np.int64), t["weight"], t["bias"]
    except (SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{tensors_path} does not hold the head tensors features, weight and bias ({exc}); "
                            f"{fix}") from None
    classes = meta.get("classes")
    if not isinstance(classes, list) or weight.shape != (len(features), len(classes)) or bias.shape != (len(classes),):
        raise ArtifactError(f"{tensors_path}: weight {weight.shape} / bias {bias.shape} do not match "
                            f"{len(features)} features and the classes in {meta_path}; {fix}")
    if features.size == 0 or np.any(np.diff(features) <= 0) or features[0] < 0 \
            or features[-1] >= layout["total_features"]:
        raise ArtifactError(f"{tensors_path}: 'features' must be sorted unique indices below "
                            f"{layout['total_features']}; {fix}")
    taps = []
    for tap in layout["taps"]:
        lo, hi = tap["offset"], tap["offset"] + tap["features"]
        inside = features[(features >= lo) & (features < hi)]
        if inside.size:
            taps.append((tap.get("output", tap["name"]), inside - lo))
    return SharedHead(str(meta["task"]), tuple(classes), tuple(taps), weight, bias)


def heads_manifest(heads: Mapping[str, bytes]) -> dict:
    """heads.json (not yet sealed) for the head JSON files `heads` (task -> the bytes of heads/TASK.json)."""
    return {"format": HEADS_MANIFEST_FORMAT, "version": 1,
            "heads": {task: file_digest(blob) for task, blob in sorted(heads.items())}}


def read_heads_manifest(root: Path, trusted: TrustedKeys | None = None, record: VersionRecord | None = None,
                        deployment: str = "") -> dict[str, str]:
    """Task -> BLAKE3 of heads/TASK.json, from ROOT/heads.json (sealed; signed, with trusted keys), after
    checking that heads/ holds exactly the files it lists: a missing, extra or renamed head is refused.
    With a version record, an older heads.json than the device loaded for `deployment` (an older list,
    with the heads added since deleted) is refused as a rollback."""
    path = root / HEADS_MANIFEST
    fix = f"write the folder again with `h2t-edge deploy TASK_DIR ... -o {root}` (it re-signs {HEADS_MANIFEST})"
    if not path.is_file():
        raise IntegrityError(f"{root} has no {HEADS_MANIFEST}, the signed list of its heads; {fix}")
    manifest = read_json(path, "deployment heads manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != HEADS_MANIFEST_FORMAT \
            or not isinstance(manifest.get("heads"), dict):
        raise IntegrityError(f"{path}: field 'format' must be {HEADS_MANIFEST_FORMAT!r} with a 'heads' object; {fix}")
    verify_seal(manifest, f"deployment heads manifest {path}", fix=fix, trusted=trusted)
    if record is not None:
        record.check_and_update([f"deployment:{deployment}"], manifest.get(ISSUED_FIELD), path)
    listed = manifest["heads"]
    bad = sorted(str(t)[:80] for t in listed if not is_name(t))
    if bad:
        raise IntegrityError(f"{path}: field 'heads' names {bad}, not valid task names; {fix}")
    expected = {f"{t}{suffix}" for t in listed for suffix in (".json", ".safetensors")}
    present = {p.name for p in (root / "heads").iterdir()} if (root / "heads").is_dir() else set()
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing or extra:
        raise IntegrityError(f"{root / 'heads'} does not hold the heads {path} lists: missing {missing}, not listed "
                             f"{extra} (a head was deleted, added or renamed after the folder was signed); {fix}")
    return dict(listed)


class SharedBackbonePredictor(Predictor):
    """`Predictor` over a deployment folder: one backbone pass, then every head in numpy.
    `predict_tasks` / `predict_paths` behave as for a multi-task graph."""

    def __init__(self, runner, sidecar: TaskSidecar, heads: Sequence[SharedHead], path: str | os.PathLike):
        self.heads = list(heads)
        super().__init__(runner, sidecar, path)

    @classmethod
    def load(cls, path: str | os.PathLike, providers="auto", intra_op_threads: int | None = None,
             backend: str = "onnxruntime", tasks: Sequence[str] | None = None, *,
             trusted_keys: TrustedKeys | Sequence[str | os.PathLike] | None = None,
             version_record: VersionRecord | str | os.PathLike | None = None,
             verify_first: bool | None = None,
             **backend_options: Any) -> "SharedBackbonePredictor":
        """Load DIR/backbone.onnx and the heads in DIR/heads (all, or those named in `tasks`); each
        file is checked as `Predictor.load` checks a task graph (trusted_keys, version_record,
        verify_first: the backbone is parsed while its digest is computed unless it is set)."""
        root = Path(path)
        trusted = TrustedKeys.resolve(trusted_keys)
        record = VersionRecord.resolve(version_record)
        meta_file = root / "backbone.json"
        if not meta_file.is_file():
            raise ArtifactError(f"{root} is not a shared-backbone deployment: {meta_file.name} is missing; "
                                "write one with `h2t-edge deploy TASK_DIR ... -o DIR`")
        meta = read_json(meta_file, "shared backbone sidecar")
        fix = "write the folder again with `h2t-edge deploy`"
        if not isinstance(meta, dict) or meta.get("format") != BACKBONE_FORMAT or meta.get("version") != SHARED_VERSION:
            raise IntegrityError(f"{meta_file}: field 'format' must be {BACKBONE_FORMAT!r} (version {SHARED_VERSION}; "
                                 f"older folders were not sealed or had no heads list); {fix}")
        verify_seal(meta, f"shared backbone sidecar {meta_file}", fix=fix, trusted=trusted)
        graph = root / "backbone.onnx"
        if resolve_verify_first(verify_first):
            blob, checks = read_verified(graph, meta.get("graph_blake3"), field="graph_blake3", descriptor=meta_file,
                                         fix=fix, what="backbone graph"), ()
        else:  # confirmed by the engine loader before anything runs (`ModelBytes.confirm`)
            blob, check = read_checking(graph, meta.get("graph_blake3"), field="graph_blake3", descriptor=meta_file,
                                        fix=fix, what="backbone graph")
            checks = (check,)
        layout = meta["layout"]
        if layout_sha256(layout) != meta.get("layout_sha256"):
            raise IntegrityError(f"{meta_file}: field 'layout_sha256' does not match its layout; {fix}")
        # the list of heads is versioned per backbone graph: an older list is a rollback too
        listed = read_heads_manifest(root, trusted, record, deployment=str(meta.get("graph_blake3"))[:16])
        heads = [load_head(root / "heads" / f"{task}.json", layout, meta["layout_sha256"], trusted=trusted,
                           record=record, listed=digest) for task, digest in sorted(listed.items())]
        if tasks is not None:
            missing = sorted(set(tasks) - {h.task for h in heads})
            if missing:
                raise ArtifactError(f"{root / 'heads'} has no head for {missing}; copy its head files there")
            heads = [h for h in heads if h.task in set(tasks)]
        if not heads:
            raise ArtifactError(f"{root / 'heads'} holds no task heads; add one with `h2t-edge deploy TASK_DIR -o {root}`")
        sidecar = TaskSidecar.from_dict({
            "format": SIDECAR_FORMAT, "version": MULTITASK_SIDECAR_VERSION, "input": meta["input"],
            "preprocess": meta["preprocess"], "backbone": meta["backbone"],
            "tasks": [{"task": h.task, "classes": list(h.classes), "outputs": {"logits": h.task}} for h in heads],
        }, source=str(meta_file))
        model = ModelBytes(blob, str(graph), "onnx", record=meta, checks=checks)  # the bytes read, not the path again
        runner = create_runner(model, backend, **runner_options(backend, providers, intra_op_threads, backend_options))
        return cls(runner, sidecar, heads, graph)

    def predict_tasks(self, images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        outputs = self._infer(images)
        return self._scores({h.task: h.logits(outputs).astype(np.float32) for h in self.heads})

    def _check_graph_matches_sidecar(self) -> None:
        """Every tap a head reads must be an output of the backbone graph."""
        outputs = set(self._runner.output_names)
        for h in self.heads:
            missing = sorted({name for name, _ in h.taps} - outputs)
            if missing:
                raise ArtifactError(f"task head {h.task!r} reads taps {missing} that {self.path} does not output; "
                                    "deploy the task with its own backbone")
        # One probe inference, as for a task graph: class counts and finite scores show only in outputs.
        self.predict_tasks(np.zeros((1, *self.preprocess.input_size), dtype=np.float32))


__all__ = [
    "BACKBONE_FORMAT",
    "HEADS_MANIFEST",
    "HEAD_FORMAT",
    "SHARED_VERSION",
    "SharedBackbonePredictor",
    "SharedHead",
    "TaskOutputs",
    "heads_manifest",
    "layout_sha256",
    "load_head",
    "read_heads_manifest",
    "softmax",
]
