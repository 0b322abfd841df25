"""`h2t-edge train`: the whole Head2Toe protocol on a user's images in one call.

    export (once per backbone and set of target sizes T, cached)
    -> extract (one backbone pass writes one feature cache per T)
    -> fit with CV: HEAD2TOE and HEAD2TOE+LINEAR at every T, LINEAR on the pre-logits
    -> choose the candidate with the best CV accuracy (the guard below)
    -> compile it -> test accuracy (with a test set) -> report.json + report.html

Everything lands in TASK_DIR and a rerun redoes nothing that finished: the export is keyed by its
settings, extraction resumes per batch, each T's fit and the LINEAR fit are kept with the grid and
feature identity they were made with, and the compiled graph with the head it was compiled from.

The guard against losing to LINEAR (this departs from the paper). The paper picks T, F, lambda, lr
and steps for HEAD2TOE by CV and reports it against LINEAR; nothing in that recipe stops HEAD2TOE
from losing to LINEAR, and the paper's Table 1 has tasks where it does. Here three candidates are
cross-validated on the same folds: HEAD2TOE, LINEAR (pre-logits only) and HEAD2TOE+LINEAR, whose
selection always keeps the pre-logits and adds the best-ranked features of the same group-lasso run
(`h2t_edge.selection.fit_head2toe_variants`), so it can only add to LINEAR's features. The final model is the
candidate with the best mean CV accuracy (ties: fewer features, then the smaller T). The guard
compares CV scores, not test scores: it cannot promise a better test accuracy, and the best of a
larger grid (HEAD2TOE's) is the more optimistic CV estimate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exporters import DEFAULT_BACKBONE
from h2t_edge.core.artifacts import TaskHead
from h2t_edge.core.errors import CacheError, H2TEdgeError
from h2t_edge.core.progress import Progress
from h2t_edge.selection import SearchGrid, choose_best, fit_head2toe_variants
from h2t_edge.selection.grid import choose_cheapest, chosen_row, standard_error
from h2t_edge.selection.taps import TapPlan
from h2t_edge.selection.methods import HEAD2TOE, HEAD2TOE_LINEAR, LINEAR, get_method
from h2t_edge.steps.compile import compile_step
from h2t_edge.steps.export import cached_export, cached_export_path
from h2t_edge.steps.extract import FeatureCache, extract_features_multi, is_feature_cache
from h2t_edge.steps.fit import FitKey, check_same_backbone, head_from_fit, load_fit_record, save_fit_record
from h2t_edge.steps.precision import PrecisionGraph, check_supported, precision_graph, runner_options
from runtime.io import atomic_write_json, file_sha256, read_json

Log = Callable[[str], None]

# the paper's small / medium / large target sizes (Appendix A) where it gives them; the CNN default
# spans a similar range of candidate counts (EfficientNet-Lite0: 28k, 80k, 422k features)
PAPER_TARGET_SIZES = {"resnet50": (1024, 16384, 40000), "vit_base_patch16_224": (768, 15360, 32448)}
DEFAULT_TARGET_SIZES = (512, 2048, 8192)


class TrainError(H2TEdgeError):
    """A train request that cannot run (no target size, unknown cache layout, ...)."""


def default_target_sizes(backbone: str) -> tuple[int, ...]:
    """The small, medium and large target sizes searched for `backbone` by default."""
    return PAPER_TARGET_SIZES.get(backbone, DEFAULT_TARGET_SIZES)


@dataclass
class Candidate:
    """One cross-validated model: a method at one target size (LINEAR: the pre-logits)."""

    method: str
    target_size: int
    cv_accuracy: float  # mean over folds of the best grid point
    cv_se: float  # standard error over folds of that grid point
    n_features: int
    candidates: int  # features the method chose from
    config: dict
    fit_seconds: float
    path: str  # task artifact directory
    test_accuracy: float | None = None
    latency: float | None = None  # estimated deployed batch-1 latency / the backbone's (h2t_edge.core.costs)
    taps: list[str] | None = None  # the taps its head reads

    @property
    def key(self) -> str:
        return self.method if self.method == LINEAR else f"{self.method}@T{self.target_size}"


@dataclass
class Selection:
    """Every candidate and the chosen one (the best CV accuracy)."""

    candidates: list[Candidate]
    chosen: Candidate
    model_dir: Path
    grid: dict
    cv_rows: dict[str, list[dict]] = field(default_factory=dict)  # candidate key -> CV table
    rungs: list[dict] = field(default_factory=list)  # successive halving over T (`run_rungs`); [] without it

    def by_key(self) -> dict[str, Candidate]:
        return {c.key: c for c in self.candidates}


def choose(candidates: Sequence[Candidate], rule: str = "accuracy", latency_budget: float | None = None,
           min_saving: float = 0.0) -> Candidate:
    """rule "accuracy": the best mean CV accuracy; ties go to fewer features, then the smaller T
    (`choose_best`). rule "cheapest": the least estimated latency within one standard error of that,
    among those saving at least min_saving x the backbone's latency (`choose_cheapest`).
    latency_budget R: only candidates at most R x the backbone compete."""
    if latency_budget is not None:
        within = [c for c in candidates if c.latency is not None and c.latency <= latency_budget + 1e-9]
        if not within:
            cheapest = min(candidates, key=lambda c: c.latency if c.latency is not None else float("inf"))
            raise TrainError(f"no candidate fits --latency-budget {latency_budget:g}: the cheapest, {cheapest.key}, is "
                             f"estimated at {cheapest.latency:.3f}x the backbone; raise the budget")
        candidates = within
    tie_breaks = (lambda c: c.n_features, lambda c: c.target_size)
    if rule == "cheapest" and all(c.latency is not None for c in candidates):
        return choose_cheapest(candidates, lambda c: c.cv_accuracy, lambda c: c.cv_se, lambda c: c.latency,
                               *tie_breaks, min_saving=min_saving)
    return choose_best(candidates, lambda c: c.cv_accuracy, *tie_breaks)


# ----------------------------------------------------------------------------- fit over T


def _candidate(head: TaskHead, target_size: int, candidates: int, path: Path, taps: TapPlan) -> Candidate:
    row = chosen_row(head.report["cv_table"], head.config)
    return Candidate(head.method, target_size, float(row["val_acc_mean"]),
                     standard_error(row, head.config.get("folds", 2)), int(len(head.features)), int(candidates),
                     head.config, float(head.report["fit_seconds"]), str(path), latency=taps.latency(head.features),
                     taps=taps.taps_read(head.features))


def fit_target_sizes(caches: dict[int, FeatureCache], out: str | Path, *, grid=None, task: str | None = None,
                     guard: bool = True, progress: Progress | None = None, log: Log | None = None,
                     allowed_taps: Sequence[str] | None = None) -> Selection:
    """Fit HEAD2TOE (and HEAD2TOE+LINEAR when `guard`) on every cache, LINEAR once, and keep the
    candidate with the best CV accuracy in OUT/model/.

    caches: {T: FeatureCache of the same images}. Each fit is written to OUT/candidates/ as soon
    as it ends with the grid and features it used; a rerun reuses it. Without `guard` only
    HEAD2TOE competes (the paper's choice of T); LINEAR is still fitted, for comparison.
    allowed_taps: HEAD2TOE reads only these taps and the pre-logits (`--taps-from`).
    The choice follows grid.choice and grid.latency_budget (`choose`).
    """

    grid = grid or SearchGrid.paper()
    log = log or (lambda message: None)
    if not caches:
        raise TrainError("no feature cache to fit; give at least one target size")
    out = Path(out)
    task = task or out.name
    first = caches[min(caches)]
    for t, cache in caches.items():
        if cache.backbone_sha256 != first.backbone_sha256 and cache.layout.backbone != first.layout.backbone:
            raise TrainError(f"feature caches {first.root} and {cache.root} come from different backbones; "
                             "fit target sizes of one backbone together")
        if cache.manifest["dataset"]["fingerprint"] != first.manifest["dataset"]["fingerprint"]:
            raise TrainError(f"feature caches {first.root} and {cache.root} hold different images; "
                             "extract every target size from the same dataset")
    pre_logits = first.layout.pre_logits
    if pre_logits not in {tap["name"] for tap in first.layout["taps"]}:
        raise TrainError(f"feature cache {first.root} lacks the pre-logits tap {pre_logits!r}, which LINEAR and "
                         f"the guard need; export with it (add --tap {pre_logits})")
    candidates: list[Candidate] = []
    cv_rows: dict[str, list[dict]] = {}

    def kept_or_fit(name: str, cache: FeatureCache, fit: Callable[[], dict]) -> None:
        """fit() -> {method: (FitResult, column offset)}; kept in OUT/candidates/<name>/."""
        root = out / "candidates" / name
        methods = [LINEAR] if name == "linear" else [HEAD2TOE, *([HEAD2TOE_LINEAR] if guard else [])]
        key = FitKey.of(cache, methods, grid, guard=guard, task=task, allowed_taps=allowed_taps)
        kept = load_fit_record(root / "fit.json", key)
        if kept is None:
            log(f"fitting {name} ({cache.layout.total_features:,} candidate features) ...")
            start = time.perf_counter()
            results = fit()
            for method, (result, offset) in results.items():
                head_from_fit(result, cache, task, offset, grid).save(root / method.lower())
            # last: marks the fit as complete
            kept = save_fit_record(root / "fit.json", key, {"methods": list(results),
                                                             "seconds": time.perf_counter() - start})
            log(f"fitted {name}: {', '.join(results)} in {kept['seconds']:.0f} s")
        else:
            log(f"kept fit {name} ({', '.join(kept['methods'])})")
        pre = cache.layout.pre_logits_columns()
        plan = TapPlan.of(cache.layout)
        for method in kept["methods"]:
            head = TaskHead.load(root / method.lower())
            pool = pre.stop - pre.start if method == LINEAR else cache.layout.total_features
            c = _candidate(head, cache.layout.target_size, pool, root / method.lower(), plan)
            candidates.append(c)
            cv_rows[c.key] = head.report["cv_table"]

    memos: dict[int, dict] = {t: {} for t in caches}  # a rung's CV path, for the full fit at its T
    rungs = run_rungs(caches, out, grid, task=task, guard=guard, progress=progress, log=log, allowed_taps=allowed_taps,
                      memos=memos)
    advanced = {r["target_size"] for r in rungs if r["advanced"]} if rungs else set(caches)
    for t in set(memos) - advanced:
        memos.pop(t)
    for t in sorted(advanced):
        cache = caches[t]

        def fit_h2t(cache=cache, memo=memos.get(t)):
            x, y = cache.column_source()  # large pools are screened in streamed blocks
            results = fit_head2toe_variants(x, y, len(cache.classes), grid, progress, keep=_guard_columns(cache, guard),
                                            taps=TapPlan.of(cache.layout, allowed_taps=allowed_taps), memo=memo)
            return {m: (r, 0) for m, r in results.items()}

        kept_or_fit(f"T{t}", cache, fit_h2t)

    smallest = caches[min(caches)]
    pre = smallest.layout.pre_logits_columns()

    def fit_lin():
        linear = get_method(LINEAR)
        x, y = smallest.arrays(linear.columns(smallest.layout))
        return {LINEAR: (linear.fit(x, y, len(smallest.classes), grid, progress), pre.start)}

    kept_or_fit("linear", smallest, fit_lin)
    pool = candidates if guard else [c for c in candidates if c.method == HEAD2TOE]
    chosen = choose(pool, grid.choice, grid.latency_budget, grid.min_saving)
    model_dir = out / "model"
    head = TaskHead.load(chosen.path)
    head.config = {**head.config, "chosen": {"method": chosen.method, "target_size": chosen.target_size,
                                             "cv_accuracy": chosen.cv_accuracy, "guard": guard,
                                             "rule": grid.choice, "latency_budget": grid.latency_budget,
                                             "latency_estimate": chosen.latency, "taps_read": chosen.taps}}
    head.save(model_dir)
    atomic_write_json(out / "selection.json", {
        "chosen": chosen.key, "guard": guard, "grid": grid.to_dict(),
        "candidates": [asdict(c) for c in candidates], "rungs": rungs})
    return Selection(candidates, chosen, model_dir, grid.to_dict(), cv_rows, rungs)


def advance(rungs: Sequence[dict], margin: float) -> set[int]:
    """The target sizes whose rung reaches the best rung's CV accuracy minus `margin` of its
    standard errors (the best always advances; ties in accuracy go to the smaller T)."""
    top = choose_best(rungs, lambda r: r["cv_accuracy"], lambda r: r["target_size"])
    floor = round(top["cv_accuracy"] - margin * top["cv_se"], 9)
    return {r["target_size"] for r in rungs if round(r["cv_accuracy"], 9) >= floor}


def _guard_columns(cache: FeatureCache, guard: bool) -> np.ndarray | None:
    """The columns HEAD2TOE+LINEAR keeps (the pre-logits) when `guard`, else None."""
    columns = cache.layout.pre_logits_columns()
    return np.arange(columns.start, columns.stop) if guard else None


def run_rungs(caches: dict[int, FeatureCache], out: Path, grid: SearchGrid, *, task: str, guard: bool,
              progress: Progress | None, log: Log, allowed_taps: Sequence[str] | None,
              memos: dict[int, dict] | None = None) -> list[dict]:
    """Successive halving over T (`SearchGrid.halving`): a cheap rung per T (HEAD2TOE, one path
    point, F up to `RUNG_MAX_FRACTION`: `fit_head2toe_path(rung=True)`), kept in
    OUT/candidates/T<t>/rung.json like a fit. Returns one row per T: target_size, cv_accuracy,
    cv_se, fraction, n_features, seconds, advanced (whether it gets the full fit: `advance`).
    [] (every T gets the full fit) with halving None, one T, or the paper solver.
    memos: {T: dict} in which each rung leaves its CV path for the full fit at its T (the rung is
    given the guard's kept columns, so that a streamed pool is the one the full fit screens).

    Why: at large T a head of a few hundred columns already fits every training row, and the
    CV retraining of wide heads, most of a large-T fit, goes to the candidates that score worst; a
    rung at about a tenth of a fit ranks the T as the full CV does on the tasks measured."""
    if grid.halving is None or len(caches) < 2 or grid.solver != "path":
        return []
    rows = []
    for t in sorted(caches):
        cache = caches[t]
        key = FitKey.of(cache, [HEAD2TOE], grid, guard=guard, task=task, allowed_taps=allowed_taps, rung=True)
        record_path = out / "candidates" / f"T{t}" / "rung.json"
        kept = load_fit_record(record_path, key)
        if kept is None:
            log(f"rung T{t} ({cache.layout.total_features:,} candidate features) ...")
            start = time.perf_counter()
            x, y = cache.column_source()
            result = fit_head2toe_variants(x, y, len(cache.classes), grid, progress, rung=True,
                                           keep=_guard_columns(cache, guard), memo=(memos or {}).get(t),
                                           taps=TapPlan.of(cache.layout, allowed_taps=allowed_taps))[HEAD2TOE]
            del x
            row = chosen_row(result.cv_table, result.config)
            kept = save_fit_record(record_path, key, {"rung": {
                "target_size": t, "cv_accuracy": float(row["val_acc_mean"]),
                "cv_se": standard_error(row, grid.folds), "fraction": row["fraction"],
                "n_features": int(row["n_features"]), "seconds": time.perf_counter() - start}})
        rows.append(dict(kept["rung"]))
    chosen = advance(rows, grid.halving)
    for row in rows:
        row["advanced"] = row["target_size"] in chosen
    log("rungs: " + ", ".join(f"T{r['target_size']} {100 * r['cv_accuracy']:.1f}% ± {100 * r['cv_se']:.1f}"
                              f"{' (advances)' if r['advanced'] else ''}" for r in rows))
    return rows


def open_caches(paths: Sequence[str | Path], target_sizes: Sequence[int] = ()) -> dict[int, FeatureCache]:
    """Feature caches by target size from paths that are caches, or folders of `T<t>/` caches
    (as `train` writes them); target_sizes, when given, keeps only those."""
    caches: dict[int, FeatureCache] = {}
    for p in map(Path, paths):
        roots = [p] if is_feature_cache(p) else sorted(c for c in p.glob("T*") if is_feature_cache(c))
        if not roots:
            raise CacheError(f"{p} has no manifest.json, nor T<size>/ folders with one: it is not a "
                             "feature cache; pass the --cache folders that `h2t-edge extract` wrote")
        for root in roots:
            cache = FeatureCache.open(root)
            t = cache.layout.target_size
            if t in caches:
                raise TrainError(f"two caches at target size T={t}: {caches[t].root} and {root}; pass one")
            caches[t] = cache
    if target_sizes:
        missing = sorted(set(target_sizes) - set(caches))
        if missing:
            raise TrainError(f"no cache at target size {missing} among {sorted(caches)}; extract it first")
        caches = {t: caches[t] for t in target_sizes}
    return caches


def fit_caches(paths: Sequence[str | Path], out: str | Path, *, target_sizes: Sequence[int] = (), grid=None,
               task: str | None = None, guard: bool = True, progress: Progress | None = None,
               log: Log | None = None, allowed_taps: Sequence[str] | None = None) -> Selection:
    """`h2t-edge fit` with several caches: `fit_target_sizes` on `open_caches(paths, target_sizes)`,
    then OUT/report.json and OUT/report.html (no test set)."""
    from h2t_edge.train.report import write_report

    grid = grid or SearchGrid.paper()
    caches = open_caches(paths, target_sizes)
    start = time.perf_counter()
    selection = fit_target_sizes(caches, out, grid=grid, task=task, guard=guard, progress=progress, log=log,
                                 allowed_taps=allowed_taps)
    first = caches[min(caches)]
    settings = _settings(first.manifest["dataset"]["source"], None, first.layout.backbone,
                         first.layout.weights, sorted(caches), None, first.layout.cls_token, guard, grid,
                         str(first.manifest["backbone"]["onnx"]), int(first.valid.sum()), 0, first.classes)
    write_report(Path(out), selection, caches, settings, {"fit": time.perf_counter() - start}, None)
    return selection


def _settings(dataset, test, backbone, weights, sizes, taps, cls_token, guard, grid, export, n_train, n_test,
              classes, unreadable=(), taps_from=None) -> dict:
    return {"dataset": str(dataset), "test": None if test is None else str(test), "backbone": backbone,
            "weights": weights, "target_sizes": list(sizes), "taps": list(taps) if taps else None,
            "cls_token": cls_token, "guard": guard, "grid": grid.to_dict(), "export": str(export),
            "train_images": n_train, "test_images": n_test, "classes": list(classes),
            "unreadable_images": list(unreadable), "taps_from": None if taps_from is None else str(taps_from)}


# ----------------------------------------------------------------------------- the train command


@dataclass
class TrainReport:
    task_dir: Path
    selection: Selection
    graph: Path
    timings: dict[str, float]
    report: dict
    skipped: list[str]  # steps found finished and not redone


def train(dataset: str | Path, task_dir: str | Path, *, test: str | Path | None = None,
          backbone: str = DEFAULT_BACKBONE, weights: str = "bundled",
          target_sizes: Sequence[int] | None = None, grid=None, taps: Sequence[str] | None = None,
          cls_token: str = "pool", guard: bool = True, cache_dir: str | Path | None = None,
          batch_size: int = 32, dtype: str = "float16", on_error: str = "raise",
          progress: Progress | None = None, log: Log | None = None,
          taps_from: str | Path | None = None, precision: str = "fp32", backend: str = "onnxruntime",
          calibration: str | None = None, calibration_images: int | None = None,
          compare_fp32: bool = True) -> TrainReport:
    """Export, extract, fit over target sizes with the LINEAR guard, compile, test, report.

    dataset / test: a folder of class subfolders or a .csv/.jsonl manifest (the test set is read
    with the training classes). target_sizes: default `default_target_sizes(backbone)`.
    cache_dir: where exports and feature caches go (default TASK_DIR/work; share one between
    tasks to reuse the export). Writes TASK_DIR/model/ (the chosen task artifact), model.onnx +
    model.json (compiled), candidates/ (every CV fit), report.json and report.html.
    taps_from: a deployment (`deploy` folder, compiled graph or task folder) whose taps alone HEAD2TOE
    may read, so that the task adds no tap to that device (`allowed_device_taps`).
    precision / backend: what the task will run at and on. Other than fp32 on onnxruntime, the
    extraction graph is built at that precision (`steps.precision.precision_graph`; int8 calibrated
    on `calibration_images` training images with method `calibration`), the features are extracted
    through it, every fit runs on them, and the compiled graph is cut from that same graph.
    compare_fp32 (with a precision): also fit the chosen target size on fp32 features and report
    both side by side (CV and test accuracy, measured batch-1 latency of both compiled graphs).
    """
    from h2t_edge.core.datasets import load_dataset
    from h2t_edge.train.report import write_report

    log = log or (lambda message: None)
    grid = grid or SearchGrid.paper()
    task_dir = Path(task_dir)
    work = Path(cache_dir) if cache_dir is not None else task_dir / "work"
    sizes = sorted(set(int(t) for t in (target_sizes or default_target_sizes(backbone))))
    if not sizes or sizes[0] < 1:
        raise TrainError(f"target sizes must be positive, got {list(target_sizes or [])}")
    timings: dict[str, float] = {}
    skipped: list[str] = []
    train_ds = load_dataset(dataset)
    if len(train_ds.classes) < 2:  # before the export and the extraction, not after them
        raise TrainError(f"{dataset} has {len(train_ds.classes)} class ({', '.join(train_ds.classes) or 'none'}): "
                         "a classifier needs at least 2; give one subfolder (or manifest label) per class")
    test_ds = load_dataset(test, classes=train_ds.classes) if test is not None else None
    allowed = None
    if taps_from is not None:  # before the export: a wrong deployment fails fast
        allowed = allowed_device_taps(taps_from, log, backbone=backbone)
    check_supported(precision, backend)  # before the export too

    # export: one graph, every T
    start = time.perf_counter()
    onnx = cached_export_path(work / "backbones", backbone, weights, sizes, taps, cls_token, multi=True)
    if onnx.exists():
        skipped.append("export")
        log(f"kept export {onnx}")
    else:
        log(f"exporting {backbone} with every tap pooled at T = {sizes} (one graph) ...")
        onnx, _ = cached_export(work / "backbones", backbone, weights, sizes, taps, cls_token, multi=True)
        log(f"exported {onnx}")
    timings["export"] = time.perf_counter() - start

    # the extraction graph at the deployed precision (the export itself for fp32 on onnxruntime)
    graph_at = PrecisionGraph(onnx, None)
    if (precision, backend) != ("fp32", "onnxruntime"):
        start = time.perf_counter()
        graph_at = precision_graph(onnx, precision, backend, _readable_paths(train_ds, on_error),
                                   _preprocess_of(onnx), method=calibration, images=calibration_images, log=log)
        timings["precision graph"] = time.perf_counter() - start

    # extract: one backbone pass per split, one cache per T
    caches, first = _extract_splits(graph_at, {"train": train_ds, "test": test_ds}, work, sizes, timings, skipped,
                                    batch_size=batch_size, dtype=dtype, on_error=on_error, progress=progress, log=log)

    # fit: every T, both HEAD2TOE variants, LINEAR; choose by CV
    start = time.perf_counter()
    fit_log = []
    selection = fit_target_sizes(caches["train"], task_dir, grid=grid, task=task_dir.name, guard=guard,
                                 progress=progress, log=lambda m: (fit_log.append(m), log(m)), allowed_taps=allowed)
    timings["fit"] = time.perf_counter() - start
    if all(m.startswith("kept") for m in fit_log):
        skipped.append("fit")

    # compile the chosen model (kept when the head it was compiled from has not changed)
    graph = task_dir / "model.onnx"
    head_sha = file_sha256(selection.model_dir / "head.safetensors")
    record = task_dir / "compile.json"
    old = read_json(record, "compile record") if record.exists() else {}
    start = time.perf_counter()
    if (old.get("head_sha256") == head_sha and graph.exists() and graph.with_suffix(".json").exists()
            and old.get("graph_sha256") == file_sha256(graph)):
        skipped.append("compile")
        log(f"kept compiled graph {graph}")
    else:
        log(f"compiling {selection.chosen.key} ...")
        compiled = compile_step(selection.model_dir, graph, weights if weights != "bundled" else None,
                                extraction_graph=graph_at.path if graph_at.record is not None else None)
        atomic_write_json(record, {"head_sha256": head_sha, "graph_sha256": file_sha256(compiled.path),
                                   "seconds": compiled.seconds})
        log(f"compiled {selection.chosen.key} to {graph}")
    timings["compile"] = time.perf_counter() - start

    # test accuracy of every candidate on the cached test features
    confusion = None
    if "test" in caches:
        confusion = _test_candidates(selection, caches["test"])
    # Images used (readable ones), and the paths of those skipped as unreadable (on_error='skip').
    settings = _settings(dataset, test, backbone, weights, sizes, taps, cls_token, guard, grid, onnx,
                         int(first["train"].valid.sum()), int(first["test"].valid.sum()) if "test" in first else 0,
                         train_ds.classes, [s["path"] for c in first.values() for s in c.manifest["skipped"]],
                         taps_from=taps_from)
    settings["precision"] = {"precision": graph_at.precision, "backend": graph_at.backend,
                             "record": graph_at.record}
    comparison = None
    if graph_at.record is not None and compare_fp32:
        start = time.perf_counter()
        comparison = compare_with_fp32(task_dir, onnx, graph_at, selection, {"train": train_ds, "test": test_ds},
                                       work, grid=grid, guard=guard, batch_size=batch_size, dtype=dtype,
                                       on_error=on_error, progress=progress, log=log, allowed_taps=allowed,
                                       weights=weights)
        timings["fp32 comparison"] = time.perf_counter() - start
    start = time.perf_counter()
    report = write_report(task_dir, selection, caches["train"], settings, timings, confusion, comparison)
    timings["report"] = time.perf_counter() - start
    return TrainReport(task_dir, selection, graph, timings, report, skipped)


def _extract_splits(graph, datasets: dict, work: Path, sizes: Sequence[int], timings: dict, skipped: list, *,
                    batch_size: int, dtype: str, on_error: str, progress, log: Log) -> tuple[dict, dict]:
    """One backbone pass per split through `graph` (a `PrecisionGraph`), one cache per T under
    WORK/features/<graph stem>/; returns ({split: {T: cache}}, {split: one of its caches})."""
    caches, first = {}, {}  # first: every T's cache of a split has the same images, valid rows, skips
    for split, ds in datasets.items():
        if ds is None:
            continue
        root = work / "features" / graph.path.stem / f"{split}-{ds.fingerprint()[:12]}"
        start = time.perf_counter()
        bar = (lambda done, total, s=split: progress(f"extract {s}", done, total)) if progress else None
        ran = []
        caches[split] = extract_features_multi(
            graph.path, ds, {t: root / f"T{t}" for t in sizes}, batch_size=batch_size, dtype=dtype,
            on_error=on_error, progress=lambda done, total: (ran.append(done), bar and bar(done, total)),
            backend=graph.backend, backend_options=graph.runner_options())
        timings[f"extract {split}" + ("" if graph.record is None else f" ({graph.precision})")] = \
            time.perf_counter() - start
        if len(ran) <= 1:  # only the opening call: every batch was there already
            skipped.append(f"extract {split}")
        first[split] = next(iter(caches[split].values()))
        bad = first[split].manifest["skipped"]
        log(f"features {split}: {len(ds)} images x T {list(sizes)} in {root}"
            + (f"; skipped {len(bad)} unreadable (first: {bad[0]['path']}; all listed in the cache's "
               "manifest.json)" if bad else ""))
    return caches, first


def _preprocess_of(onnx_path: Path):
    from h2t_edge.steps.extract import read_multi_layout
    from runtime.preprocess import PreprocessConfig

    layout = next(iter(read_multi_layout(onnx_path)["layouts"].values()))
    return PreprocessConfig.from_dict(layout["preprocess"], source=f"{onnx_path} layout")


def _readable_paths(ds, on_error: str) -> list[Path]:
    """The dataset's images for calibration; with on_error='skip', those that decode."""
    from runtime.errors import ImageError
    from runtime.preprocess import load_image

    paths = [Path(p) for p in ds.paths]
    if on_error != "skip":
        return paths
    readable = []
    for p in paths:
        try:
            load_image(p)
        except ImageError:
            continue
        readable.append(p)
    return readable


def compare_with_fp32(task_dir: Path, onnx: Path, graph_at, selection: Selection, datasets: dict, work: Path, *,
                      grid, guard: bool, batch_size: int, dtype: str, on_error: str, progress, log: Log,
                      allowed_taps, weights: str) -> dict:
    """fp32 beside the deployed precision, for the report: the chosen target size fitted on fp32
    features (same grid, guard and rule, in TASK_DIR/fp32/), both compiled graphs timed at batch 1
    on the deployed backend (`serving.bench.measure`). Returns the comparison record."""
    from h2t_edge.serving.bench import BenchCase, measure

    t = selection.chosen.target_size
    log(f"fp32 comparison: extracting fp32 features at T={t} and fitting them ...")
    fp32 = PrecisionGraph(onnx, None)
    caches, _ = _extract_splits(fp32, datasets, work, [t], {}, [], batch_size=batch_size, dtype=dtype,
                                on_error=on_error, progress=progress, log=log)
    root = task_dir / "fp32"
    reference = fit_target_sizes(caches["train"], root, grid=grid, task=task_dir.name, guard=guard,
                                 progress=progress, log=log, allowed_taps=allowed_taps)
    if "test" in caches:
        _test_candidates(reference, caches["test"])
    compiled = compile_step(reference.model_dir, root / "model.onnx", weights if weights != "bundled" else None)
    rows = {}
    for name, chosen, path, rec in (("fp32", reference.chosen, compiled.path, None),
                                    (graph_at.precision, selection.chosen, task_dir / "model.onnx", graph_at.record)):
        timing = measure(BenchCase(name, Path(path), graph_at.backend, runner_options(rec).get("precision", "fp32")),
                         batch=8, warmup=5, repeat=30)
        rows[name] = {"chosen": chosen.key, "cv_accuracy": chosen.cv_accuracy, "cv_se": chosen.cv_se,
                      "test_accuracy": chosen.test_accuracy, "n_features": chosen.n_features,
                      "latency_ms_p50": timing["p50_ms"], "graph": str(path)}
    deployed = rows[graph_at.precision]
    deployed["latency_ratio"] = deployed["latency_ms_p50"] / rows["fp32"]["latency_ms_p50"]
    from h2t_edge.core.machine import measured_on

    return {"backend": graph_at.backend, "precision": graph_at.precision, "rows": rows, **measured_on()}


def _test_candidates(selection: Selection, test_caches: dict[int, FeatureCache]) -> np.ndarray:
    """Sets each candidate's test_accuracy; returns the chosen model's confusion matrix
    int64[C, C] (rows: true class, columns: predicted)."""

    confusion = None
    for c in selection.candidates:
        cache = test_caches[c.target_size] if c.target_size in test_caches else test_caches[min(test_caches)]
        head = TaskHead.load(c.path)
        check_same_backbone(head, cache)
        x, y = cache.column_source()  # the head's columns are read, not float32[n, D]
        pred = head.logits(x).argmax(1)
        c.test_accuracy = float((pred == y).mean())
        if c.key == selection.chosen.key:
            selection.chosen.test_accuracy = c.test_accuracy
            n = len(head.classes)
            confusion = np.bincount(y * n + pred, minlength=n * n).reshape(n, n)
    return confusion


def summary_table(result: TrainReport) -> str:
    """One line per candidate: method, T, CV accuracy +- SE, test accuracy, features, fit seconds."""
    chosen = result.selection.chosen.key
    lines = [f"  {'candidate':<22} {'CV acc':>14} {'test acc':>9} {'features':>17} {'fit s':>7}"]
    for c in sorted(result.selection.candidates, key=lambda c: (c.method != LINEAR, c.target_size, c.method)):
        test = "–" if c.test_accuracy is None else f"{100 * c.test_accuracy:.1f}%"
        lines.append(f"{'*' if c.key == chosen else ' '} {c.key:<22} {100 * c.cv_accuracy:6.1f}% ± {100 * c.cv_se:4.1f} "
                     f"{test:>9} {c.n_features:>7,} / {c.candidates:<7,} {c.fit_seconds:>7.0f}")
    lines.append("* chosen (best CV accuracy); HEAD2TOE+LINEAR: HEAD2TOE selection that always keeps the pre-logits; "
                 "at one T both share one fit (fit s counts it once per row)")
    return "\n".join(lines)


def fit_task(caches: Sequence[str | Path], out: str | Path, *, task: str | None = None,
             methods: Sequence[str] = (HEAD2TOE, LINEAR), target_sizes: Sequence[int] = (), grid=None,
             guard: bool = True, progress: Progress | None = None, log: Log | None = None,
             taps_from: str | Path | None = None, precision: str | None = None, backend: str | None = None):
    """`h2t-edge fit`: one feature cache gives `fit_step` (the given methods, a FitReport); several
    caches of the same images at different target sizes, or a folder of `T<size>/` caches, give
    `fit_caches` (HEAD2TOE and HEAD2TOE+LINEAR at each T and LINEAR once, the best CV kept in
    OUT/model/; a Selection). precision / backend: the deployment the head is for; every cache must
    have been extracted through the graph built for it (`check_cache_precision`)."""
    from h2t_edge.steps.fit import fit_step

    if precision is not None or backend is not None:
        check_cache_precision(caches, precision or "fp32", backend or "onnxruntime")
    allowed = None if taps_from is None else allowed_device_taps(taps_from, log)
    if len(caches) > 1 or target_sizes or not is_feature_cache(caches[0]):
        return fit_caches(caches, out, target_sizes=target_sizes, grid=grid, task=task, guard=guard,
                          progress=progress, log=log, allowed_taps=allowed)
    return fit_step(caches[0], out, task=task, methods=methods, grid=grid, progress=progress, allowed_taps=allowed)


def check_cache_precision(paths: Sequence[str | Path], precision: str, backend: str) -> None:
    """Refuse caches whose features were not computed at `precision` on `backend` (a head fitted on
    them would not be fitted on what the device computes), naming the cache and the fix."""
    from h2t_edge.steps.extract import read_manifest

    check_supported(precision, backend)
    roots = []
    for p in map(Path, paths):
        roots += [p] if is_feature_cache(p) else sorted(c for c in p.glob("T*") if is_feature_cache(c))
    for root in roots:
        record = read_manifest(root)["backbone"].get("precision")
        got = ("fp32", "onnxruntime") if record is None else (record["precision"], record["backend"])
        if got != (precision, backend):
            raise TrainError(f"feature cache {root} holds {got[0]} features from {got[1]}, not {precision} on "
                             f"{backend}: "
                             f"a head fitted on them would not see what the device computes. Fix: `h2t-edge train "
                             f"DATA -o TASK --precision {precision} --backend {backend}` builds the graph and extracts "
                             "through it")


def allowed_device_taps(taps_from: str | Path, log: Log | None = None, backbone: str | None = None) -> list[str]:
    """`--taps-from DEPLOYED`: the taps that deployment computes (`steps.deploy.device_taps`, read and
    checked once); with `backbone`, a deployment that runs another backbone is refused."""
    from h2t_edge.steps.deploy import device_taps

    device = device_taps(taps_from)
    device_backbone = device.backbone.get("name")
    if backbone is not None and device_backbone != backbone:
        raise TrainError(f"--taps-from {taps_from} runs backbone {device_backbone!r}, not {backbone!r}; train with "
                         f"-b {device_backbone} to reuse its taps")
    if log is not None:
        log(f"selecting among the {len(device.taps)} taps {device.source} computes (and the pre-logits)")
    return list(device.taps)
