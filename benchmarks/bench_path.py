"""The group-lasso path engine (`fit_head2toe_path`) against the Adam engine (`fit_head2toe_variants`).

    python benchmarks/bench_path.py --task dspr_loc --target-size 512 [--engines path,adam] [--device cpu]

Both fit HEAD2TOE and HEAD2TOE+LINEAR (the pre-logits kept) on the same training features, with
SearchGrid.paper()'s fractions, folds, seed and screening budget. The Adam engine runs with
steps=(500,) only (the paper grid also has 5000 steps, about ten times the cost), to keep the
comparison short; the path engine has no lr or steps. For each engine it records the fit
seconds, each variant's best CV accuracy, test accuracy and chosen config, and for the path
engine the solver's work per path point (FISTA iterations, KKT rounds, working-set and active
sizes) and the seconds of each stage. Features come from the `h2t-edge eval` caches in
--work-dir (extracted on first use). Writes benchmarks/results/path_speed.{json,md}; a run
replaces the entries of the same (task, T, seed, engine, device).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from h2t_edge.selection import SearchGrid, fit_head2toe_path, fit_head2toe_variants
from h2t_edge.core.machine import measured_on
from h2t_edge.suite.evaluate import backbone_export, best_cv_accuracy, feature_caches, holdout_accuracy
from h2t_edge.suite.tasks import build_task
from runtime.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).parent / "results" / "path_speed"
KEY = ("task", "target_size", "seed", "engine", "device")


def _table(entries: list[dict]) -> str:
    lines = ["# HEAD2TOE: group-lasso path engine against the Adam engine", "",
             ("EfficientNet-Lite0 features, 1,000 training and 1,000 test images. Both engines fit HEAD2TOE and "
             "HEAD2TOE+LINEAR (pre-logits kept) with SearchGrid.paper()'s fractions, 5 folds and screening budget; "
             "the Adam engine (`fit_head2toe_variants`) with steps=(500,) only (the paper grid adds 5000 steps, about "
             "10x the cost), lr {0.1, 0.01}, lambda {1e-3, 1e-5}; the path engine (`fit_head2toe_path`, default "
             "PathSettings) CVs 4 points of a 12-point path and F. Fit s: the whole fit (CV and refits, both "
             "variants). Load: the 1-minute load average at the end (2 cores; about 2 = this fit alone). For scale, "
              "`train_speed.md` records the full paper grid (steps 500 and 5000) on dspr_loc T=512 at 505 s for both "
              "variants (screened to 8,192 candidates), HEAD2TOE CV 72.3 / test 69.0 %."), "",
             ("| task | T | candidates | engine | device | fit s | load | variant | CV acc | test acc | F | kept | "
             "lambda | lr | steps |"),
             "|---|---:|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in sorted(entries, key=lambda e: tuple(str(e[k]) for k in KEY)):
        for name, v in e["variants"].items():
            c = v["config"]
            lines.append(f"| {e['task']} | {e['target_size']} | {e['candidates']:,} | {e['engine']} | {e['device']} | "
                         f"{e['fit_seconds']:.0f} | {e['load']:.1f} | {name} | {100 * v['cv_accuracy']:.1f} | "
                         f"{100 * v['test_accuracy']:.1f} | {c['fraction']} | {c['n_features']:,} | {c['l21']:.3g} | "
                         f"{'–' if c['lr'] is None else c['lr']} | {'–' if c['steps'] is None else c['steps']} |")
    for e in entries:
        if e["engine"] != "path":
            continue
        s = e["stats"]
        lines += ["", f"Path engine, {e['task']} T={e['target_size']} ({e['device']}): stage seconds "
                  + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()) + "; CV points "
                  + ", ".join(str(j) for j in s["cv_points"]) + ".", "",
                  "| point | lambda | CV FISTA iterations | KKT rounds | working set | active per fold |",
                  "|---:|---:|---:|---:|---:|---|"]
        cv = s["cv"]
        for j, lam in enumerate(s["lambdas"]):
            lines.append(f"| {j} | {lam:.3g} | {cv['iterations'][j]} | {cv['kkt_rounds'][j]} | {cv['working_set'][j]} | "
                         f"{', '.join(str(a) for a in cv['active'][j])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dspr_loc")
    parser.add_argument("--target-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default="path,adam", help="comma-separated: path, adam")
    parser.add_argument("--device", default="cpu", help="the path engine's device (the Adam engine runs on the CPU)")
    parser.add_argument("--work-dir", default="h2t-eval")
    args = parser.parse_args()

    work = Path(args.work_dir)
    data = build_task(args.task, None, args.seed)
    onnx = backbone_export(work, "efficientnet_lite0", args.target_size, "bundled", print)
    feats = feature_caches(work, "efficientnet_lite0", args.target_size, onnx, data, 32, print)
    x, y, xt, yt = feats.arrays()
    pre = feats.pre_logits()
    keep = np.arange(pre.start, pre.stop)
    n_classes = len(data.train.classes)
    grid = dataclasses.replace(SearchGrid.paper(), seed=args.seed)
    entries = json.loads(RESULTS.with_suffix(".json").read_text()) if RESULTS.with_suffix(".json").exists() else []
    for engine in args.engines.split(","):
        stats: dict = {}
        start = time.perf_counter()
        if engine == "path":
            results = fit_head2toe_path(x, y, n_classes, grid, keep=keep, device=args.device, stats=stats)
        elif engine == "adam":
            results = fit_head2toe_variants(x, y, n_classes, dataclasses.replace(grid, steps=(500,)), keep=keep)
        else:
            raise SystemExit(f"unknown engine {engine!r}; use path or adam")
        seconds = time.perf_counter() - start
        entry = {"task": args.task, "target_size": args.target_size, "candidates": int(x.shape[1]), "seed": args.seed,
                 "engine": engine, "device": args.device if engine == "path" else "cpu",
                 "grid": "paper" if engine == "path" else "paper, steps=(500,)", "fit_seconds": round(seconds, 1),
                 "variants": {name: {"cv_accuracy": best_cv_accuracy(r), "test_accuracy": holdout_accuracy(r, xt, yt),
                                     "config": r.config} for name, r in results.items()},
                 "stats": stats or None, "cpus": os.cpu_count(), "load": round(os.getloadavg()[0], 2),
                 **measured_on()}
        print(json.dumps({k: v for k, v in entry.items() if k != "stats"}))
        entries = [e for e in entries if tuple(e[k] for k in KEY) != tuple(entry[k] for k in KEY)] + [entry]
        atomic_write_json(RESULTS.with_suffix(".json"), entries)
        atomic_write_text(RESULTS.with_suffix(".md"), _table(entries) + "\n")


if __name__ == "__main__":
    main()
