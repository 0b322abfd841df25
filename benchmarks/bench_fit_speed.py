"""Fit speed and accuracy of the selection engines on the task suite, and the whole `train` default.

Part `suite` (one record per task x seed x engine, saved as each ends, so a rerun resumes): on the
suite's T = 512 caches of each task and seed (EfficientNet-Lite0, 1,000 train / 1,000 test images,
`h2t_edge.suite.evaluate.feature_caches`), both engines fit HEAD2TOE and HEAD2TOE+LINEAR
(`fit_head2toe_variants` with the pre-logits kept) on the same features and folds:

- `paper`: the paper's minibatch-Adam engine (`--solver paper`) on `SearchGrid.paper()` with
  steps `--paper-steps` (default 500 only: the paper grid's 5,000-step half costs about 10x, see
  `train_speed.md`; pass `--paper-steps 500,5000` for the whole grid);
- `path`: the group-lasso path engine (`--solver path`) keeping the best CV accuracy
  (`--max-accuracy`, the choice h2t-edge made before issue 22);
- `default`: the same engine with the default choice: the least estimated deployed latency within
  one standard error of the best CV accuracy (tap budgets, `h2t_edge.selection.taps`);
- `budget-1.02` (seed 0 only): the default with `--latency-budget 1.02`.

Every method row records its head's estimated deployed latency / backbone (the bytes model of
`h2t_edge.core.costs`) and the taps it reads.

LINEAR is fitted once per task and seed; `guard` is the `train` default's choice among LINEAR,
HEAD2TOE and HEAD2TOE+LINEAR by CV (`train.protocol.choose`, the same rule), per engine.

Part `train`: `h2t_edge.train.train` with its defaults (3 target sizes, guard) on one task's 1,000
training images, wall seconds split into export, extraction and fit.

Writes benchmarks/results/fit_speed.{json,md}. Run it alone on the machine: fit seconds are the point.

    python benchmarks/bench_fit_speed.py suite [--tasks ...] [--seeds 0,1,2]
    python benchmarks/bench_fit_speed.py train [--task dspr_loc] [--solver path]
    python benchmarks/bench_fit_speed.py report
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from h2t_edge.core.machine import measured_on

OUT = ROOT / "benchmarks" / "results" / "fit_speed"
FORMAT = "h2t-edge/bench-fit-speed"
ENGINES = ("paper", "path", "default", "budget-1.02")
BUDGET = 1.02
SOLVER_OF = {"paper": "paper", "path": "path", "default": "path", "budget-1.02": "path"}
SUITE = ("fashion_mnist", "animal_mnist", "digits", "dspr_loc", "dspr_orient", "count2d", "distance2d")


def _load() -> dict:
    path = OUT.with_suffix(".json")
    return read_json(path, "fit speed results") if path.exists() else {"format": FORMAT, "version": 1,
                                                                         "suite": [], "train": []}


def _save(results: dict, report: bool = True) -> None:
    atomic_write_json(OUT.with_suffix(".json"), results)
    if report:
        atomic_write_text(OUT.with_suffix(".md"), markdown(results))


def _candidate(name: str, result, x_test, y_test, plan, folds: int) -> dict:
    from h2t_edge.selection.grid import chosen_row, standard_error
    from h2t_edge.suite.evaluate import holdout_accuracy

    config = result.config
    row = chosen_row(result.cv_table, config)
    return {"method": name, "cv_accuracy": row["val_acc_mean"], "cv_se": standard_error(row, folds),
            "test_accuracy": holdout_accuracy(result, x_test, y_test), "n_features": int(len(result.head.features)),
            "fit_seconds": result.fit_seconds, "latency": plan.latency(result.head.features),
            "taps": len(plan.taps_read(result.head.features)),
            "config": {k: v for k, v in config.items()
                       if k in ("fraction", "l21", "lr", "steps", "path_index", "tap_budget")}}


def run_suite(tasks, seeds, paper_steps, work: Path, log) -> None:
    import numpy as np

    from h2t_edge.selection import SearchGrid, fit_head2toe_variants
    from h2t_edge.selection.grid import choose_best, choose_cheapest
    from h2t_edge.selection.methods import get_method
    from h2t_edge.selection.names import LINEAR
    from h2t_edge.selection.taps import TapPlan
    from h2t_edge.suite.evaluate import backbone_export, feature_caches
    from h2t_edge.suite.tasks.registry import build_task

    results = _load()
    done = {(r["task"], r["seed"], r["engine"]) for r in results["suite"]}
    onnx = None
    for task in tasks:
        for seed in seeds:
            todo = [e for e in ENGINES if (task, seed, e) not in done and (e != "budget-1.02" or seed == 0)]
            if not todo:
                continue
            data = build_task(task, None, seed)
            onnx = onnx or backbone_export(work, "efficientnet_lite0", 512, "bundled", log)
            feats = feature_caches(work, "efficientnet_lite0", 512, onnx, data, 32, log)
            x, y, xt, yt = feats.arrays()
            n_classes = len(data.train.classes)
            pre = feats.pre_logits()
            layout = feats.train.layout
            plan = TapPlan.of(layout)
            base = dataclasses.replace(SearchGrid.paper(), seed=seed)
            linear = get_method(LINEAR).fit(x[:, pre], y, n_classes, base, layout=layout)
            linear.head.features = linear.head.features + pre.start  # columns of the whole feature vector
            linear_row = _candidate(LINEAR, linear, xt, yt, plan, base.folds)
            keep = np.arange(x.shape[1])[pre]
            for engine in todo:
                grid = dataclasses.replace(base, solver=SOLVER_OF[engine],
                                           steps=tuple(paper_steps) if engine == "paper" else base.steps,
                                           choice="accuracy" if engine in ("paper", "path") else "cheapest",
                                           latency_budget=BUDGET if engine == "budget-1.02" else None)
                start = time.perf_counter()
                fits = fit_head2toe_variants(x, y, n_classes, grid, keep=keep,
                                             taps=None if engine == "paper" else plan)
                seconds = time.perf_counter() - start
                rows = [_candidate(name, fit, xt, yt, plan, grid.folds) for name, fit in fits.items()] + [linear_row]
                heads = work / "heads"  # the chosen columns, for bench_deploy_aware (latency needs no weights)
                heads.mkdir(parents=True, exist_ok=True)
                for name, fit in [*fits.items(), (LINEAR, linear)]:
                    np.save(heads / f"{task}-seed{seed}-{engine}-{name}.npy", np.asarray(fit.head.features))
                tie_breaks = (lambda r: r["n_features"],)
                if grid.choice == "cheapest":  # train.protocol.choose, at one T
                    rows_in = [r for r in rows if grid.latency_budget is None or r["latency"] <= grid.latency_budget]
                    guard = choose_cheapest(rows_in, lambda r: r["cv_accuracy"], lambda r: r["cv_se"],
                                            lambda r: r["latency"], *tie_breaks)
                else:
                    guard = choose_best(rows, lambda r: r["cv_accuracy"], *tie_breaks)
                record = {"task": task, "group": data.spec.group, "seed": seed, "engine": engine,
                          "steps": list(grid.steps) if engine == "paper" else None, "fit_seconds": seconds,
                          "candidates": int(x.shape[1]), "methods": {r["method"]: r for r in rows},
                          "guard": guard["method"], "load_end": os.getloadavg()[0],
                          **measured_on()}
                results["suite"].append(record)
                _save(results, report=False)  # the table: `report`, or at the end
                h2t = record["methods"]["HEAD2TOE"]
                log(f"{task} seed {seed} {engine}: {seconds:.0f} s, HEAD2TOE test {100 * h2t['test_accuracy']:.1f}% "
                    f"(cv {100 * h2t['cv_accuracy']:.1f}), guard {guard['method']}")


def run_train(task: str, solver: str, work: Path) -> None:
    """The `train` default on `task`'s 1,000 images with `solver`, in a fresh work folder (so the
    wall time includes the export and the extraction): `bench_train_speed.run`."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train_speed import run

    results = _load()
    record = run(task, "paper", 32768, "fp32", True, work / f"train-{task}-{solver}-{int(time.time())}", solver)
    results["train"].append({**record, "solver": solver})
    _save(results)


