"""How long `h2t-edge train` fits: the whole protocol (three target sizes, the paper grid, the
LINEAR guard) on one built-in task's 1,000 training images, at a given screening budget.

Runs `h2t_edge.train.train` on TASK (seed 0) with --test, EfficientNet-Lite0 and its default
target sizes (512 / 2048 / 8192), and appends one record to
benchmarks/results/train_speed.json (one per task, grid, budget and GEMM precision), then rewrites train_speed.md: seconds of export, extraction
and fitting (`timings` of the run), the chosen model and every candidate's CV and test accuracy.
A finished record is not rerun. Run it alone on the machine (`flock /work/coord/heavy.lock ...`):
the fitting seconds are the figure the speed target is about.

    python benchmarks/bench_train_speed.py --task dspr_loc --max-candidates 8192 [--precision bf16] [--no-guard]

--no-guard fits HEAD2TOE alone at every T (the paper's protocol: CV picks T, F, lambda, lr and
steps) plus LINEAR for comparison; by default HEAD2TOE+LINEAR is fitted too (the guard).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h2t_edge.core.machine import measured_on  # noqa: E402
from runtime.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "train_speed"


def run(task: str, grid_name: str, budget: int, precision: str, guard: bool, work: Path, solver: str = "paper") -> dict:
    import dataclasses

    from h2t_edge.selection import SearchGrid
    from h2t_edge.suite.tasks.registry import build_task
    from h2t_edge.train.protocol import train

    grid = SearchGrid.paper() if grid_name == "paper" else SearchGrid.quick()
    grid = dataclasses.replace(grid, max_candidates=budget or None, precision=precision, solver=solver)
    data = build_task(task, None, 0)
    folder = work / f"{task}-{grid_name}-{solver}-{budget}-{precision}{'' if guard else '-noguard'}"
    folder.mkdir(parents=True, exist_ok=True)
    train_manifest = data.train.to_manifest(folder / "train.jsonl")
    test_manifest = data.test.to_manifest(folder / "test.jsonl")
    start = time.perf_counter()
    report = train(train_manifest, folder / "task", test=test_manifest, grid=grid, guard=guard, cache_dir=work / "cache",
                   log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
    wall = time.perf_counter() - start
    sel = report.selection
    return {
        "task": task, "grid": grid_name, "solver": solver, "max_candidates": budget, "precision": precision, "guard": guard, "train_images": len(data.train),
        "test_images": len(data.test), "target_sizes": sorted({c.target_size for c in sel.candidates
                                                                 if c.method != "LINEAR"}),
        "timings": report.timings, "wall_seconds": wall, "skipped": report.skipped,
        "chosen": sel.chosen.key, "chosen_test_accuracy": sel.chosen.test_accuracy,
        "candidates": {c.key: {"cv_accuracy": c.cv_accuracy, "test_accuracy": c.test_accuracy,
                               "n_features": c.n_features, "candidates": c.candidates,
                               "fit_seconds": c.fit_seconds} for c in sel.candidates},
        "cpu_count": os.cpu_count(), "load_end": os.getloadavg()[0], **measured_on(),
    }


def _precision(record: dict) -> str:
    return record.get("precision", "fp32")  # records from before the option ran in fp32


def _guard(record: dict) -> bool:
    return record.get("guard", True)  # records from before the option fitted the guard


def _key(record: dict) -> tuple:
    return record["task"], record["grid"], record["max_candidates"], _precision(record), _guard(record)


def markdown(records: list[dict]) -> str:
    lines = ["# `h2t-edge train`: time of the whole protocol", "",
             "EfficientNet-Lite0, bundled weights, seed 0, 1,000 training and 1,000 test images; target sizes "
             "512 / 2048 / 8192 (one extraction pass for all three); HEAD2TOE, HEAD2TOE+LINEAR and LINEAR at "
             "every T on the same CV folds (guard: yes), or HEAD2TOE alone at every T with LINEAR beside it (guard: no, the paper's protocol). Budget: candidates per CV fold after screening "
             "(`--max-candidates`; 0 = exact group lasso on every feature). GEMM: the precision of the "
             "training matrix products (`--fit-precision`; bf16 keeps weights, optimiser and loss in fp32). Fit = the seconds of the fit "
             "step (every T, every candidate, CV and refits); the target is at most 600 s. One run each; load = "
             "1-minute load average at the end (about 2 = alone on the 2 cores).", "",
             "| task | grid | budget | GEMM | guard | export s | extract s | fit s | fit <= 600 s | chosen | chosen test % "
             "| best HEAD2TOE test % | LINEAR test % | load |",
             "|---|---|---:|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in records:
        t = r["timings"]
        extract = sum(v for k, v in t.items() if k.startswith("extract"))
        c = r["candidates"]
        h2t = max((v for k, v in c.items() if k.startswith("HEAD2TOE@")), key=lambda v: v["cv_accuracy"])
        lines.append(f"| {r['task']} | {r['grid']} | {r['max_candidates'] or 'exact'} | {_precision(r)} | "
                     f"{'yes' if _guard(r) else 'no'} | {t.get('export', 0):.0f} | "
                     f"{extract:.0f} | {t['fit']:.0f} | {'yes' if t['fit'] <= 600 else 'no'} | {r['chosen']} | "
                     f"{100 * r['chosen_test_accuracy']:.1f} | {100 * h2t['test_accuracy']:.1f} | "
                     f"{100 * c['LINEAR']['test_accuracy']:.1f} | {r['load_end']:.1f} |")
    lines += ["", "## Candidates (CV / test %, features kept, fit s)", ""]
    for r in records:
        lines.append(f"- {r['task']}, {r['grid']} grid, budget {r['max_candidates'] or 'exact'}, {_precision(r)}"
                     f"{'' if _guard(r) else ', no guard'}: "
                     + "; ".join(
            f"{k} {100 * v['cv_accuracy']:.1f} / {100 * v['test_accuracy']:.1f}, {v['n_features']:,} of "
            f"{v['candidates']:,}, {v['fit_seconds']:.0f} s" for k, v in sorted(r["candidates"].items())))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dspr_loc")
    parser.add_argument("--grid", choices=("paper", "quick"), default="paper")
    parser.add_argument("--max-candidates", type=int, default=8192, help="0: exact group lasso")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="GEMM precision of the fit")
    parser.add_argument("--no-guard", action="store_true", help="HEAD2TOE alone at every T (the paper)")
    parser.add_argument("--work-dir", default="h2t-train-speed")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    path = OUT.with_suffix(".json")
    records = read_json(path, "train speed results")["records"] if path.exists() else []
    key = (args.task, args.grid, args.max_candidates, args.precision, not args.no_guard)
    if not args.report_only and key not in {_key(r) for r in records}:
        records.append(run(args.task, args.grid, args.max_candidates, args.precision, not args.no_guard,
                           Path(args.work_dir)))
        atomic_write_json(path, {"format": "h2t-edge/bench-train-speed", "version": 1, "records": records})
    atomic_write_text(OUT.with_suffix(".md"), markdown(records))
    print(f"wrote {OUT.with_suffix('.md')}")


if __name__ == "__main__":
    main()
