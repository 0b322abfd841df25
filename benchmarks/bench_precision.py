"""Accuracy and speed of reduced-precision task graphs: built after an fp32 fit, or fitted at int8.

For each suite task x seed (EfficientNet-Lite0, 1,000 training images of the seed, the task's
fixed test set, T = 512, HEAD2TOE with the path solver and the default grid):

- `fp32`: the head fitted on fp32 features, run on fp32 features;
- `fp16 (after)`, `int8 (after)`, `bf16 (after)`: that same fp32-fitted head run on the features of
  the graph at that precision (what `build-engine` of the fp32 task graph deploys: the task graph
  computes the extraction graph's features, `tests/h2t_edge/test_precision.py`);
- `int8 (fitted)`: the head fitted on the int8 graph's own features (`train --precision int8`).

Backends: `ort` (ONNX Runtime: int8 QDQ with uint8 activations, fp16 ONNX) and `ov` (OpenVINO:
NNCF int8, bf16 hint only where the CPU has native bf16). Test accuracy is computed from the cached
features of each graph, which is what its compiled task graph outputs.

Part `latency` (one task and seed): batch-1 p50 latency and batch-32 throughput of each compiled
task graph (cut from the graph at its precision, `exporters.attach`) against fp32 on the same
backend, with the CPU model and ISA beside them: each graph timed in a fresh process, the precisions
in turn over ROUNDS rounds, the median round kept.

Writes benchmarks/results/precision.{json,md}; each record is saved as it ends (a rerun resumes).
Run it alone on the machine.

    python benchmarks/bench_precision.py accuracy [--tasks dspr_loc,digits] [--seeds 0,1,2] [--backends ort,ov]
    python benchmarks/bench_precision.py latency [--task dspr_loc]
    python benchmarks/bench_precision.py report
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h2t_edge.core.machine import measured_on  # noqa: E402
from runtime.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "precision"
FORMAT = "h2t-edge/bench-precision"
T = 512
BACKEND = {"ort": "onnxruntime", "ov": "openvino"}
ROUNDS = 3  # latency: rounds of every precision in turn, each graph in its own process
ROWS = ("fp32", "fp16 (after)", "bf16 (after)", "int8 (after)", "int8 (fitted)")


def _load() -> dict:
    path = OUT.with_suffix(".json")
    return read_json(path, "precision results") if path.exists() else {"format": FORMAT, "version": 1,
                                                                       "accuracy": [], "latency": []}


def _save(results: dict) -> None:
    atomic_write_json(OUT.with_suffix(".json"), results)
    atomic_write_text(OUT.with_suffix(".md"), markdown(results))


def _graphs(onnx_path: Path, backend: str, train_paths, cfg, seed: int) -> dict:
    """{precision: PrecisionGraph} of one backend; bf16 only where it runs natively."""
    from h2t_edge.steps.precision import PrecisionGraph, precision_graph

    graphs = {"fp32": PrecisionGraph(onnx_path, None) if backend == "onnxruntime" else
              precision_graph(onnx_path, "fp32", backend, train_paths, cfg)}
    if backend == "onnxruntime":
        graphs["fp16"] = precision_graph(onnx_path, "fp16", backend, train_paths, cfg)
    else:
        from runtime.backends.openvino import supports_precision

        if supports_precision("bf16"):
            graphs["bf16"] = precision_graph(onnx_path, "bf16", backend, train_paths, cfg)
    graphs["int8"] = precision_graph(onnx_path, "int8", backend, train_paths, cfg, seed=seed)
    return graphs


def _features(graph, ds, root: Path):
    from h2t_edge.steps.extract import extract_features_multi

    cache = extract_features_multi(graph.path, ds, {T: root / graph.path.stem / f"{ds.fingerprint()[:12]}"},
                                   dtype="float16", backend=graph.backend, backend_options=graph.runner_options())[T]
    return cache.arrays()


def _fit(x, y, classes: int, seed: int):
    from h2t_edge.selection import SearchGrid, fit_head2toe
    from h2t_edge.suite.evaluate import grid_for

    import dataclasses

    # the best CV accuracy: the cheapest-within-one-SE rule needs the taps' costs, not the point here
    return fit_head2toe(x, y, classes, dataclasses.replace(grid_for("paper", seed, SearchGrid.paper()),
                                                           choice="accuracy"))


def _accuracy(result, x, y) -> float:
    from h2t_edge.suite.evaluate import holdout_accuracy

    return holdout_accuracy(result, x, y)


def run_accuracy(tasks, seeds, backends, work: Path) -> None:
    from h2t_edge.steps.export import cached_export
    from h2t_edge.steps.extract import read_multi_layout
    from h2t_edge.suite.tasks.registry import build_task
    from runtime.preprocess import PreprocessConfig

    results = _load()
    done = {(r["task"], r["seed"], r["backend"]) for r in results["accuracy"]}
    onnx_path, _ = cached_export(work / "backbones", "efficientnet_lite0", "bundled", [T], multi=True)
    cfg = PreprocessConfig.from_dict(read_multi_layout(onnx_path)["layouts"][str(T)]["preprocess"])
    for task in tasks:
        for seed in seeds:
            data = build_task(task, seed=seed)
            classes = len(data.train.classes)
            paths = [Path(p) for p in data.train.paths]
            for short in backends:
                if (task, seed, short) in done:
                    continue
                backend = BACKEND[short]
                start = time.perf_counter()
                graphs = _graphs(onnx_path, backend, paths, cfg, seed)
                feats = {p: {"train": _features(g, data.train, work / "features" / task) if p in ("fp32", "int8")
                             else None, "test": _features(g, data.test, work / "features" / task)}
                         for p, g in graphs.items()}
                fp32_fit = _fit(*feats["fp32"]["train"], classes, seed)
                int8_fit = _fit(*feats["int8"]["train"], classes, seed)
                row = {"task": task, "seed": seed, "backend": short, "fp32": _accuracy(fp32_fit, *feats["fp32"]["test"]),
                       "int8 (after)": _accuracy(fp32_fit, *feats["int8"]["test"]),
                       "int8 (fitted)": _accuracy(int8_fit, *feats["int8"]["test"]),
                       "int8_cv": max(r["val_acc_mean"] for r in int8_fit.cv_table),
                       "fp32_cv": max(r["val_acc_mean"] for r in fp32_fit.cv_table),
                       "calibration": graphs["int8"].record["calibration"], "seconds": time.perf_counter() - start,
                       **measured_on()}
                for p in ("fp16", "bf16"):
                    if p in graphs:
                        row[f"{p} (after)"] = _accuracy(fp32_fit, *feats[p]["test"])
                results["accuracy"].append(row)
                _save(results)
                print({k: v for k, v in row.items() if k not in ("calibration", "cpu")}, flush=True)


def run_latency(task: str, backends, work: Path, seed: int = 0) -> None:
    """Task graphs of one task and seed at every precision, timed against fp32 on each backend."""
    import onnx

    from exporters.attach import HeadSpec, attach_heads
    from h2t_edge.serving.bench import BenchCase, measure_in_subprocess
    from h2t_edge.steps.export import cached_export
    from h2t_edge.steps.extract import read_multi_layout
    from h2t_edge.suite.tasks.registry import build_task
    from runtime.preprocess import PreprocessConfig

    results = _load()
    onnx_path, _ = cached_export(work / "backbones", "efficientnet_lite0", "bundled", [T], multi=True)
    cfg = PreprocessConfig.from_dict(read_multi_layout(onnx_path)["layouts"][str(T)]["preprocess"])
    data = build_task(task, seed=seed)
    paths = [Path(p) for p in data.train.paths]
    for short in backends:
        backend = BACKEND[short]
        graphs = _graphs(onnx_path, backend, paths, cfg, seed)
        int8 = graphs["int8"]
        head = _fit(*_features(int8, data.train, work / "features" / task), len(data.train.classes), seed).head
        spec = HeadSpec("task", np.asarray(head.features), head.weight, head.bias)
        cases = {}
        for precision, graph in graphs.items():
            model, _ = attach_heads(onnx.load(str(graph.path)), T, [spec])
            path = work / "latency" / f"{task}.{backend}.{precision}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(model.SerializeToString())
            cases[precision] = BenchCase(precision, path, backend, graph.runner_options().get("precision", "fp32"))
        # each graph in a fresh process (no thread pool of another session spinning beside it), the
        # precisions interleaved over ROUNDS rounds; the median round of each is compared
        timings: dict[str, list[dict]] = {p: [] for p in cases}
        for _ in range(ROUNDS):
            for precision, case in cases.items():
                timings[precision].append(measure_in_subprocess(case, batch=32, warmup=10, repeat=100,
                                                                providers=["CPUExecutionProvider"]))
        base = None
        for precision, runs in timings.items():
            if any("error" in r for r in runs):
                raise SystemExit(f"{precision} on {backend}: {[r['error'] for r in runs if 'error' in r][0]}")
            row = {"task": task, "backend": short, "precision": precision,
                   "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
                   "images_per_s": float(np.median([r["images_per_s"] for r in runs])), "rounds": ROUNDS,
                   "features": int(len(head.features)), **measured_on()}
            if precision == "fp32":
                base = row
            row["latency_ratio"] = row["p50_ms"] / base["p50_ms"]
            row["throughput_ratio"] = row["images_per_s"] / base["images_per_s"]
            results["latency"] = [r for r in results["latency"]
                                  if (r["task"], r["backend"], r["precision"]) != (task, short, precision)] + [row]
            _save(results)
            print({k: v for k, v in row.items() if k != "cpu"}, flush=True)


def _mean_se(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * float(np.std(values, ddof=1)) / math.sqrt(len(values)):.1f}"


def summary(results: dict) -> dict:
    """{(task, backend): {row: [accuracies over seeds]}} and the paired int8 (fitted) - fp32 gaps."""
    cells: dict = {}
    for r in results["accuracy"]:
        cell = cells.setdefault((r["task"], r["backend"]), {})
        for name in ROWS:
            if name in r:
                cell.setdefault(name, []).append(r[name])
        cell.setdefault("gap", []).append(r["int8 (fitted)"] - r["fp32"])
    return cells


def markdown(results: dict) -> str:
    lines = ["# Reduced-precision task graphs: test accuracy (%) and speed against fp32", "",
             "HEAD2TOE at T = 512 (path solver), EfficientNet-Lite0, 1,000 training images per seed, mean ± SE over "
             "seeds. *after*: the fp32-fitted head on the features of the graph at that precision (`build-engine` of "
             "the fp32 task graph); *fitted*: the head fitted on the int8 graph's own features "
             "(`train --precision int8`). gap: int8 (fitted) - fp32, paired by seed.", "",
             "| task | backend | seeds | " + " | ".join(ROWS) + " | gap |", "|---|---|---:|" + "---:|" * (len(ROWS) + 1)]
    cells = summary(results)
    for (task, backend), cell in cells.items():
        lines.append(f"| {task} | {backend} | {len(cell['gap'])} | "
                     + " | ".join(_mean_se(cell.get(name, [])) for name in ROWS) + f" | {_mean_se(cell['gap'])} |")
    for backend in sorted({b for _, b in cells}):
        gaps = [np.mean(c["gap"]) for (_, b), c in cells.items() if b == backend]
        lines.append(f"| **mean over tasks** | {backend} | | "
                     + " | ".join(_mean_se([float(np.mean(c[name])) for (_, b), c in cells.items()
                                             if b == backend and name in c]) for name in ROWS)
                     + f" | {_mean_se([float(g) for g in gaps])} |")
    machines = sorted({r["machine"] for r in results["accuracy"] + results["latency"] if "machine" in r})
    if results["latency"]:
        lines += ["", "## Latency of the compiled task graph (batch 1, p50) and throughput (batch 32)", "",
                  "| task | backend | precision | batch-1 ms | x fp32 | images/s (batch 32) | x fp32 |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in results["latency"]:
            lines.append(f"| {r['task']} | {r['backend']} | {r['precision']} | {r['p50_ms']:.2f} | "
                         f"{r['latency_ratio']:.2f} | {r['images_per_s']:.1f} | {r['throughput_ratio']:.2f} |")
    lines += ["", "Measured on: " + "; ".join(machines) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("accuracy", "latency", "report"))
    parser.add_argument("--tasks", default="dspr_loc,digits,count2d")
    parser.add_argument("--task", default="dspr_loc")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--backends", default="ort,ov")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work"))
    args = parser.parse_args()
    work = Path(args.work)
    if args.part == "accuracy":
        run_accuracy(args.tasks.split(","), [int(s) for s in args.seeds.split(",")], args.backends.split(","), work)
    elif args.part == "latency":
        run_latency(args.task, args.backends.split(","), work)
    else:
        _save(_load())
    print(markdown(_load()))


if __name__ == "__main__":
    main()
