"""Deployed graphs against the plain backbone, in one run: task graphs, the extraction graph with all
taps, and multi-task graphs with 1, 3 and 10 tasks, on ONNX Runtime CPU and OpenVINO f32, batch 1
latency and batch 32 throughput. Writes benchmarks/results/deploy.{json,md}.

    flock /work/coord/heavy.lock python benchmarks/bench_deploy.py --work /tmp/deploy-bench

What is measured (EfficientNet-Lite0, bundled weights, T = 512):
- the plain backbone (logits) and the extraction graph (`export`: every tap pooled and normalised);
- LINEAR and HEAD2TOE (CV-chosen F) graphs of a task fitted here on generated data (dspr_loc);
- HEAD2TOE graphs at F = 0.01 and F = 0.2 whose selections are RANDOM (uniform over all candidate
  features, random weights): speed depends on which taps are read, not on the weights, and a
  uniform selection reads nearly every tap (the slow case);
- multi-task graphs: 1 task (dspr_loc), 3 tasks (dspr_loc, digits, count2d, each fitted here), and
  10 tasks (those 3 plus 7 heads with random selections of the dspr_loc head's size).
Every case runs in its own worker process (`h2t_edge.serving.bench`); each case is measured in two rounds
and the better round is kept, so a burst of load on the shared machine does not decide a ratio.
Ratios are against the plain backbone on the same backend in the same run. "bytes per added task"
is (bytes of the N-task graph - bytes of the 1-task graph) / (N - 1), and for the shared-backbone
form the size of one head's two files.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from h2t_edge.serving.bench import BenchCase, measure_in_subprocess
from h2t_edge.core.machine import measured_on
from runtime.io import atomic_write_bytes, atomic_write_json, atomic_write_text

TASKS = ("dspr_loc", "digits", "count2d")
# The speed of a graph depends on the features it reads, not on how well they were chosen: a small
# CV grid (2 folds, one lr / steps / lambda, F from 0.2% to 5%) keeps the preparation short.
BENCH_GRID_ARGS = {"lrs": (0.1,), "steps": (500,), "l21s": (1e-3,), "fractions": (0.002, 0.005, 0.01, 0.02, 0.05),
                   "folds": 2}
BACKENDS = (("onnxruntime", "fp32"), ("openvino", "fp32"))
PLAIN, TAPS = "backbone (logits)", "extraction graph (all 51 taps)"


def prepare(work: Path, n_train: int, seed: int = 0) -> tuple[dict[str, Path], dict]:
    """Export, generate, extract, fit and compile everything measured; reuses what is already in `work`."""
    from exporters.backbones import load_backbone
    from exporters.compile import HeadSpec, compile_multitask_graph, compile_task_graph
    from exporters.export import export_backbone, export_plain
    from h2t_edge.core.artifacts import TaskHead
    from h2t_edge.steps.deploy import package_shared_step
    from h2t_edge.steps.extract import extract_features
    from h2t_edge.pipeline import fit_step
    from h2t_edge.selection import SearchGrid

    grid = SearchGrid(**BENCH_GRID_ARGS)
    from h2t_edge.suite.tasks import build_task

    work.mkdir(parents=True, exist_ok=True)
    bb = load_backbone("efficientnet_lite0", weights="bundled")
    graphs = {PLAIN: work / "plain.onnx", TAPS: work / "backbone.onnx"}
    if not graphs[PLAIN].is_file():
        atomic_write_bytes(graphs[PLAIN], export_plain(bb).SerializeToString())
    if not graphs[TAPS].is_file():
        model, _ = export_backbone(bb, 512)
        atomic_write_bytes(graphs[TAPS], model.SerializeToString())
    heads: dict[str, TaskHead] = {}
    for name in TASKS:
        task_dir = work / "tasks" / name
        if not (task_dir / "head2toe" / "task.json").is_file():
            data = build_task(name, work / "data", seed, n_train=n_train, n_val=0, n_test=10)
            cache = extract_features(graphs[TAPS], data.train, work / "features" / name, dtype="float32")
            fit_step(cache.root, task_dir, task=name, grid=grid)
        heads[name] = TaskHead.load(task_dir / "head2toe")
    main = heads[TASKS[0]]
    layout = main.layout
    k, classes = main.weight.shape
    rng = np.random.default_rng(seed)

    def random_head(name: str, n: int, c: int) -> HeadSpec:
        features = np.sort(rng.choice(layout["total_features"], n, replace=False))
        return HeadSpec(name, features, rng.normal(size=(n, c)).astype(np.float32) / np.sqrt(n),
                        np.zeros(c, np.float32))

    def spec(h: TaskHead) -> HeadSpec:
        return HeadSpec(h.task, h.features, h.weight, h.bias)

    linear = TaskHead.load(work / "tasks" / TASKS[0] / "linear")
    f = main.config.get("fraction")
    singles = {
        "LINEAR task graph": spec(linear),
        f"HEAD2TOE task graph, CV F={f} ({k} features)": spec(main),
        "HEAD2TOE task graph, F=0.01 (random selection)": random_head("f001", int(0.01 * layout["total_features"]), classes),
        "HEAD2TOE task graph, F=0.2 (random selection)": random_head("f02", int(0.2 * layout["total_features"]), classes),
    }
    info: dict[str, dict] = {}
    for label, head in singles.items():
        path = work / f"{_slug(label)}.onnx"
        if not path.is_file():
            model, summary = compile_task_graph(bb, layout, head.features, head.weight, head.bias)
            atomic_write_bytes(path, model.SerializeToString())
            atomic_write_json(path.with_suffix(".info.json"), {"taps_used": len(summary.taps_used),
                                                               "features": int(len(head.features))})
        graphs[label] = path
    extra = [random_head(f"random{i}", k, 10) for i in range(10 - len(TASKS))]
    sets = {1: [spec(main)], 3: [spec(heads[n]) for n in TASKS], 10: [spec(heads[n]) for n in TASKS] + extra}
    for n, specs in sets.items():
        label = f"multi-task graph, {n} task{'s' if n > 1 else ''}"
        path = work / f"multitask_{n}.onnx"
        if not path.is_file():
            model, summary = compile_multitask_graph(bb, layout, specs)
            atomic_write_bytes(path, model.SerializeToString())
            atomic_write_json(path.with_suffix(".info.json"), {"taps_used": len(summary.taps_used),
                                                               "features": int(sum(len(s.features) for s in specs))})
        graphs[label] = path
    shared = package_shared_step([work / "tasks" / n / "head2toe" for n in TASKS], work / "shared",
                                 backbone_onnx=graphs[TAPS])
    atomic_write_json(graphs[TAPS].with_suffix(".info.json"), {"taps_used": len(layout["taps"]),
                                                               "features": int(layout["total_features"])})
    for path in graphs.values():
        meta = path.with_suffix(".info.json")
        info[str(path)] = json.loads(meta.read_text()) if meta.is_file() else {}
    return graphs, {"info": info, "chosen": main.config, "head_bytes": shared.heads,
                    "backbone_onnx_bytes": shared.backbone_bytes, "n_train": n_train}


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")[:60]


def measure_all(graphs: dict[str, Path], batch: int, repeat: int, rounds: int) -> list[dict]:
    from runtime.backends import available_providers

    providers = available_providers()
    best: dict[tuple[str, str], dict] = {}
    for _ in range(rounds):
        # Rounds interleave every case, so slow stretches of the machine hit all of them alike.
        for backend, precision in BACKENDS:
            for label, path in graphs.items():
                result = measure_in_subprocess(BenchCase(label, path, backend, precision), batch, 10, repeat, providers)
                key = (label, backend)
                old = best.get(key)
                if "error" in result and old is None:
                    best[key] = result
                elif "p50_ms" in result:
                    best[key] = {
                        **result,
                        "p50_ms": min(result["p50_ms"], old.get("p50_ms", np.inf)) if old else result["p50_ms"],
                        "images_per_s": max(result["images_per_s"], old.get("images_per_s", 0)) if old else
                        result["images_per_s"],
                    }
    return [{"graph": label, "backend": backend, "bytes": graphs[label].stat().st_size, "path": str(graphs[label]),
             **result} for (label, backend), result in best.items()]


def derive(rows: list[dict]) -> list[dict]:
    """Ratios against the plain backbone, and for the multi-task graphs the bytes each added task
    costs over the previous (smaller) multi-task graph and the latency against the 1-task graph.
    The 1 -> 3 step also adds backbone segments (the new tasks read deeper taps); 3 -> 10 does not."""
    for r in rows:
        base = next(b for b in rows if b["graph"] == PLAIN and b["backend"] == r["backend"])
        if "p50_ms" in r and "p50_ms" in base:
            r["latency_vs_backbone"] = r["p50_ms"] / base["p50_ms"]
            r["throughput_vs_backbone"] = r["images_per_s"] / base["images_per_s"]
    multi = {}
    for r in rows:
        if r["graph"].startswith("multi-task graph"):
            multi.setdefault(r["backend"], []).append((int(r["graph"].split(",")[1].split()[0]), r))
    for group in multi.values():
        group.sort(key=lambda nr: nr[0])
        one = group[0][1]
        for (n_prev, prev), (n, r) in zip(group, group[1:]):
            r["bytes_per_added_task"] = (r["bytes"] - prev["bytes"]) / (n - n_prev)
            if "p50_ms" in r and "p50_ms" in one:
                r["latency_vs_one_task"] = r["p50_ms"] / one["p50_ms"]
                r["latency_vs_previous"] = r["p50_ms"] / prev["p50_ms"]
    return rows


def profile_ops(path: Path, batch: int, runs: int = 30) -> dict[str, float]:
    """ONNX Runtime CPU kernel time per operator type (ms per run), from its profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32)
    for _ in range(runs):
        session.run(None, {"images": x})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3 / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def tapped_bytes(graph: Path) -> int:
    """Bytes of the feature maps the extraction graph pools, per image (each is read once more)."""
    import onnx

    from exporters.export import LAYOUT_KEY

    meta = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    return int(sum(4 * np.prod(t["shape"]) for t in json.loads(meta[LAYOUT_KEY])["taps"]))


