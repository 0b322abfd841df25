"""Head2Toe against its baselines on the offline task suite, reported like the paper's Table 1.

For every task x backbone x seed: build the task (1,000 training examples, fixed test set),
extract features once per backbone and target size T (cached, resumable), then fit each
method with its hyperparameters chosen by k-fold CV on the 1,000 examples, refit on all of
them and measure test accuracy (paper Section 4 and Appendix A):

- LINEAR: the pre-logits only (lr x steps);
- ALL-L2, ALL-L1, ALL-L21: all features at the smallest T, one regularized head, no selection
  (lr x steps x lambda);
- HEAD2TOE: group-lasso selection and retraining at every T in `target_sizes`, with F, lambda,
  lr and steps by CV; the T whose best CV accuracy is highest wins (ties go to the smaller T).

Results are one JSON record per (task, method, backbone, seed, protocol), appended to
`<out>.json` as soon as each is done; a rerun skips the records already there, so an
interrupted evaluation loses at most the cell it was fitting. HEAD2TOE's fit at each target
size is also kept (in the train feature cache's `fits/`, keyed by the grid), so a cell
interrupted between target sizes, or rerun with more of them, refits only the missing ones. `write_report` turns the records
into `<out>.md` (Table-1 layout, fit seconds beside it) and `<out>.png` (HEAD2TOE gain over
LINEAR per task).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters import DEFAULT_BACKBONE
from h2t_edge.core.errors import H2TEdgeError
from h2t_edge.core.machine import measured_on
from h2t_edge.core.plots import save_figure
from h2t_edge.selection import FitResult, SearchGrid, choose_best, fit_head2toe, predict_logits
from h2t_edge.selection.methods import HEAD2TOE, LINEAR, TABLE1_METHODS, get_method
from h2t_edge.steps.export import cached_export
from h2t_edge.steps.extract import FeatureCache, extract_features
from h2t_edge.steps.fit import FitKey, load_fit_record, save_fit_record
from h2t_edge.suite.tasks.registry import GROUPS, N_TEST, N_TRAIN, N_VAL, TaskData, build_task, get_task
from runtime.io import atomic_write_json, atomic_write_text, read_json

METHODS = TABLE1_METHODS  # the paper's Table 1 columns, in its order
PAPER_SOLVER_ROW = f"{HEAD2TOE} (paper solver)"  # HEAD2TOE fitted with --solver paper, its own row
PROTOCOLS = {"paper": SearchGrid.paper, "quick": SearchGrid.quick}
RESULTS_FORMAT = "h2t-edge/suite-eval"
DEFAULT_TITLE = "Offline task suite (VTAB-1k protocol): HEAD2TOE and its baselines"
Log = Callable[[str], None]


class EvalError(H2TEdgeError):
    """A bad evaluation request (unknown method, protocol or results file)."""


def grid_for(protocol: str, seed: int, grid: SearchGrid | None = None) -> SearchGrid:
    """The CV grid of `protocol` with the run's seed (it sets the CV folds and batch order)."""
    if grid is None:
        if protocol not in PROTOCOLS:
            raise EvalError(f"protocol {protocol!r} is unknown; use one of {', '.join(PROTOCOLS)}")
        grid = PROTOCOLS[protocol]()
    return dataclasses.replace(grid, seed=seed)


@dataclass
class TaskFeatures:
    """Train and test features of one task and seed at one target size."""

    target_size: int
    train: FeatureCache
    test: FeatureCache
    _x: tuple | None = None

    def arrays(self):
        """(x_train float32[n, D], y_train, x_test float32[m, D], y_test), loaded once."""
        if self._x is None:
            self._x = (*self.train.arrays(), *self.test.arrays())
        return self._x

    def pre_logits(self) -> slice:
        return self.train.layout.pre_logits_columns()

    def fit_key(self, method: str, grid: SearchGrid) -> FitKey:
        """What one fit at this T depends on: the train cache, the method, the grid and the test cache."""
        return FitKey.of(self.train, method, grid, test=self.test.root.name)

    def run_path(self, method: str, grid: SearchGrid) -> Path:
        """Where one fit at this T is kept: inside the train cache (so it belongs to these exact
        features), named by its fit key."""
        return self.train.root / "fits" / f"{method}-{self.fit_key(method, grid).digest()}.json"


