"""The LINEAR guard of `h2t-edge train` on the offline task suite: chosen model against LINEAR and HEAD2TOE.

    flock /work/coord/heavy.lock python benchmarks/bench_guard.py --task dspr_loc --seeds 0,1 --grid quick
    flock /work/coord/heavy.lock python benchmarks/bench_guard.py --grid paper --precision bf16

For each task and seed (one target size; features from the `h2t-edge eval` caches in --work-dir)
it fits HEAD2TOE and HEAD2TOE+LINEAR from one group-lasso run (`fit_head2toe_variants`, the
pre-logits kept) and LINEAR on the pre-logits, all on the same CV folds and in the same GEMM
precision (`--precision`, `SearchGrid.precision`), takes the candidate with
the best CV accuracy (the guard; ties: fewer features) and records every test accuracy. Results
are appended to benchmarks/results/guard.json as each cell ends (a rerun skips finished cells);
guard.md is rewritten from it with the issue's two checks:

- per task: the chosen model's mean test accuracy is at most 1 SE below LINEAR's, where SE is the
  larger of the binomial standard error of LINEAR's test accuracy, sqrt(p (1 - p) / n_test), and
  the standard error over seeds of the paired difference (chosen - LINEAR);
- structured tasks: sum of (chosen - LINEAR) >= 90% of the sum of (HEAD2TOE - LINEAR).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from h2t_edge.suite.evaluate import backbone_export, feature_caches, best_cv_accuracy, grid_for, holdout_accuracy
from h2t_edge.core.machine import measured_on
from h2t_edge.selection import HEAD2TOE_KEEP, fit_head2toe_variants, fit_linear
from h2t_edge.suite.tasks.registry import GROUPS, build_task, list_tasks
from h2t_edge.train.protocol import Candidate, choose
from runtime.io import atomic_write_json, atomic_write_text, read_json

RESULTS = Path(__file__).parent / "results" / "guard"
METHODS = ("LINEAR", "HEAD2TOE", HEAD2TOE_KEEP)


def run_cell(task: str, seed: int, protocol: str, target_size: int, precision: str, work: Path, log) -> dict:
    data = build_task(task, None, seed)
    onnx = backbone_export(work, "efficientnet_lite0", target_size, "bundled", log)
    feats = feature_caches(work, "efficientnet_lite0", target_size, onnx, data, 32, log)
    x, y, xt, yt = feats.arrays()
    pre = feats.pre_logits()
    n_classes = len(data.train.classes)
    grid = dataclasses.replace(grid_for(protocol, seed), precision=precision)
    start = time.perf_counter()
    results = fit_head2toe_variants(x, y, n_classes, grid, keep=np.arange(pre.start, pre.stop))
    h2t_seconds = time.perf_counter() - start
    results["LINEAR"] = fit_linear(x[:, pre], y, n_classes, grid)
    tests = {"LINEAR": (xt[:, pre], yt)}
    methods = {}
    for name, result in results.items():
        xs, ys = tests.get(name, (xt, yt))
        methods[name] = {"cv_accuracy": best_cv_accuracy(result), "test_accuracy": holdout_accuracy(result, xs, ys),
                         "n_features": int(len(result.head.features)), "config": result.config,
                         "fit_seconds": h2t_seconds if name != "LINEAR" else result.fit_seconds}
    chosen = choose([Candidate(m, target_size, v["cv_accuracy"], 0.0, v["n_features"], 0, {}, 0.0, "")
                     for m, v in methods.items()]).method
    return {"task": task, "group": data.spec.group, "seed": seed, "protocol": protocol, "precision": precision,
            "target_size": target_size,
            "n_test": int(len(yt)), "methods": methods, "chosen": chosen,
            "load": os.getloadavg()[0], **measured_on()}


def _precision(entry: dict) -> str:
    return entry.get("precision", "fp32")  # cells from before the option ran in fp32


def _run_label(entry: dict) -> str:
    return entry["protocol"] + ("" if _precision(entry) == "fp32" else f", {_precision(entry)} GEMMs")


def summarize(entries: list[dict]) -> tuple[list[dict], dict]:
    rows = []
    for task in dict.fromkeys(e["task"] for e in entries):
        es = [e for e in entries if e["task"] == task]
        acc = {m: np.array([e["methods"][m]["test_accuracy"] for e in es]) for m in METHODS if m in es[0]["methods"]}
        chosen = np.array([e["methods"][e["chosen"]]["test_accuracy"] for e in es])
        p, n = acc["LINEAR"].mean(), es[0]["n_test"]
        diff = chosen - acc["LINEAR"]
        se = max(math.sqrt(p * (1 - p) / n), float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0)
        rows.append({"task": task, "group": es[0]["group"], "seeds": [e["seed"] for e in es],
                     **{m: float(acc[m].mean()) for m in acc}, "chosen": float(chosen.mean()),
                     "chosen_methods": [e["chosen"] for e in es], "se": se,
                     "within_1se_of_linear": bool(chosen.mean() >= p - se)})
    structured = [r for r in rows if r["group"] == "structured"]
    gain_h2t = sum(r["HEAD2TOE"] - r["LINEAR"] for r in structured)
    gain_chosen = sum(r["chosen"] - r["LINEAR"] for r in structured)
    checks = {"all_within_1se_of_linear": all(r["within_1se_of_linear"] for r in rows),
              "structured_gain_kept": gain_chosen / gain_h2t if gain_h2t > 0 else None,
              "structured_gain_kept_ok": gain_h2t > 0 and gain_chosen >= 0.9 * gain_h2t,
              "tasks": len(rows)}
    return rows, checks


def from_eval(path: Path) -> list[dict]:
    """Guard entries from `h2t-edge eval` records: the choice between LINEAR and HEAD2TOE by CV (the
    records have no HEAD2TOE+LINEAR), one per (task, seed, protocol) holding both."""
    records = read_json(path, "evaluation results")["results"]
    cells: dict = {}
    for r in records:
        if r["method"] in ("LINEAR", "HEAD2TOE"):
            cells.setdefault((r["task"], r["seed"], r["protocol"]), {})[r["method"]] = r
    entries = []
    for (task, seed, protocol), methods in sorted(cells.items()):
        if len(methods) < 2:
            continue
        values = {m: {k: r[k] for k in ("cv_accuracy", "test_accuracy", "n_features", "fit_seconds")}
                  for m, r in methods.items()}
        chosen = choose([Candidate(m, r["target_size"], r["cv_accuracy"], 0.0, r["n_features"], 0, {}, 0.0, "")
                         for m, r in methods.items()]).method
        entries.append({"task": task, "group": methods["LINEAR"]["group"], "seed": seed, "protocol": protocol,
                        "target_size": methods["HEAD2TOE"]["target_size"], "n_test": methods["LINEAR"]["n_test"],
                        "methods": values, "chosen": chosen, "load": None})
    return entries


def _task_table(rows: list[dict], methods: Sequence[str]) -> list[str]:
    order = [s.name for s in list_tasks()]
    lines = ["| task | group | seeds | " + " | ".join(methods) + " | chosen | chosen per seed | SE | "
             "chosen >= LINEAR - 1 SE |", "|---|---|---|" + "---:|" * (len(methods) + 1) + "---|---:|---|"]
    for r in sorted(rows, key=lambda r: (GROUPS.index(r["group"]), order.index(r["task"]))):
        lines.append(f"| {r['task']} | {r['group']} | {','.join(map(str, r['seeds']))} | "
                     + " | ".join(f"{100 * r[m]:.1f}" for m in methods) + f" | **{100 * r['chosen']:.1f}** | "
                     f"{', '.join(r['chosen_methods'])} | {100 * r['se']:.1f} | {'yes' if r['within_1se_of_linear'] else 'NO'} |")
    return lines


def _checks(checks: dict) -> list[str]:
    kept = checks["structured_gain_kept"]
    return [f"- every task within 1 SE of LINEAR: **{'yes' if checks['all_within_1se_of_linear'] else 'no'}**",
            f"- structured-task gain over LINEAR kept by the chosen model: "
            f"**{'–' if kept is None else f'{100 * kept:.0f}%'}** of HEAD2TOE's (target >= 90%)"]


def _precision_table(entries: list[dict], eval_entries: list[dict]) -> list[str]:
    """bf16 cells against the fp32 suite records of the same task, seed and protocol (same features,
    folds and grid; only the GEMM precision and the code version differ)."""
    fp32 = {(e["task"], e["seed"], e["protocol"]): e for e in eval_entries}
    pairs = [(e, fp32[(e["task"], e["seed"], e["protocol"])]) for e in entries
             if _precision(e) == "bf16" and (e["task"], e["seed"], e["protocol"]) in fp32]
    if not pairs:
        return []
    lines = ["## bf16 GEMMs against the fp32 suite records", "",
             "Same task, seed, features, folds and grid; the fp32 side is `h2t-edge eval`'s record (an earlier "
             "code version). Test accuracy (%) and the CV accuracy of the chosen configuration.", "",
             "| task | protocol | seed | LINEAR test fp32 / bf16 | HEAD2TOE test fp32 / bf16 | HEAD2TOE CV fp32 / bf16 |",
             "|---|---|---:|---|---|---|"]
    diffs = []
    for e, f in pairs:
        b, a = e["methods"], f["methods"]
        diffs += [b[m]["test_accuracy"] - a[m]["test_accuracy"] for m in ("LINEAR", "HEAD2TOE")]
        lines.append(f"| {e['task']} | {e['protocol']} | {e['seed']} | "
                     + " | ".join(f"{100 * a[m][k]:.1f} / {100 * b[m][k]:.1f}" for m, k in
                                  (("LINEAR", "test_accuracy"), ("HEAD2TOE", "test_accuracy"), ("HEAD2TOE", "cv_accuracy")))
                     + " |")
    diffs = np.array(diffs) * 100
    lines += ["", f"Test accuracy bf16 - fp32 over {len(diffs)} fits: mean {diffs.mean():+.2f} points, largest "
              f"|difference| {np.abs(diffs).max():.1f}.", ""]
    return lines


def write_markdown(entries: list[dict], eval_entries: list[dict]) -> str:
    lines = ["# The LINEAR guard on the task suite (EfficientNet-Lite0)", "",
             "Chosen = the candidate with the best CV accuracy, all on the same folds (`h2t-edge train`; ties: fewer "
             "features). Test accuracy (%), mean over seeds. SE: the larger of LINEAR's binomial test SE and the "
             "over-seeds SE of the paired difference (chosen - LINEAR).", ""]
    for label in sorted({_run_label(e) for e in entries}):
        es = [e for e in entries if _run_label(e) == label]
        rows, checks = summarize(es)
        sizes = sorted({e["target_size"] for e in es})
        lines += [f"## Three candidates (HEAD2TOE, LINEAR, HEAD2TOE+LINEAR): {label} protocol, T = {sizes}", "",
                  *_task_table(rows, METHODS), "", *_checks(checks), ""]
    if not entries:
        lines += ["## Three candidates", "", "No cell of the three-candidate run has finished yet.", ""]
    for protocol in sorted({e["protocol"] for e in eval_entries}):
        es = [e for e in eval_entries if e["protocol"] == protocol]
        rows, checks = summarize(es)
        lines += [f"## Two candidates (HEAD2TOE, LINEAR) from the suite records: {protocol} protocol", "",
                  "From benchmarks/results/vtab_lite0.json (`h2t-edge eval`: T = 512, HEAD2TOE and LINEAR on the "
                  "same folds; no new fits). These records have no HEAD2TOE+LINEAR, so this checks the choice "
                  "between the other two only.", "", *_task_table(rows, ("LINEAR", "HEAD2TOE")), "", *_checks(checks), ""]
    lines += _precision_table(entries, eval_entries)
    if entries:
        lines += ["## CV accuracy (%) per cell of the three-candidate run", "",
                  "| task | protocol | seed | LINEAR | HEAD2TOE | HEAD2TOE+LINEAR | chosen | fit s (H2T, shared) | load |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for e in entries:
            m = e["methods"]
            lines.append(f"| {e['task']} | {_run_label(e)} | {e['seed']} | "
                         + " | ".join(f"{100 * m[k]['cv_accuracy']:.1f}" for k in METHODS)
                         + f" | {e['chosen']} | {m['HEAD2TOE']['fit_seconds']:.0f} | {e['load']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", help="repeatable; default: every default task")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--grid", choices=("quick", "paper"), default="quick")
    parser.add_argument("--target-size", type=int, default=512)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="GEMM precision of every fit")
    parser.add_argument("--work-dir", default="h2t-eval")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--eval-results", default=str(Path(__file__).parent / "results" / "vtab_lite0.json"),
                        help="suite records for the two-candidate table (no fits)")
    args = parser.parse_args()
    path = RESULTS.with_suffix(".json")
    entries = read_json(path, "guard results")["results"] if path.exists() else []
    if not args.report_only:
        tasks = args.task or [s.name for s in list_tasks(include_optional=False)]
        for task in tasks:
            for seed in (int(s) for s in args.seeds.split(",")):
                key = (task, seed, args.grid, args.target_size, args.precision)
                if any((e["task"], e["seed"], e["protocol"], e["target_size"], _precision(e)) == key for e in entries):
                    continue
                entry = run_cell(task, seed, args.grid, args.target_size, args.precision, Path(args.work_dir), print)
                entries.append(entry)
                atomic_write_json(path, {"format": "h2t-edge/guard-bench", "version": 1, "results": entries})
                m = entry["methods"]
                print(f"{task} seed {seed}: chosen {entry['chosen']}; test " + ", ".join(
                    f"{k} {100 * m[k]['test_accuracy']:.1f}" for k in METHODS), flush=True)
    eval_entries = from_eval(Path(args.eval_results)) if Path(args.eval_results).exists() else []
    atomic_write_json(path, {"format": "h2t-edge/guard-bench", "version": 1, "results": entries,
                             "from_eval": eval_entries,
                             "checks": {p: summarize([e for e in entries if _run_label(e) == p])[1]
                                        for p in sorted({_run_label(e) for e in entries})},
                             "checks_from_eval": {p: summarize([e for e in eval_entries if e["protocol"] == p])[1]
                                                  for p in sorted({e["protocol"] for e in eval_entries})}})
    atomic_write_text(RESULTS.with_suffix(".md"), write_markdown(entries, eval_entries))


if __name__ == "__main__":
    main()