def format_md(rows: list[dict], meta: dict) -> str:
    lines = [
        f"EfficientNet-Lite0 (bundled weights), T = 512, {meta['machine']}, {meta['date']}. "
        f"Batch-1 p50 latency and batch-{meta['batch']} throughput; best of {meta['rounds']} interleaved rounds; "
        "ratios against the plain backbone on the same backend in this run. F=0.01 / F=0.2 graphs and 7 of the "
        "10 tasks use random selections (see benchmarks/bench_deploy.py).", "",
        "| graph | backend | taps read | features | bytes | p50 ms | images/s | latency vs backbone "
        "| throughput vs backbone | bytes per added task |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        info = meta["info"].get(r.get("path", ""), {})
        if "error" in r:
            lines.append(f"| {r['graph']} | {r['backend']} | | | {r['bytes']:,} | failed: {r['error']} | | | | |")
            continue
        added = f"{r['bytes_per_added_task']:,.0f}" if "bytes_per_added_task" in r else "-"
        lines.append(
            f"| {r['graph']} | {r['backend']} | {info.get('taps_used', '-')} | {info.get('features', '-')} "
            f"| {r['bytes']:,} | {r['p50_ms']:.2f} | {r['images_per_s']:.1f} | {r['latency_vs_backbone']:.2f}x "
            f"| {r['throughput_vs_backbone']:.2f}x | {added} |")
    backbone_bytes = meta["plain_bytes"]
    lines += ["", f"Shared-backbone form (`h2t-edge deploy`): backbone.onnx {meta['backbone_onnx_bytes']:,} bytes once; "
              "per task head files: " + ", ".join(f"{t} {b:,} bytes ({100 * b / backbone_bytes:.2f}% of the "
                                                    f"plain backbone)" for t, b in meta["head_bytes"].items()) + "."]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in meta["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "## Where the time goes (ONNX Runtime CPU profiler, kernel ms per batch-1 run)", "",
              f"The extraction graph pools {meta['tapped_bytes'] / 1e6:.1f} MB of feature maps per image: every "
              "tapped map is read once more after the convolution that wrote it. The pooling kernels are "
              "memory-bound; in the plain backbone these maps are only written and read by the next convolution.", "",
              "| operator | " + " | ".join(meta["profile"]) + " |", "|---|" + "---:|" * len(meta["profile"])]
    ops = sorted({op for p in meta["profile"].values() for op in p},
                 key=lambda op: -max(p.get(op, 0) for p in meta["profile"].values()))
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(f"{p.get(op, 0):.3f}" for p in meta["profile"].values()) + " |")
    lines.append("| total | " + " | ".join(f"{sum(p.values()):.3f}" for p in meta["profile"].values()) + " |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[dict]:
    def get(graph_prefix: str, backend: str) -> dict:
        return next(r for r in rows if r["graph"].startswith(graph_prefix) and r["backend"] == backend)

    out = []
    for backend in ("onnxruntime", "openvino"):
        try:
            h2t = get("HEAD2TOE task graph, CV", backend)
            out.append({"target": f"HEAD2TOE task graph (CV F) <= 1.05x backbone batch-1 latency, {backend}",
                        "measured": f"{h2t['latency_vs_backbone']:.2f}x", "met": h2t["latency_vs_backbone"] <= 1.05})
            taps = get(TAPS, backend)
            out.append({"target": f"extraction graph >= 0.9x backbone batch-32 throughput, {backend}",
                        "measured": f"{taps['throughput_vs_backbone']:.2f}x", "met": taps["throughput_vs_backbone"] >= 0.9})
            ten = get("multi-task graph, 10", backend)
            out.append({"target": f"10 tasks <= 1.10x one task's latency, {backend}",
                        "measured": f"{ten['latency_vs_one_task']:.2f}x ({ten['latency_vs_previous']:.2f}x the 3-task "
                                    "graph, which runs the same backbone depth)",
                        "met": ten["latency_vs_one_task"] <= 1.10})
        except (StopIteration, KeyError):
            continue
    plain = next(r for r in rows if r["graph"] == PLAIN)["bytes"]
    ten = next(r for r in rows if r["graph"].startswith("multi-task graph, 10"))
    out.append({"target": "each added task <= 1% of the backbone's bytes (3 -> 10 tasks in one graph)",
                "measured": f"{100 * ten['bytes_per_added_task'] / plain:.2f}%",
                "met": ten["bytes_per_added_task"] <= 0.01 * plain})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="bench-work/deploy", help="Scratch folder (reused on rerun).")
    parser.add_argument("--n-train", type=int, default=300, help="Training images per generated task.")
    parser.add_argument("--repeat", type=int, default=40, help="Timed batch-1 runs per case and round.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--render", action="store_true", help="Only re-render deploy.md from deploy.json.")
    args = parser.parse_args()
    results = Path(__file__).parent / "results"
    if args.render:
        data = json.loads((results / "deploy.json").read_text())
        rows, meta = derive(data["rows"]), data["meta"]
        meta["targets"] = targets(rows)
        atomic_write_json(results / "deploy.json", {"meta": meta, "rows": rows})
        atomic_write_text(results / "deploy.md", format_md(rows, meta) + "\n")
        print((results / "deploy.md").read_text())
        return
    work = Path(args.work)
    graphs, meta = prepare(work, args.n_train)
    rows = derive(measure_all(graphs, args.batch, args.repeat, args.rounds))
    h2t_label = next(g for g in graphs if g.startswith("HEAD2TOE task graph, CV"))
    meta.update({
        **measured_on(), "cpu_count": os.cpu_count(), "batch": args.batch, "rounds": args.rounds,
        "repeat": args.repeat,
        "plain_bytes": graphs[PLAIN].stat().st_size, "tapped_bytes": tapped_bytes(graphs[TAPS]),
        "profile": {name: profile_ops(graphs[g], 1) for name, g in
                    (("backbone", PLAIN), ("HEAD2TOE (CV F)", h2t_label), ("extraction", TAPS))},
    })
    meta["targets"] = targets(rows)
    atomic_write_json(results / "deploy.json", {"meta": meta, "rows": rows})
    atomic_write_text(results / "deploy.md", format_md(rows, meta) + "\n")
    print((results / "deploy.md").read_text())


if __name__ == "__main__":
    main()