def run_eval(
    tasks: Sequence[str],
    out: str | os.PathLike,
    *,
    methods: Sequence[str] = METHODS,
    backbones: Sequence[str] = (DEFAULT_BACKBONE,),
    seeds: Sequence[int] = (0, 1, 2),
    protocol: str = "paper",
    target_sizes: Sequence[int] = (512,),
    work_dir: str | os.PathLike = "h2t-eval",
    data_dir: str | os.PathLike | None = None,
    n_train: int = N_TRAIN,
    n_val: int = N_VAL,
    n_test: int = N_TEST,
    grid: SearchGrid | None = None,
    batch_size: int = 32,
    weights: str = "bundled",
    log: Log | None = None,
) -> list[dict]:
    """Evaluate every task x method x backbone x seed not yet in `<out>.json`; returns all records.

    protocol: 'paper' (5-fold, lr {0.1, 0.01}, steps {500, 5000}) or 'quick' (3-fold, 500 steps);
    `grid` overrides the protocol's grid (its seed is replaced by the run seed) and is recorded.
    """
    log = log or (lambda message: None)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EvalError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    for name in tasks:
        get_task(name)
    target_sizes = sorted(set(int(t) for t in target_sizes))
    json_path = results_path(out)
    records = load_results(json_path)
    done = {record_key(r) for r in records}
    solver = grid_for(protocol, 0, grid).solver
    work = Path(work_dir)
    for backbone in backbones:
        onnx = {}
        for name in tasks:
            for seed in seeds:
                todo = [m for m in methods if _key(name, m, backbone, seed, protocol, solver) not in done]
                if not todo:
                    continue
                data = build_task(name, data_dir, seed, n_train=n_train, n_val=n_val, n_test=n_test)
                sizes = target_sizes if HEAD2TOE in todo else target_sizes[:1]
                feats = {}
                for t in sizes:
                    if t not in onnx:
                        onnx[t] = backbone_export(work, backbone, t, weights, log)
                    feats[t] = feature_caches(work, backbone, t, onnx[t], data, batch_size, log)
                for method in todo:
                    start = time.perf_counter()
                    run_grid = grid_for(protocol, seed, grid)
                    record = _evaluate(method, data, feats, run_grid, log)
                    record.update(task=name, group=data.spec.group, method=method, backbone=backbone,
                                  seed=seed, protocol=protocol, solver=run_grid.solver, n_train=len(data.train),
                                  n_test=len(data.test), **measured_on())
                    records.append(record)
                    done.add(record_key(record))
                    _save(json_path, records)
                    log(f"{name} seed={seed} {backbone} {method}: test {100 * record['test_accuracy']:.1f}% "
                        f"(cv {100 * record['cv_accuracy']:.1f}%, fit {record['fit_seconds']:.0f} s, "
                        f"wall {time.perf_counter() - start:.0f} s)")
    return records


def _key(task: str, method: str, backbone: str, seed: int, protocol: str, solver: str) -> tuple:
    # the solver is HEAD2TOE's alone: other methods' records serve either solver
    return task, method, backbone, seed, protocol, solver if method == HEAD2TOE else None


def record_key(record: dict) -> tuple:
    """What a finished cell is: task, method, backbone, seed, protocol and (HEAD2TOE) solver."""
    return _key(record["task"], record["method"], record["backbone"], record["seed"], record["protocol"],
                solver_of(record))


def solver_of(record: dict) -> str:
    """A record's HEAD2TOE solver; records from before the path solver ran the paper's."""
    return record.get("solver", "paper")


def row_of(record: dict) -> str:
    """A record's row in the tables: its method, with HEAD2TOE split by solver."""
    if record["method"] == HEAD2TOE and solver_of(record) == "paper":
        return PAPER_SOLVER_ROW
    return record["method"]


