"""Benchmark the CPU path: extraction throughput with and without taps, and the compiled task
graph's latency against the plain backbone's, all measured in one run (ratios are what count).

    python benchmarks/bench_pipeline.py --task-dir h2t-demo/task/head2toe

Writes benchmarks/results/pipeline.json and pipeline.md. Run `h2t-edge demo` first for a task.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _time_runs(fn, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _percentiles(times: list[float]) -> dict:
    ms = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "runs": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-dir", default="h2t-demo/task/head2toe", help="A fitted HEAD2TOE task artifact.")
    parser.add_argument("--target-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="Timed batches for throughput.")
    parser.add_argument("--repeat", type=int, default=50, help="Timed runs for batch-1 latency.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    import torch

    from exporters.backbones import load_backbone
    from exporters.export import export_backbone, export_plain
    from h2t_edge.artifacts import TaskHead
    from h2t_edge.pipeline import compile_step
    from runtime.backends.onnxruntime import OnnxRuntimeRunner, SessionLoader

    task = TaskHead.load(args.task_dir)
    bb = load_backbone(task.backbone["name"])
    work = Path(tempfile.mkdtemp(prefix="h2t-bench-"))
    graphs = {"backbone (logits)": work / "plain.onnx", "backbone + all taps": work / "taps.onnx"}
    graphs["backbone (logits)"].write_bytes(export_plain(bb).SerializeToString())
    graphs["backbone + all taps"].write_bytes(export_backbone(bb, args.target_size)[0].SerializeToString())
    graphs[f"{task.method} task graph"] = compile_step(args.task_dir, work / "task.onnx").path
    linear_dir = Path(args.task_dir).parent / "linear"
    if (linear_dir / "task.json").exists():
        graphs["LINEAR task graph"] = compile_step(linear_dir, work / "linear.onnx").path

    rng = np.random.default_rng(0)
    batch = rng.normal(size=(args.batch_size, *bb.input_size)).astype(np.float32)
    single = batch[:1]
    rows = []
    with torch.no_grad():
        torch_times = _time_runs(lambda: bb.model(torch.from_numpy(single)), 5, args.repeat)
        torch_batch = _time_runs(lambda: bb.model(torch.from_numpy(batch)), 1, args.batches)
    rows.append({"graph": "torch eager backbone", "bytes": None, **_percentiles(torch_times),
                 "images_per_s": args.batch_size / statistics.median(torch_batch)})
    for name, path in graphs.items():
        runner = OnnxRuntimeRunner(SessionLoader(path))
        with runner:
            latency = _time_runs(lambda: runner.infer({"images": single}), 5, args.repeat)
            throughput = _time_runs(lambda: runner.infer({"images": batch}), 1, args.batches)
            provider = runner.provider
        rows.append({"graph": name, "bytes": path.stat().st_size, **_percentiles(latency),
                     "images_per_s": args.batch_size / statistics.median(throughput), "provider": provider})
    base = next(r for r in rows if r["graph"] == "backbone (logits)")
    for r in rows:
        r["latency_vs_backbone"] = r["p50_ms"] / base["p50_ms"]
        r["throughput_vs_backbone"] = r["images_per_s"] / base["images_per_s"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "batch_size": args.batch_size, "target_size": args.target_size, "task": args.task_dir,
            "task_features": int(len(task.features)), "date": time.strftime("%Y-%m-%d")}
    (out / "pipeline.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Batch-1 latency and batch-{args.batch_size} throughput on {meta['machine']} "
             f"({meta['threads']} threads), ONNX Runtime CPU unless noted.", "",
             "| graph | bytes | p50 ms | p90 ms | images/s | latency vs backbone | throughput vs backbone |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['bytes']:,}" if r["bytes"] else "-"
        lines.append(f"| {r['graph']} | {size} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['images_per_s']:.1f} "
                     f"| {r['latency_vs_backbone']:.2f}x | {r['throughput_vs_backbone']:.2f}x |")
    (out / "pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
