"""Where HEAD2TOE's fit spends its time: cProfile of `fit_head2toe_variants` by kind of work.

    flock /work/coord/heavy.lock python benchmarks/profile_select.py --dims 28296 --steps 200

Random unit-norm features (n=1000, C=16), the paper grid with one step count (`--steps`), the
pre-logits-sized last 1,280 columns kept (HEAD2TOE+LINEAR from the same run, as `h2t-edge train`
fits it). Torch's C calls are grouped: the group-lasso GEMMs (mm/addmm, [b, D] x [D, M*C]), the
nested-retraining GEMMs (bmm/baddbmm on the gathered [M, b, k] blocks), Adam, row/column gathers,
elementwise work (softmax gradient, penalty) and the rest. Wall seconds scale with steps, so
seconds per step x 5,500 estimates the paper grid's two step counts (500 + 5,000).
Writes benchmarks/results/select_profile.{json,md} (entries of the same D and steps replaced).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import time
from pathlib import Path

import numpy as np

from h2t_edge.selection import SearchGrid, fit_head2toe_variants
from runtime.io import atomic_write_json, atomic_write_text, read_json

_OP = re.compile(r"<built-in method ([\w.]+)>|<method '(\w+)' of")  # how cProfile names torch's C calls
RESULTS = Path(__file__).parent / "results" / "select_profile"
GROUPS = {"group-lasso GEMM": ("mm", "addmm"), "retrain GEMM": ("bmm", "baddbmm"), "Adam": ("_fused_adam_",),
          "gathers": ("index_select",),
          "elementwise": ("sub_", "exp_", "div_", "mul_", "amax", "sum", "addcmul_", "linalg_vector_norm", "copy_",
                          "add_")}


def profile(dim: int, steps: int, keep: int = 1280, n: int = 1000, classes: int = 16, precision: str = "fp32",
            budget: int | None = 32768) -> dict:
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    grid = SearchGrid(steps=(steps,), precision=precision, max_candidates=budget)
    prof = cProfile.Profile()
    start, cpu = time.perf_counter(), time.process_time()
    prof.enable()
    fit_head2toe_variants(x, y, classes, grid, keep=np.arange(dim - keep, dim) if keep else None)
    prof.disable()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    seconds = {g: 0.0 for g in GROUPS}
    for (_, _, name), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
        found = _OP.search(name)
        op = found and (found.group(1) or found.group(2)).rsplit(".", 1)[-1]
        group = next((g for g, names in GROUPS.items() if op in names), None)
        if group is not None:
            seconds[group] += tottime
    seconds["other"] = wall - sum(seconds.values())
    return {"dim": dim, "steps": steps, "kept_columns": keep, "precision": precision, "budget": budget, "n": n, "classes": classes, "wall_seconds": wall, "cpu_seconds": cpu,
            "seconds": seconds, "paper_grid_estimate_seconds": wall / steps * 5500,
            "paper_grid_estimate_cpu_seconds": cpu / steps * 5500, "load": os.getloadavg()[0],
            "threads": os.environ.get("OMP_NUM_THREADS", "all")}


def _key(e: dict) -> tuple:
    # entries from before the options ran fp32 at the default budget
    return (e["dim"], e.get("budget", 32768) or 0, e["kept_columns"], e.get("precision", "fp32"), e["steps"],
            str(e["threads"]))


def markdown(entries: list[dict]) -> str:
    groups = list(GROUPS) + ["other"]
    lines = ["# Where a HEAD2TOE (+ HEAD2TOE+LINEAR) fit spends its time", "",
             "cProfile of `fit_head2toe_variants` on random features (n=1,000, C=16), paper grid with one step count "
             "(CV: 5 folds x 2 lambdas x 2 lr; then the refit); kept: columns HEAD2TOE+LINEAR always keeps (0: HEAD2TOE alone). Seconds per kind of work; the "
             "estimate scales the wall time to the paper's 500 + 5,000 steps. Load: 1-minute load average at the end "
             "(about 2 = alone on the 2 cores). GEMM: `SearchGrid.precision`; budget: candidates per fold "
             "(`max_candidates`; D below it is not screened). With other jobs on the cores, wall seconds (and the per-kind seconds, which "
             "cProfile measures in wall time) run high; CPU seconds less so.", "",
             "| D | budget | kept | GEMM | steps | threads | wall s | CPU s | " + " | ".join(groups) + " | paper-grid estimate: wall s / CPU s | load |",
             "|---:|---:|---:|---|---:|---:|---:|---:|" + "---:|" * len(groups) + "---:|---:|"]
    for e in sorted(entries, key=_key):
        budget = e.get("budget", 32768)
        lines.append(f"| {e['dim']:,} | {f'{budget:,}' if budget else 'exact'} | {e['kept_columns']:,} | {e.get('precision', 'fp32')} | {e['steps']} | {e['threads']} | {e['wall_seconds']:.1f} | {e['cpu_seconds']:.1f} | "
                     + " | ".join(f"{e['seconds'][g]:.1f}" for g in groups)
                     + f" | {e['paper_grid_estimate_seconds']:.0f} / {e['paper_grid_estimate_cpu_seconds']:.0f} | {e['load']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="28296", help="comma-separated candidate counts D")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--keep", type=int, default=1280, help="kept columns (0: HEAD2TOE alone, no guard variant)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="GEMM precision")
    parser.add_argument("--budget", type=int, default=32768, help="candidates per fold (0: exact)")
    args = parser.parse_args()
    path = RESULTS.with_suffix(".json")
    entries = read_json(path, "select profile")["results"] if path.exists() else []
    for dim in (int(d) for d in args.dims.split(",")):
        entry = profile(dim, args.steps, args.keep, precision=args.precision, budget=args.budget or None)
        entries = [e for e in entries if _key(e) != _key(entry)] + [entry]
        atomic_write_json(path, {"format": "h2t-edge/select-profile", "version": 1, "results": entries})
        print(f"D={dim} steps={args.steps}: {entry['wall_seconds']:.1f} s "
              + ", ".join(f"{k} {v:.1f}" for k, v in entry["seconds"].items()), flush=True)
    atomic_write_text(RESULTS.with_suffix(".md"), markdown(entries))


if __name__ == "__main__":
    main()
