"""Time fit_head2toe on random features: n=1000, C=16 (paper grid unless --quick).

    python benchmarks/bench_select.py --dim 25000 [--quick] [--max-candidates N]
Writes benchmarks/results/select.json (one entry per (dim, grid, budget), newest run wins).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from h2t_edge.selection import SearchGrid, fit_head2toe
from h2t_edge.core.machine import measured_on

RESULTS = Path(__file__).parent / "results" / "select.json"


def random_features(n: int, dim: int, n_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=25_000, help="candidate features D (any size)")
    parser.add_argument("--max-candidates", type=int, default=None,
                        help="screening budget per fold (0 = exact; default: the grid's, 32768)")
    parser.add_argument("--quick", action="store_true",
                        help="SearchGrid.quick() instead of SearchGrid.paper()")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=16)
    args = parser.parse_args()

    grid = SearchGrid.quick() if args.quick else SearchGrid.paper()
    if args.max_candidates is not None:
        grid = dataclasses.replace(grid, max_candidates=args.max_candidates or None)
    x, y = random_features(args.n, args.dim, args.classes)
    stages: dict[str, float] = {}
    last = [time.perf_counter()]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + now - last[0]
        last[0] = now

    start = time.perf_counter()
    result = fit_head2toe(x, y, args.classes, grid, progress=progress)
    seconds = time.perf_counter() - start
    print(f"fit_head2toe grid={'quick' if args.quick else 'paper'} n={args.n} D={args.dim} "
          f"C={args.classes}: {seconds:.1f} s  config={result.config}")
    for stage, s in stages.items():
        print(f"  {stage:40s} {s:7.1f} s")

    entry = {"grid": "quick" if args.quick else "paper", "n": args.n, "dim": args.dim,
             "classes": args.classes, "seconds": round(seconds, 2),
             "stage_seconds": {k: round(v, 2) for k, v in stages.items()},
             "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
             "torch": torch.__version__, **measured_on(),
             "config": result.config}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    entry["max_candidates"] = grid.max_candidates
    runs = [r for r in runs if (r["grid"], r["dim"], r["n"], r.get("max_candidates", 32768)) !=
            (entry["grid"], args.dim, args.n, grid.max_candidates)]
    RESULTS.write_text(json.dumps(runs + [entry], indent=2) + "\n")


if __name__ == "__main__":
    main()
