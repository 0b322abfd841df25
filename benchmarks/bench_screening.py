"""Screened against exact HEAD2TOE on a real task's large feature pool (SearchGrid.max_candidates).

    python benchmarks/bench_screening.py --task dspr_loc --target-size 8192 --budgets 0,8192,32768

Budget 0 is the exact method (every candidate in the group lasso). For each budget it records
the fit + CV time, the best CV accuracy, the test accuracy, the chosen config and how much of
the selection agrees with the exact one. Features come from the `h2t-edge eval` caches in
--work-dir (extracted on first use). Writes benchmarks/results/screening.{json,md}; a run
replaces the entries of the same (task, T, grid, seed, budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from h2t_edge.suite.evaluate import best_cv_accuracy, holdout_accuracy, task_features
from h2t_edge.core.machine import measured_on
from h2t_edge.selection import SearchGrid, fit_head2toe
from runtime.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).parent / "results" / "screening"
KEY = ("task", "target_size", "grid", "seed", "budget")


def _table(entries: list[dict]) -> str:
    lines = ["# HEAD2TOE with a screened candidate pool against the exact group lasso", "",
             "EfficientNet-Lite0 features; budget = candidates per CV fold (`SearchGrid.max_candidates`, "
             "0 = exact). Load: the 1-minute load average when the fit ended (2 cores; about 2 = this fit "
             "alone). Overlap: the share of the run's selected features that are among the top k of the exact "
             "run's final ranking, which uses the exact run's own chosen lambda and lr, so it is only a rough "
             "guide (`screening_recall.json` compares like with like).", "",
             *[f"- {e['task']} T={e['target_size']} budget {e['budget'] or 'exact'}: {e['note']}"
               for e in entries if e.get("note")], "",
             "| task | T | candidates | grid | seed | budget | fit + CV s | load | CV acc | test acc | "
             "F | kept | lambda | lr | steps | overlap |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in sorted(entries, key=lambda e: tuple(e[k] for k in KEY)):
        c = e["config"]
        load = "–" if e.get("load") is None else f"{e['load']:.1f}"
        overlap = "–" if e.get("overlap") is None else f"{e['overlap']:.2f}"
        lines.append(f"| {e['task']} | {e['target_size']} | {e['candidates']:,} | {e['grid']} | {e['seed']} | "
                     f"{e['budget'] or 'exact'} | {e['fit_seconds']:.0f} | {load} | {100 * e['cv_accuracy']:.1f} | "
                     f"{100 * e['test_accuracy']:.1f} | {c['fraction']} | {c['n_features']:,} | {c['l21']} | "
                     f"{c['lr']} | {c['steps']} | {overlap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dspr_loc")
    parser.add_argument("--target-size", type=int, default=8192)
    parser.add_argument("--budgets", default="0,8192,32768", help="comma-separated; 0 = exact")
    parser.add_argument("--grid", choices=("quick", "paper"), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="h2t-eval")
    args = parser.parse_args()

    x, y, xt, yt, n_classes = task_features(args.task, args.target_size, seed=args.seed, work_dir=args.work_dir,
                                            log=print)
    base = dataclasses.replace(getattr(SearchGrid, args.grid)(), seed=args.seed)
    entries = json.loads((RESULTS.with_suffix(".json")).read_text()) if RESULTS.with_suffix(".json").exists() else []
    exact_cols = None
    for budget in sorted(int(b) for b in args.budgets.split(",")):
        grid = dataclasses.replace(base, max_candidates=budget or None)
        start = time.perf_counter()
        result = fit_head2toe(x, y, n_classes, grid)
        seconds = time.perf_counter() - start
        cols = set(result.head.features.tolist())
        if budget == 0:
            exact_cols = np.argsort(-result.scores, kind="stable")
        # agreement with the exact ranking at this run's k (None without an exact run)
        overlap = (None if exact_cols is None else
                   len(cols & set(exact_cols[:len(cols)].tolist())) / len(cols))
        entry = {"task": args.task, "target_size": args.target_size, "candidates": int(x.shape[1]),
                 "grid": args.grid, "seed": args.seed, "budget": budget, "fit_seconds": round(seconds, 1),
                 "cv_accuracy": best_cv_accuracy(result), "test_accuracy": holdout_accuracy(result, xt, yt),
                 "config": result.config, "overlap": overlap, "cpus": os.cpu_count(),
                 "load": round(os.getloadavg()[0], 2), **measured_on()}
        print(json.dumps(entry))
        entries = [e for e in entries if tuple(e[k] for k in KEY) != tuple(entry[k] for k in KEY)] + [entry]
        atomic_write_json(RESULTS.with_suffix(".json"), entries)
        atomic_write_text(RESULTS.with_suffix(".md"), _table(entries) + "\n")


if __name__ == "__main__":
    main()
