"""`h2t-edge bench`: the speed, memory and size of a task's graphs on every backend available here.

Graphs: the plain backbone (logits), the LINEAR and HEAD2TOE task graphs and the backbone with all
taps. Backends: ONNX Runtime (fp32, and int8 when calibration images are given), OpenVINO f32
(and bf16 where the CPU runs it natively) where it is installed, TensorRT where it imports, and
torch eager as the reference for the plain backbone. Each (graph, backend) is measured in a fresh
worker process, so its peak memory is its own: warm-up, then repeated batch-1 runs (p50/p90/p99)
and batch-N runs (images/s). Ratios are against the plain backbone on the same backend, measured
in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h2t_edge.core.errors import H2TEdgeError
from h2t_edge.core.machine import measured_on
from h2t_edge.selection import names
from runtime.io import atomic_write_json, atomic_write_text

BACKBONE, TAPS, LINEAR, HEAD2TOE = "backbone (logits)", "backbone + all taps", "LINEAR task graph", "HEAD2TOE task graph"


@dataclass(frozen=True)
class BenchCase:
    graph: str
    path: Path
    backend: str  # onnxruntime | openvino | tensorrt | torch
    precision: str


def available_backends() -> list[tuple[str, str]]:
    """(backend, precision) pairs that can run on this machine, fp32 ONNX Runtime first."""
    pairs = [("onnxruntime", "fp32")]
    from runtime.backends.openvino import supports_precision
    from runtime.errors import BackendUnavailable

    try:
        native_bf16 = supports_precision("bf16")  # imports openvino
        pairs.append(("openvino", "fp32"))
        # Where bf16 is not native OpenVINO runs f32 under a bf16 label: not a bf16 measurement.
        if native_bf16:
            pairs.append(("openvino", "bf16"))
    except BackendUnavailable:
        pass
    try:
        from runtime.backends.tensorrt import gpu_name

        gpu_name()  # raises without TensorRT, CUDA or a GPU
        pairs += [("tensorrt", "fp32"), ("tensorrt", "fp16")]
    except Exception:  # no TensorRT or no GPU: nothing to measure there
        pass
    return pairs


def prepare_graphs(task_root: Path, work: Path) -> dict[str, Path]:
    """Export the plain and tapped backbone and compile both task graphs into `work`."""
    from exporters.backbones import load_backbone
    from exporters.export import export_backbone, export_plain
    from h2t_edge.core.artifacts import TaskHead
    from h2t_edge.steps.compile import compile_step, weights_source

    heads = {name: task_root / name.lower() for name in (names.HEAD2TOE, names.LINEAR)}
    missing = [str(p) for p in heads.values() if not (p / "task.json").is_file()]
    if missing:
        raise H2TEdgeError(f"bench needs a fitted task with both methods; missing {missing}: run `h2t-edge fit` first")
    head = TaskHead.load(heads[names.HEAD2TOE])
    bb = load_backbone(head.backbone["name"], weights=weights_source(head.backbone["weights"]))
    work.mkdir(parents=True, exist_ok=True)
    graphs = {BACKBONE: work / "backbone.onnx", TAPS: work / "backbone_taps.onnx"}
    graphs[BACKBONE].write_bytes(export_plain(bb).SerializeToString())
    # The plain graph carries no layout; its sidecar tells int8 calibration how to preprocess.
    atomic_write_json(graphs[BACKBONE].with_suffix(".json"), {"preprocess": head.layout.preprocess})
    taps, _ = export_backbone(bb, head.layout.target_size, head.layout.tap_names)
    graphs[TAPS].write_bytes(taps.SerializeToString())
    graphs[LINEAR] = compile_step(heads[names.LINEAR], work / "linear.onnx").path
    graphs[HEAD2TOE] = compile_step(heads[names.HEAD2TOE], work / "head2toe.onnx").path
    return graphs


def measure(case: BenchCase, batch: int, warmup: int, repeat: int, providers: list[str] | None = None) -> dict:
    """Time one case in this process: batch-1 latency percentiles and batch-N images/s.

    Memory is the peak resident size above the process's size before the model was loaded."""
    baseline = _rss_mb()
    infer, input_shape = _runner_call(case, providers)
    rng = np.random.default_rng(0)
    single = rng.normal(size=(1, *input_shape)).astype(np.float32)
    many = rng.normal(size=(batch, *input_shape)).astype(np.float32)
    latency = _timed(lambda: infer(single), warmup, repeat)
    throughput = _timed(lambda: infer(many), 1, max(3, repeat // 10))
    ms = np.asarray(latency) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)), "images_per_s": batch / float(np.median(throughput)),
        "peak_mb": _peak_rss_mb() - baseline, "runs": repeat,
    }


