"""Task-graph sidecars: the one place that builds and writes them.

A compiled task graph `TASK.onnx` travels with `TASK.json`, the runtime's contract: classes,
preprocessing, outputs, backbone identity and the graph's BLAKE3. Single-task (version 1),
multi-task (version 2) and fine-tuned graphs all get their sidecar from `task_sidecar` /
`multitask_sidecar` and are written by `write_task_graph`, which always seals the sidecar
(`runtime.trust.seal`: `issued`, `content_sha256` over its canonical JSON, and with a signing key an
ed25519 signature over it, which covers the graph's digest and the task names), so an edited sidecar
of any kind is refused at load. The one checker is the runtime's (`runtime.predictor.read_task_sidecar`),
because the device checks what it loads without h2t_edge installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runtime.io import atomic_write_files, json_bytes
from runtime.predictor import MULTITASK_SIDECAR_VERSION, SIDECAR_FORMAT, SIDECAR_VERSION, read_task_sidecar
from runtime.trust import SigningKey, file_digest
from runtime.trust import seal as seal_descriptor

INPUT_NAME = "images"

__all__ = ["graph_path", "multitask_sidecar", "read_task_sidecar", "sign", "task_sidecar", "write_task_graph"]


def graph_path(out: str | Path) -> Path:
    """OUT with the .onnx suffix every task graph has (its sidecar is OUT.json)."""
    path = Path(out)
    return path if path.suffix == ".onnx" else path.with_suffix(".onnx")


def task_sidecar(blob: bytes, *, task: str, method: str, classes: Sequence[str], preprocess: Mapping[str, Any],
                 backbone: Mapping[str, Any], outputs: Mapping[str, str], **extra: Any) -> dict:
    """The sidecar (version 1) of a single-task graph whose serialized ONNX is `blob`.

    outputs: {"probabilities": name, "logits": name}; extra: what the compiler reports (taps used,
    segments kept, tuned layer...), kept as it is."""
    return {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "task": task, "method": method,
            "classes": list(classes), "preprocess": dict(preprocess), "input": INPUT_NAME,
            "outputs": dict(outputs), "backbone": dict(backbone),
            "graph_blake3": file_digest(blob), **extra}


def multitask_sidecar(blob: bytes, *, tasks: Sequence[Mapping[str, Any]], preprocess: Mapping[str, Any],
                      backbone: Mapping[str, Any], **extra: Any) -> dict:
    """The sidecar (version 2) of a multi-task graph: `tasks` lists each task's name, method,
    classes and `outputs: {"logits": name}`."""
    return {"format": SIDECAR_FORMAT, "version": MULTITASK_SIDECAR_VERSION, "tasks": [dict(t) for t in tasks],
            "preprocess": dict(preprocess), "input": INPUT_NAME, "backbone": dict(backbone),
            "graph_blake3": file_digest(blob), **extra}


def sign(sidecar: dict, signing_key: SigningKey | None = None) -> dict:
    """Seal the sidecar in place (`issued`, `content_sha256`, and with a key its signature); returns it."""
    return seal_descriptor(sidecar, signing_key)


def write_task_graph(path: str | Path, blob: bytes, sidecar: dict, signing_key: SigningKey | None = None) -> Path:
    """Seal `sidecar` (signed when a key is given) and write the graph PATH (.onnx) with it as PATH.json.

    Both files are staged before either replaces an old one, so a failed write keeps the previous
    pair. Returns the graph's path."""
    path = graph_path(path)
    sign(sidecar, signing_key)
    atomic_write_files({path: blob, path.with_suffix(".json"): json_bytes(sidecar)})
    return path