def results_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out if out.suffix == ".json" else out.with_name(out.name + ".json")


def load_results(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    data = read_json(path, "evaluation results")
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise EvalError(f"{path} is not an h2t-edge evaluation results file; choose another --out")
    return list(data["results"])


def _save(path: Path, records: list[dict]) -> None:
    atomic_write_json(path, {"format": RESULTS_FORMAT, "version": 1, "results": records})


def backbone_export(work: Path, backbone: str, target_size: int, weights: str, log: Log) -> Path:
    """The suite's export of `backbone` at T in WORK/backbones (the one export cache, keyed by weights too)."""
    path, report = cached_export(work / "backbones", backbone, weights, [target_size])
    if report is not None:
        log(f"exported {path} ({report.layout.total_features} features) in {report.seconds:.0f} s")
    return path


def feature_caches(work: Path, backbone: str, t: int, onnx: Path, data: TaskData, batch_size: int,
                   log: Log) -> TaskFeatures:
    """Train and test feature caches of one task and seed at T under WORK/features, extracted on first use."""
    root = work / "features" / f"{backbone}-T{t}" / data.spec.name
    caches = {}
    for split, ds, folder in (("train", data.train, f"train-seed{data.seed}"), ("test", data.test, "test")):
        start = time.perf_counter()
        # the dataset's fingerprint in the name: another size or version of the task gets its own cache
        cache_dir = root / f"{folder}-{ds.fingerprint()[:12]}"
        caches[split] = extract_features(onnx, ds, cache_dir, batch_size=batch_size, dtype="float16")
        seconds = time.perf_counter() - start
        if seconds > 5:
            log(f"extracted {data.spec.name}/{folder} at T={t}: {len(ds)} images in {seconds:.0f} s")
    return TaskFeatures(t, caches["train"], caches["test"])


def task_features(task: str, target_size: int, *, backbone: str = DEFAULT_BACKBONE, seed: int = 0,
                  work_dir: str | os.PathLike = "h2t-eval", data_dir: str | os.PathLike | None = None,
                  weights: str = "bundled", batch_size: int = 32, log: Log | None = None):
    """(x_train, y_train, x_test, y_test, n_classes) of one task at target size T, from the same
    caches `run_eval` uses (built on first use)."""
    log = log or (lambda message: None)
    work = Path(work_dir)
    data = build_task(task, data_dir, seed)
    onnx = backbone_export(work, backbone, target_size, weights, log)
    return (*feature_caches(work, backbone, target_size, onnx, data, batch_size, log).arrays(),
            len(data.train.classes))


def holdout_accuracy(result: FitResult, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Share of test rows whose argmax logit is the label."""
    return float((predict_logits(result.head, x_test).argmax(1) == y_test).mean())


def best_cv_accuracy(result: FitResult) -> float:
    """The best mean validation accuracy of the fit's CV table."""
    return max(row["val_acc_mean"] for row in result.cv_table)


def _evaluate(method: str, data: TaskData, feats: dict[int, TaskFeatures], grid: SearchGrid,
              log: Log | None = None) -> dict:
    n_classes = len(data.train.classes)
    smallest = feats[min(feats)]
    if method == HEAD2TOE:
        runs = []
        for t, f in sorted(feats.items()):
            # each T's fit is kept as soon as it ends: an interrupted or extended run reuses it
            path, key = f.run_path(method, grid), f.fit_key(method, grid)
            kept = load_fit_record(path, key)
            if kept is not None:
                runs.append(kept["run"])
                continue
            x, y, xt, yt = f.arrays()
            result = fit_head2toe(x, y, n_classes, grid)
            runs.append(_fit_record(t, x.shape[1], result, xt, yt))
            save_fit_record(path, key, {"run": runs[-1]})
            if log is not None and len(feats) > 1:
                log(f"  HEAD2TOE at T={t}: {x.shape[1]} candidates, cv {100 * runs[-1]['cv_accuracy']:.1f}%, "
                    f"fit {result.fit_seconds:.0f} s")
        best = choose_best(runs, lambda r: r["cv_accuracy"], lambda r: r["n_features"], lambda r: r["target_size"])
        return {**{k: best[k] for k in ("target_size", "candidates", "cv_accuracy", "test_accuracy",
                                         "n_features", "config")},
                "fit_seconds": sum(r["fit_seconds"] for r in runs), "per_target_size": runs,
                "grid": grid.to_dict()}
    x, y, xt, yt = smallest.arrays()
    entry = get_method(method, error=EvalError)
    columns = entry.columns(smallest.train.layout)
    if columns is not None:
        x, xt = x[:, columns], xt[:, columns]
    result = entry.fit(x, y, n_classes, grid, layout=smallest.train.layout)
    return {**_fit_record(smallest.target_size, x.shape[1], result, xt, yt), "grid": grid.to_dict()}


def _fit_record(target_size: int, candidates: int, result: FitResult, x_test, y_test) -> dict:
    """What one fit at one target size contributes to a results record."""
    return {"target_size": target_size, "candidates": int(candidates), "cv_accuracy": best_cv_accuracy(result),
            "test_accuracy": holdout_accuracy(result, x_test, y_test), "fit_seconds": result.fit_seconds,
            "n_features": int(len(result.head.features)), "config": result.config}


# ----------------------------------------------------------------------------- report


@dataclass
class Cell:
    median: float
    spread: float  # half the min-max range over seeds
    seeds: int
    protocol: str


def summarize(records: list[dict], field: str = "test_accuracy") -> dict[tuple, Cell]:
    """{(backbone, task, method): Cell} over seeds; the paper protocol wins where both exist."""
    by: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        by.setdefault((r["backbone"], r["task"], row_of(r)), {}).setdefault(r["protocol"], []).append(r[field])
    cells = {}
    for key, protocols in by.items():
        protocol = "paper" if "paper" in protocols else sorted(protocols)[0]
        values = np.asarray(protocols[protocol], dtype=np.float64)
        cells[key] = Cell(float(np.median(values)), float(values.max() - values.min()) / 2, len(values), protocol)
    return cells


def _ordered_tasks(records: list[dict]) -> dict[str, list[str]]:
    present = list(dict.fromkeys(r["task"] for r in records))
    from h2t_edge.suite.tasks.registry import list_tasks

    order = [s.name for s in list_tasks()] + present
    tasks = [t for t in dict.fromkeys(order) if t in present]
    groups = {r["task"]: r["group"] for r in records}
    return {g: [t for t in tasks if groups[t] == g] for g in GROUPS}


def _group_mean(cells, backbone, method, tasks) -> float | None:
    values = [cells[(backbone, t, method)].median for t in tasks if (backbone, t, method) in cells]
    return float(np.mean(values)) if tasks and len(values) == len(tasks) else None


def report_markdown(records: list[dict], title: str = DEFAULT_TITLE) -> str:
    """Table 1 layout per backbone: rows are methods, columns are tasks by group, group means."""
    if not records:
        return f"# {title}\n\nNo results yet.\n"
    cells = summarize(records)
    secs = summarize(records, "fit_seconds")
    groups = _ordered_tasks(records)
    all_tasks = [t for g in GROUPS for t in groups[g]]
    order = [PAPER_SOLVER_ROW if m == HEAD2TOE else m for m in METHODS] + [HEAD2TOE]
    methods = [m for m in order if any(row_of(r) == m for r in records)]
    lines = [f"# {title}", ""]
    for backbone in dict.fromkeys(r["backbone"] for r in records):
        most_seeds = max(c.seeds for k, c in cells.items() if k[0] == backbone)
        header, rule = ["method"], ["---"]
        for g in GROUPS:
            if groups[g]:
                header += groups[g] + [f"**{g.capitalize()} mean**"]
                rule += ["---:"] * (len(groups[g]) + 1)
        header.append("**Overall mean**")
        rule.append("---:")
        lines += [f"## {backbone}: test accuracy (%)", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(rule) + "|"]
        for method in methods:
            row = [method]
            for g in GROUPS:
                if not groups[g]:
                    continue
                for t in groups[g]:
                    c = cells.get((backbone, t, method))
                    row.append("–" if c is None else
                               f"{100 * c.median:.1f} ± {100 * c.spread:.1f}" + ("†" if c.protocol != "paper" else "")
                               + (f" (n={c.seeds})" if c.seeds < most_seeds else ""))
                mean = _group_mean(cells, backbone, method, groups[g])
                row.append("–" if mean is None else f"**{100 * mean:.1f}**")
            mean = _group_mean(cells, backbone, method, all_tasks)
            row.append("–" if mean is None else f"**{100 * mean:.1f}**")
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", _caption(records, cells, backbone, all_tasks), ""]
        machines = sorted({r["machine"] for r in records if r.get("backbone") == backbone and r.get("machine")})
        lines += [f"## {backbone}: fit + CV seconds per method (median over seeds; "
                  f"{'; '.join(machines) or 'machine not recorded'})", "",
                  "| method | " + " | ".join(all_tasks) + " | total |",
                  "|---|" + "---:|" * (len(all_tasks) + 1)]
        for method in methods:
            values = [secs.get((backbone, t, method)) for t in all_tasks]
            total = sum(v.median for v in values if v is not None)
            lines.append(f"| {method} | " + " | ".join("–" if v is None else f"{v.median:.0f}" for v in values)
                         + f" | {total:.0f} |")
        lines += ["", _choices_table(records, backbone, all_tasks), ""]
        lines += _target_size_table(records, backbone, all_tasks)
    return "\n".join(lines)


def _target_size_table(records, backbone, tasks) -> list[str]:
    """HEAD2TOE at each target size, where a record tried more than one (CV picks the row marked *)."""
    rows = []
    for t in tasks:
        for r in sorted((r for r in records if r["backbone"] == backbone and r["task"] == t
                         and r["method"] == HEAD2TOE and len(r.get("per_target_size", [])) > 1),
                        key=lambda r: (r["protocol"], solver_of(r), r["seed"])):
            for run in r["per_target_size"]:
                c = run["config"]
                mark = "*" if run["target_size"] == r["target_size"] else ""
                rows.append(f"| {t} | {r['protocol']} | {solver_of(r)} | {r['seed']} | {run['target_size']}{mark} | {run['candidates']:,} "
                            f"| {c.get('screened_to') or '–'} | {100 * run['cv_accuracy']:.1f} | "
                            f"{100 * run['test_accuracy']:.1f} | {run['n_features']:,} | {run['fit_seconds']:.0f} |")
    if not rows:
        return []
    return ["HEAD2TOE at each target size (* = chosen by CV; screened: candidates per fold when the pool "
            "was screened).", "", "| task | protocol | solver | seed | T | candidates | screened | CV acc | test acc | "
            "kept | fit + CV s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]


def _caption(records, cells, backbone, tasks) -> str:
    notes = []
    for t in tasks:
        proto = {cells[k].protocol for k in cells if k[0] == backbone and k[1] == t}
        seeds = sorted({r["seed"] for r in records if r["backbone"] == backbone and r["task"] == t})
        sizes = sorted({run["target_size"] for r in records if r["backbone"] == backbone and r["task"] == t
                        for run in r.get("per_target_size", [r])})
        n = {(r["n_train"], r["n_test"]) for r in records if r["task"] == t}
        notes.append(f"{t}: {'/'.join(sorted(proto))} protocol, seeds {seeds}, T {sizes}, "
                     + ", ".join(f"{a} train / {b} test" for a, b in sorted(n)))
    return ("Cells: median over seeds ± half the min–max range; (n=k) marks a cell with fewer seeds than the "
            "others. Group means average the per-task medians. "
            "† marks cells measured with the reduced protocol (`quick`: 3-fold CV, 500 steps) instead of the "
            "paper's (5-fold CV, lr {0.1, 0.01} x steps {500, 5000}). " + "; ".join(notes) + ".")


def _choices_table(records, backbone, tasks) -> str:
    lines = ["HEAD2TOE choices by CV (seed 0 and the path solver where present): solver, target size T, "
             "fraction F, features kept / candidates, lambda, lr, steps (the path solver has no lr or steps).", "",
             "| task | solver | T | F | kept / candidates | lambda | lr | steps |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in tasks:
        rs = sorted((r for r in records if r["backbone"] == backbone and r["task"] == t
                     and r["method"] == HEAD2TOE),
                    key=lambda r: (r["protocol"] != "paper", solver_of(r) != "path", r["seed"]))
        if rs:
            r, c = rs[0], rs[0]["config"]
            lines.append(f"| {t} | {solver_of(r)} | {r['target_size']} | {c['fraction']} | {r['n_features']:,} / "
                         f"{r['candidates']:,} | {c['l21']:.3g} | {c['lr'] or '–'} | {c['steps'] or '–'} |")
    return "\n".join(lines)


def plot_gains(records: list[dict], path: str | os.PathLike) -> Path | None:
    """PNG bar chart of HEAD2TOE - LINEAR test accuracy per task (median over seeds; bars: range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cells = summarize(records)
    groups = _ordered_tasks(records)
    tasks = [t for g in GROUPS for t in groups[g]]
    backbones = list(dict.fromkeys(r["backbone"] for r in records))
    colours = {"natural": "#4c72b0", "structured": "#dd8452"}
    fig, axes = plt.subplots(1, len(backbones), figsize=(1.1 * len(tasks) + 2, 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        xs, gains, errs, cols = [], [], [], []
        for i, t in enumerate(tasks):
            row = HEAD2TOE if (backbone, t, HEAD2TOE) in cells else PAPER_SOLVER_ROW
            h, lin = cells.get((backbone, t, row)), cells.get((backbone, t, LINEAR))
            if h is None or lin is None:
                continue
            paired = _paired_gains(records, backbone, t, row)
            xs.append(i)
            gains.append(100 * (h.median - lin.median))
            errs.append([[100 * (h.median - lin.median - paired.min())], [100 * (paired.max() - h.median + lin.median)]]
                        if paired.size else [[0], [0]])
            cols.append(colours[next(r["group"] for r in records if r["task"] == t)])
        if not xs:
            continue
        err = np.clip(np.concatenate([np.asarray(e, dtype=float) for e in errs], axis=1), 0, None)
        bars = ax.bar(xs, gains, color=cols, yerr=err, capsize=3)
        ax.bar_label(bars, fmt="%+.1f", padding=2, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_ylabel("HEAD2TOE − LINEAR, test accuracy (points)")
        ax.set_title(f"{backbone}: median over seeds, bars span the per-seed gains", fontsize=9)
        ax.legend(handles=[Patch(color=c, label=g) for g, c in colours.items()], loc="upper left")
    return save_figure(fig, path)


def _paired_gains(records, backbone, task, row: str = HEAD2TOE) -> np.ndarray:
    """HEAD2TOE (the table row `row`) - LINEAR per seed (same protocol), for the error bars."""
    acc = {(row_of(r), r["seed"], r["protocol"]): r["test_accuracy"] for r in records
           if r["backbone"] == backbone and r["task"] == task}
    return np.asarray([v - acc[(LINEAR, s, p)] for (m, s, p), v in acc.items()
                       if m == row and (LINEAR, s, p) in acc])


def write_report(out: str | os.PathLike, title: str = DEFAULT_TITLE) -> dict[str, Path]:
    """Write `<out>.md` and `<out>.png` from the records in `<out>.json`."""
    json_path = results_path(out)
    records = load_results(json_path)
    base = json_path.with_suffix("")
    text = report_markdown(records, title)
    protocols = sorted({r["protocol"] for r in records})
    if len(protocols) > 1:  # the main table prefers the paper protocol; also show each protocol alone
        for protocol in protocols:
            text += "\n\n#" + report_markdown([r for r in records if r["protocol"] == protocol],
                                              f"{protocol} protocol only")
    paths = {"json": json_path, "md": atomic_write_text(base.with_suffix(".md"), text + "\n")}
    if records:
        paths["png"] = plot_gains(records, base.with_suffix(".png"))
    return paths