# ----------------------------------------------------------------------------- report


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean, se = _mean_se([scale * v for v in values])
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


GROUPS = {"natural": ("fashion_mnist", "animal_mnist", "digits"),
          "structured": ("dspr_loc", "dspr_orient", "count2d", "distance2d")}


def _by(suite: list[dict], engine: str) -> dict[tuple[str, int], dict]:
    return {(r["task"], r["seed"]): r for r in suite if r["engine"] == engine}


def _values(rows: dict, task: str, seeds, pick) -> list[float]:
    return [pick(rows[(task, s)]) for s in seeds if (task, s) in rows]


def _guard_row(record: dict) -> dict:
    return record["methods"][record["guard"]]


def _paper_full_grid() -> dict[str, dict]:
    """HEAD2TOE with the paper solver's whole grid at T = 512, seed 0, per task (vtab_lite0.json)."""
    path = ROOT / "benchmarks" / "results" / "vtab_lite0.json"
    if not path.exists():
        return {}
    return {r["task"]: r for r in read_json(path, "suite records")["results"]
            if r["method"] == "HEAD2TOE" and r["protocol"] == "paper" and r["seed"] == 0
            and r.get("solver", "paper") == "paper" and r["target_size"] == 512}


def markdown(results: dict) -> str:
    suite = results["suite"]
    engines = {e: _by(suite, e) for e in ENGINES}
    tasks = [t for t in SUITE if any(r["task"] == t for r in suite)]
    seeds_of = {t: sorted({s for (task, s) in engines["paper"] if task == t} & {s for (task, s) in engines["default"]
                                                                                 if task == t}) for t in tasks}
    steps = sorted({tuple(r["steps"]) for r in suite if r["engine"] == "paper" and r["steps"]})
    lines = ["# Selection engines: fit seconds, accuracy and deployed cost", "",
             "EfficientNet-Lite0, T = 512 (28,296 candidate features), 1,000 training and 1,000 test images per "
             "task and seed (digits: 797 test), seeds 0-2. Every engine fits HEAD2TOE and HEAD2TOE+LINEAR on the "
             "same cached features and 5 CV folds, one after the other in one run (`benchmarks/bench_fit_speed.py "
             "suite`); fit s covers both variants, CV and refits. Engines: `paper` = the paper's minibatch-Adam "
             f"solver (`--solver paper`; lr {{0.1, 0.01}} x lambda {{1e-3, 1e-5}} x steps "
             f"{', '.join('/'.join(map(str, s)) for s in steps) or '-'}); `path` = the group-lasso path solver "
             "keeping the best CV accuracy (`--max-accuracy`); `default` = the path solver with the default "
             "deploy-aware choice (tap budgets; the cheapest estimated deployed latency within one standard error "
             "of the best CV accuracy). guard = the `train` choice among LINEAR, HEAD2TOE and HEAD2TOE+LINEAR by "
             "the same rule. Latency: estimated deployed batch-1 latency / plain backbone (bytes model, "
             "`h2t_edge.core.costs`). Cells: mean ± standard error over seeds.", ""]
    if not tasks:
        return "\n".join(lines + ["No records yet."]) + "\n"

    def cell(task, engine, pick, scale=100.0, digits=1):
        return _cell(_values(engines[engine], task, seeds_of[task], pick), scale, digits)

    def h2t(record):
        return record["methods"]["HEAD2TOE"]["test_accuracy"]

    lines += ["## Speed and accuracy: path solver against the paper's", "",
              "| task | seeds | paper fit s | path fit s | default fit s | paper / path | HEAD2TOE test % (paper) | "
              "HEAD2TOE test % (path) | path - paper (paired) | within 1 SE or above |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    totals = {e: 0.0 for e in ENGINES}
    for task in tasks:
        seeds = seeds_of[task]
        if not seeds:
            continue
        fit = {e: _values(engines[e], task, seeds, lambda r: r["fit_seconds"]) for e in ("paper", "path", "default")}
        for e, v in fit.items():
            totals[e] += sum(v)
        paper, path = (_values(engines[e], task, seeds, h2t) for e in ("paper", "path"))
        diff = [a - b for a, b in zip(path, paper)]
        mean_p, se_p = _mean_se(paper)
        ok = sum(path) / len(path) >= mean_p - (0.0 if math.isnan(se_p) else se_p)
        lines.append(f"| {task} | {len(seeds)} | {_cell(fit['paper'], 1)} | {_cell(fit['path'], 1)} | "
                     f"{_cell(fit['default'], 1)} | {sum(fit['paper']) / sum(fit['path']):.2f}x | {_cell(paper)} | "
                     f"{_cell(path)} | {_cell(diff)} | {'yes' if ok else 'no'} |")
    lines += ["", f"All cells: paper {totals['paper']:.0f} s, path {totals['path']:.0f} s, default "
              f"{totals['default']:.0f} s of fitting.", ""]
    full = _paper_full_grid()
    if full:
        lines += ["The paper solver with its whole grid (steps 500 and 5,000), seed 0, from the suite records "
                  "(benchmarks/results/vtab_lite0.json: HEAD2TOE alone, the same features and folds, an earlier "
                  "session on this machine type), against this run's path solver at seed 0 (both variants):", "",
                  "| task | paper, whole grid: fit s | test % | path: fit s | test % | fit s ratio |",
                  "|---|---:|---:|---:|---:|---:|"]
        for task in tasks:
            old, new = full.get(task), engines["path"].get((task, 0))
            if old and new:
                lines.append(f"| {task} | {old['fit_seconds']:.0f} | {100 * old['test_accuracy']:.1f} | "
                             f"{new['fit_seconds']:.0f} | {100 * h2t(new):.1f} | "
                             f"{old['fit_seconds'] / new['fit_seconds']:.1f}x |")
        lines.append("")

    lines += ["## Every method, three seeds (test accuracy %)", "",
              "| method | " + " | ".join(tasks) + " | natural mean | structured mean | mean |",
              "|---|" + "---:|" * (len(tasks) + 3)]
    rows = [("LINEAR", "path", lambda r: r["methods"]["LINEAR"]["test_accuracy"]),
            ("HEAD2TOE, paper solver", "paper", h2t),
            ("HEAD2TOE, path solver", "path", h2t),
            ("HEAD2TOE+LINEAR, path solver", "path", lambda r: r["methods"]["HEAD2TOE+LINEAR"]["test_accuracy"]),
            ("train guard, paper solver, best CV", "paper", lambda r: _guard_row(r)["test_accuracy"]),
            ("train guard, path solver, best CV (--max-accuracy)", "path", lambda r: _guard_row(r)["test_accuracy"]),
            ("train default (path, 1-SE cheapest)", "default", lambda r: _guard_row(r)["test_accuracy"])]
    for label, engine, pick in rows:
        means = {t: _values(engines[engine], t, seeds_of[t], pick) for t in tasks}
        group = {g: [100 * sum(v) / len(v) for t, v in means.items() if t in GROUPS[g] and v] for g in GROUPS}
        every = [100 * sum(v) / len(v) for v in means.values() if v]
        lines.append(f"| {label} | " + " | ".join(_cell(means[t]) for t in tasks) + " | "
                     + " | ".join(f"{sum(v) / len(v):.1f}" if v else "–" for v in group.values())
                     + f" | {sum(every) / len(every):.1f} |")

    lines += ["", "## Deployed cost of the choice", "",
              "Estimated latency / backbone and taps read of the `train` choice (guard) per rule; test accuracy "
              "beside it. budget-1.02: `--latency-budget 1.02`, seed 0 only.", "",
              "| task | best CV: test % | latency | taps | default: test % | latency | taps | "
              "budget-1.02 (seed 0): test % | latency |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task in tasks:
        seeds = seeds_of[task]
        best = (cell(task, "path", lambda r: _guard_row(r)["test_accuracy"]),
                cell(task, "path", lambda r: _guard_row(r)["latency"], 1, 3),
                cell(task, "path", lambda r: _guard_row(r)["taps"], 1))
        cheap = (cell(task, "default", lambda r: _guard_row(r)["test_accuracy"]),
                 cell(task, "default", lambda r: _guard_row(r)["latency"], 1, 3),
                 cell(task, "default", lambda r: _guard_row(r)["taps"], 1))
        b = engines["budget-1.02"].get((task, 0))
        budget = ("–", "–") if b is None else (f"{100 * _guard_row(b)['test_accuracy']:.1f}",
                                               f"{_guard_row(b)['latency']:.3f}")
        lines.append(f"| {task} | {' | '.join(best)} | {' | '.join(cheap)} | {' | '.join(budget)} |")
    lat = {e: sorted(_guard_row(r)["latency"] for r in engines[e].values()) for e in ("path", "default")}
    if lat["default"]:
        lines += ["", "Median estimated latency over every task and seed: best CV "
                  f"{lat['path'][len(lat['path']) // 2]:.3f}x, default {lat['default'][len(lat['default']) // 2]:.3f}x."]

    lines += ["", "HEAD2TOE choices (seed 0): F and features kept.", "",
              "| task | paper F | paper kept | path F | path kept | default F | default kept | default tap budget |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for task in tasks:
        got = {e: engines[e].get((task, 0)) for e in ("paper", "path", "default")}
        if all(got.values()):
            m = {e: r["methods"]["HEAD2TOE"] for e, r in got.items()}
            lines.append(f"| {task} | {m['paper']['config'].get('fraction')} | {m['paper']['n_features']:,} | "
                         f"{m['path']['config'].get('fraction')} | {m['path']['n_features']:,} | "
                         f"{m['default']['config'].get('fraction')} | {m['default']['n_features']:,} | "
                         f"{m['default']['config'].get('tap_budget') or '–'} |")
    if results["train"]:
        lines += ["", "## `h2t-edge train` with its defaults", "",
                  "1,000 training and 1,000 test images of one task (seed 0), 3 target sizes (512 / 2048 / 8192), "
                  "the LINEAR guard, a fresh export and feature cache; seconds from the run's own timings.", "",
                  "| task | solver | export s | extract s | fit s | wall s | chosen | chosen test % | load |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for r in results["train"]:
            t = r["timings"]
            extract = sum(v for k, v in t.items() if k.startswith("extract"))
            lines.append(f"| {r['task']} | {r['solver']} | {t.get('export', 0):.0f} | {extract:.0f} | {t['fit']:.0f} | "
                         f"{r['wall_seconds']:.0f} | {r['chosen']} | {100 * r['chosen_test_accuracy']:.1f} | "
                         f"{r['load_end']:.1f} |")
        for r in results["train"]:
            lines.append("")
            lines.append(f"- {r['task']}, {r['solver']}: " + "; ".join(
                f"{k} CV {100 * v['cv_accuracy']:.1f} / test {100 * v['test_accuracy']:.1f}, {v['n_features']:,} "
                f"features, {v['fit_seconds']:.0f} s" for k, v in sorted(r["candidates"].items())))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("suite", "train", "report"))
    parser.add_argument("--tasks", default=",".join(SUITE))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--paper-steps", default="500", help="steps of the paper engine's grid, comma-separated")
    parser.add_argument("--task", default="dspr_loc", help="the train part's task")
    parser.add_argument("--solver", choices=ENGINES, default="path", help="the train part's solver")
    parser.add_argument("--work-dir", default="h2t-fit-speed")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S"), message, flush=True)

    work = Path(args.work_dir)
    if args.part == "suite":
        run_suite(args.tasks.split(","), [int(s) for s in args.seeds.split(",")],
                  [int(s) for s in args.paper_steps.split(",")], work, log)
        _save(_load())
    elif args.part == "train":
        run_train(args.task, args.solver, work)
    else:
        _save(_load())
    print(f"wrote {OUT.with_suffix('.md')}")


if __name__ == "__main__":
    main()