def _runner_call(case: BenchCase, providers: list[str] | None) -> tuple[Callable[[np.ndarray], object], tuple[int, ...]]:
    if case.backend == "torch":
        import torch

        from exporters.backbones import load_backbone

        identity = json.loads(case.path.read_text())
        bb = load_backbone(identity["backbone"], weights=identity.get("weights", "bundled"))
        torch.set_grad_enabled(False)
        return (lambda x: bb.model(torch.from_numpy(x))), tuple(bb.input_size)
    from runtime.backends import create_runner

    if case.backend == "onnxruntime":
        # The parent probed the providers once; probing here would load (and count) GPU libraries.
        options = {"providers": providers or "auto"}
    else:
        options = {"precision": case.precision}
    runner = create_runner(case.path, case.backend, **options)
    runner.activate()
    name = runner.input_names[0]
    shape = tuple(int(d) for d in runner.input_shapes()[name][1:])
    return (lambda x: runner.infer({name: x})), shape


def _timed(fn: Callable[[], object], warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status in MB (Linux), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    """Current resident size (0 where /proc is missing; only the peak is reported there)."""
    return _proc_status_mb("VmRSS") or 0.0


def _peak_rss_mb() -> float:
    """Peak resident size of this process. VmHWM, unlike ru_maxrss, does not carry the parent's
    peak over through fork and exec."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_in_subprocess(case: BenchCase, batch: int, warmup: int, repeat: int, providers: list[str]) -> dict:
    """Measure one case (`measure`) in a fresh Python process, so no case inherits another's
    threads, caches or memory peak; returns its result dict, or {"error": last stderr line}."""
    spec = json.dumps({"graph": case.graph, "path": str(case.path), "backend": case.backend,
                       "precision": case.precision, "batch": batch, "warmup": warmup, "repeat": repeat,
                       "providers": providers})
    proc = subprocess.run([sys.executable, "-m", "h2t_edge.serving.bench", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["worker failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(
    task_root: str | Path, out_dir: str | Path, *, batch: int = 32, warmup: int = 10, repeat: int = 50,
    backends: list[tuple[str, str]] | None = None, calib: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict]:
    """Measure every (graph, backend) pair; writes OUT/bench.json and OUT/bench.md."""
    from h2t_edge.serving.engines import artifact_files, build_engine
    from runtime.backends import available_providers

    task_root, out = Path(task_root), Path(out_dir)
    graphs = prepare_graphs(task_root, out / "graphs")
    backends = backends or available_backends()
    cases = [BenchCase(g, p, b, prec) for b, prec in backends for g, p in graphs.items()]
    if calib is not None:
        cases += [BenchCase(g, build_engine(p, "onnxruntime", "int8", calib=calib).path, "onnxruntime", "int8")
                  for g, p in graphs.items()]
    reference = out / "graphs" / "torch_backbone.json"
    reference.write_text(json.dumps(_backbone_identity(task_root)))
    cases.append(BenchCase(BACKBONE, reference, "torch", "fp32"))
    providers = available_providers()
    taps = {g: _taps_read(g, p) for g, p in graphs.items()}
    rows = []
    for i, case in enumerate(cases):
        if progress:
            progress("bench", i, len(cases))
        result = measure_in_subprocess(case, batch, warmup, repeat, providers)
        size = None if case.backend == "torch" else sum(p.stat().st_size for p in artifact_files(case.path))
        backend = f"onnxruntime[{providers[0]}]" if case.backend == "onnxruntime" else case.backend
        rows.append({"graph": case.graph, "backend": backend, "precision": case.precision, "bytes": size,
                     "taps": taps.get(case.graph), **result})
    if progress:
        progress("bench", len(cases), len(cases))
    _add_ratios(rows)
    meta = {**measured_on(), "cpu_count": os.cpu_count(), "batch": batch, "warmup": warmup,
            "repeat": repeat, "task": str(task_root.resolve())}
    atomic_write_json(out / "bench.json", {"meta": meta, "rows": rows})
    atomic_write_text(out / "bench.md", format_table(rows, meta) + "\n")
    return rows


def _taps_read(graph: str, path: Path) -> int:
    """How many taps a graph reads: its sidecar's `taps_used`, 0 for the plain backbone, else its outputs."""
    import onnx

    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        used = json.loads(sidecar.read_text()).get("taps_used")
        if used is not None:
            return len(used)
    return 0 if graph == BACKBONE else len(onnx.load(str(path), load_external_data=False).graph.output)


def _backbone_identity(task_root: Path) -> dict:
    """Name and weights source of the task's backbone, for the torch eager reference."""
    from h2t_edge.steps.compile import weights_source

    backbone = json.loads((task_root / "head2toe" / "task.json").read_text())["backbone"]
    return {"backbone": backbone["name"], "weights": weights_source(backbone["weights"])}


def _add_ratios(rows: list[dict]) -> None:
    base = {(r["backend"], r["precision"]): r for r in rows if r["graph"] == BACKBONE and "p50_ms" in r}
    fp32_ort = next((r for (b, p), r in base.items() if b.startswith("onnxruntime") and p == "fp32"), None)
    for r in rows:
        b = base.get((r["backend"], r["precision"]))
        if "p50_ms" in r and b:
            r["latency_vs_backbone"] = r["p50_ms"] / b["p50_ms"]
            r["throughput_vs_backbone"] = r["images_per_s"] / b["images_per_s"]
        if "p50_ms" in r and fp32_ort and r["graph"] == BACKBONE:
            r["speedup_vs_ort_fp32"] = fp32_ort["p50_ms"] / r["p50_ms"]


def format_table(rows: list[dict], meta: dict) -> str:
    lines = [f"Batch-1 latency and batch-{meta['batch']} throughput, {meta['machine']}, {meta['date']}; "
             "ratios against the plain backbone on the same backend and precision.", "",
             "| graph | backend | precision | taps read | bytes | p50 ms | p90 ms | p99 ms | images/s | peak MB "
             "| latency vs backbone | throughput vs backbone |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        taps = "-" if r.get("taps") is None else r["taps"]
        if "error" in r:
            lines.append(f"| {r['graph']} | {r['backend']} | {r['precision']} | {taps} | | failed: {r['error']} | | | | "
                         "| | |")
            continue
        size = f"{r['bytes']:,}" if r["bytes"] else "-"
        lines.append(
            f"| {r['graph']} | {r['backend']} | {r['precision']} | {taps} | {size} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['images_per_s']:.1f} | {r['peak_mb']:.0f} "
            f"| {r.get('latency_vs_backbone', float('nan')):.2f}x | {r.get('throughput_vs_backbone', float('nan')):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    # Worker mode: measure one case and print its JSON on the last line.
    spec = json.loads(sys.argv[1])
    case = BenchCase(spec["graph"], Path(spec["path"]), spec["backend"], spec["precision"])
    print(json.dumps(measure(case, spec["batch"], spec["warmup"], spec["repeat"], spec["providers"])))
