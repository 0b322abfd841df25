"""Head2Toe feature selection and linear heads on cached features (Evci et al., ICML'22, Sec. 3.3).

A head is trained with Adam, a cosine learning-rate decay to 0, batches of `batch_size` rows and
mean cross-entropy plus an optional penalty on the weight W: [D, C]:

- ``l21``: lambda * sum_i ||W_i,:||_2 (group lasso; relevance s_i = ||W_i,:||_2),
- ``l2``:  lambda * ||W||_F^2,
- ``l1``:  lambda * ||W||_1.

Head2Toe trains an ``l21`` head on all D features, keeps the top fraction F of features by
relevance and retrains an unregularized head on them with the same lr and steps. All
hyperparameters are chosen by stratified k-fold cross-validation on the training rows.

Large pools: training the group-lasso head costs O(D) per step for every CV model, so for D above
`SearchGrid.max_candidates` (the pool of a large target size T) each fold first keeps its
`max_candidates` features with the largest group-lasso strong-rule statistic
||X_S^T (Y_S - mean Y_S)||_2 / |S| over its own training rows S (the norm of the loss gradient at
W = 0, Tibshirani et al. 2012) and runs the group lasso on those only. Fractions F still count
against the full D; those whose k exceeds the budget are left out of the grid. On dSprites
location at T=8192 (D=421,736) the statistic's top 8,192 held every feature of the exact
lambda=1e-3 selection's top 0.1% (benchmarks/results/screening_recall.json; end-to-end accuracy
in screening.md). `max_candidates=None` is the exact method.

Speed: the CV heads of one (steps, lr) share one weight tensor W: [D, models, C] and one batch of
rows per step (one GEMM); each model masks out its validation rows. Models are grouped by lr
because the fused Adam kernel takes one scalar lr. The retraining of every (model, F) head is
batched with bmm over models, on the model's top-k_max columns gathered once (top-k sets are
prefixes of one ranking, so every F reuses the same gathered block), with one GEMM per block of
columns that the same heads share rather than one per head; columns common to every model (the
kept columns of HEAD2TOE+LINEAR) are gathered once and enter all models through one GEMM. A
screened group lasso runs each fold's models on that fold's candidates only
(benchmarks/results/select_profile.md).

Precision: `SearchGrid.precision="bf16"` runs the training GEMMs on bfloat16 copies of the features
and weights (fp32 accumulation inside the GEMM, results rounded to bf16 and carried on in fp32);
the weights, Adam's moments, the softmax and the penalty stay fp32. On CPUs with AVX512-BF16 or
AMX this makes the GEMMs 3-4x faster; CV accuracy moves within noise
(benchmarks/results/train_speed.md). It is a choice that is recorded in the fit's config, never
a silent fallback: the default is "fp32".

HEAD2TOE+LINEAR (`fit_head2toe_variants(..., keep=...)`, used by `h2t-edge train`'s guard against
LINEAR; not in the paper) retrains on the same ranking with the kept columns always first.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from h2t_edge.core.errors import FitError
from h2t_edge.core.progress import Progress
from h2t_edge.selection.grid import (
    PENALTIES,
    FitResult,
    LinearHead,
    SearchGrid,
    best_row,
    check_labels,
    chosen_config,
    cv_plan,
    cpu_training_mode,
    cv_batch_size,
    cv_models,
    n_selected,
    prepare_cv,
    summarize_cv,
)
from h2t_edge.selection.kernels import masked_mean, run_wide, wide_logits
from h2t_edge.selection.names import HEAD2TOE, HEAD2TOE_LINEAR, LINEAR
from h2t_edge.selection.screening import ColumnSource, screen_candidates, select_and_retrain, stream_screen


def _cv_wide_table(data, grid, penalty, coefs, method, coef_key, progress) -> list[dict]:
    models, val_mask = cv_models(data, grid, coefs)
    lrs = [m[1] for m in models]
    accs: dict = {}
    dim = data.x.shape[1]
    x = data.x.to(data.dtype)  # once for every steps value and lr group (run_wide keeps it as it is)
    for steps in grid.steps:
        for idx, w, b in run_wide(x, data.onehot, (~val_mask).float(), lrs,
                                   [m[0] for m in models], penalty, steps, cv_batch_size(grid),
                                   grid.seed, progress, f"cv {method} steps={steps}",
                                   dtype=data.dtype):
            pred = wide_logits(x, w, b).argmax(-1).t()  # [Mg, n]
            acc = masked_mean((pred == data.y).double(), val_mask[idx])
            for j, m in enumerate(idx):
                coef, lr, _ = models[m]
                key = ((coef_key, coef), ("lr", lr), ("steps", steps))
                accs.setdefault(key, []).append(float(acc[j]))
    base = {"method": method, "l21": None, "penalty": None, "fraction": 1.0, "n_features": dim}
    return summarize_cv(accs, base)


def _refit_wide(data, grid, penalty, coef, lr, steps, progress) -> LinearHead:
    mask = torch.ones(1, data.x.shape[0])
    (_, w, b), = run_wide(data.x, data.onehot, mask, [lr], [coef], penalty, steps,
                           grid.batch_size, grid.seed, progress, "refit", dtype=data.dtype)
    return LinearHead(w[:, 0].numpy().copy(), b[0].numpy().copy(),
                      np.arange(data.x.shape[1], dtype=np.int64))


@cpu_training_mode()
def fit_linear(features, labels, n_classes: int, grid: SearchGrid = SearchGrid.paper(),
               progress: Progress | None = None) -> FitResult:
    """LINEAR baseline: unregularized head on all given features (grid lrs x steps by CV)."""
    start = time.perf_counter()
    data = prepare_cv(features, labels, n_classes, grid)
    table = _cv_wide_table(data, grid, None, [None], LINEAR, "penalty", progress)
    best = best_row(table)
    head = _refit_wide(data, grid, None, None, best["lr"], best["steps"], progress)
    return FitResult(LINEAR, head, chosen_config(best, grid, "lr", "steps"), table, None,
                     time.perf_counter() - start)


@cpu_training_mode()
def fit_regularized(features, labels, n_classes: int, penalty: str,
                    grid: SearchGrid = SearchGrid.paper(),
                    progress: Progress | None = None) -> FitResult:
    """+ALL baselines: one head on all features with an l2 / l1 / l21 penalty (grid.penalties)."""
    if penalty not in PENALTIES:
        raise FitError(f"penalty {penalty!r} is unknown; use one of {PENALTIES}")
    start = time.perf_counter()
    data = prepare_cv(features, labels, n_classes, grid)
    method = f"ALL-{penalty.upper()}"
    table = _cv_wide_table(data, grid, penalty, grid.penalties, method, "penalty", progress)
    best = best_row(table)
    head = _refit_wide(data, grid, penalty, best["penalty"], best["lr"], best["steps"], progress)
    return FitResult(method, head, chosen_config(best, grid, "penalty", "lr", "steps"), table, None,
                     time.perf_counter() - start)




HEAD2TOE_KEEP = HEAD2TOE_LINEAR  # HEAD2TOE whose selection always keeps given columns


@cpu_training_mode()
def fit_head2toe(features, labels, n_classes: int, grid: SearchGrid = SearchGrid.paper(),
                 progress: Progress | None = None) -> FitResult:
    """HEAD2TOE: group-lasso relevance on all D features, keep the top fraction, retrain.

    features: float[n, D] (per-tap pooled, L2-normalized), labels: int[n] in [0, n_classes).
    CV over grid.l21s x lrs x steps x fractions; the best config is refitted on all rows.
    """
    return fit_head2toe_variants(features, labels, n_classes, grid, progress)[HEAD2TOE]


def _within_allowed_taps(features, labels, n_classes, grid, progress, keep, taps, rung=False,
                         memo=None, path_settings=None) -> dict[str, FitResult]:
    """`fit_head2toe_variants` on the columns of taps.allowed, heads mapped back to all columns."""
    columns = taps.allowed_columns()
    sub = features.restrict(columns) if isinstance(features, ColumnSource) else np.asarray(features)[:, columns]
    results = _fit_on_columns(sub, columns, len(taps.column_tap), labels, n_classes, grid, progress, keep, taps, rung,
                              outside="the kept columns (pre-logits) lie outside the allowed taps", memo=memo,
                              path_settings=path_settings)
    for result in results.values():
        result.config["allowed_taps"] = [n for n, ok in zip(taps.names, taps.allowed) if ok]
    return results


def _streamed(source: ColumnSource, labels, n_classes, grid, progress, keep, taps, rung,
              memo=None, path_settings=None) -> dict[str, FitResult]:
    """`fit_head2toe_variants` on a pool too large to hold: one streamed pass over its column blocks
    (`stream_screen`) finds every CV fold's and the refit's top grid.max_candidates columns by the
    strong rule; the fit then sees only their union (and the kept columns), float32[n, P].

    The fit screens that pool again and finds the same candidates (a column's statistic does not
    depend on the other columns); fractions still count against all D columns (n_columns). Peak
    memory grows with n x P, P <= (folds + 1) x max_candidates, not with n x D."""
    n, dim = source.shape
    labels = check_labels(source, labels, n_classes, grid.folds)
    rows, fold = cv_plan(labels, grid)  # the fit's CV rows and folds
    rows = np.arange(n) if rows is None else rows
    subsets = np.zeros((grid.folds + 1, n), dtype=bool)
    for f in range(grid.folds):
        subsets[f, rows[fold != f]] = True
    subsets[-1] = True  # the refit
    subsets = torch.from_numpy(subsets)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), n_classes).float()
    top = stream_screen(source, onehot, subsets, grid.max_candidates, device=grid.device, progress=progress)
    pool = np.union1d(top.numpy().ravel(), np.zeros(0, np.int64) if keep is None else np.asarray(keep, np.int64))
    return _fit_on_columns(source.gather(pool), pool, dim, labels, n_classes, grid, progress, keep, taps, rung,
                           n_columns=dim, memo=memo, path_settings=path_settings)


def _fit_on_columns(features, columns: np.ndarray, dim: int, labels, n_classes, grid, progress, keep, taps, rung,
                    n_columns: int | None = None, outside: str = "internal: kept columns outside the pool",
                    memo=None, path_settings=None) -> dict[str, FitResult]:
    """`fit_head2toe_variants` on features = the columns `columns` (int64, sorted) of a D = dim
    matrix; keep (ids of all D) must lie among them (else FitError `outside`); heads and scores are
    mapped back to all D columns. n_columns: what fractions count against (None: len(columns))."""
    if keep is not None:
        keep = np.asarray(keep, dtype=np.int64)
        inside = np.searchsorted(columns, keep)
        if (inside >= len(columns)).any() or not np.array_equal(columns[np.minimum(inside, len(columns) - 1)], keep):
            raise FitError(outside)
        keep = inside
    results = fit_head2toe_variants(features, labels, n_classes, grid, progress, keep,
                                    None if taps is None else taps.restrict(columns), rung=rung, n_columns=n_columns,
                                    memo=memo, path_settings=path_settings)
    for result in results.values():
        if result.head is not None:  # None: a rung (CV only)
            result.head.features = columns[result.head.features]
            scores = np.zeros(dim, dtype=np.float32)
            scores[columns] = result.scores
            result.scores = scores
    return results


@cpu_training_mode()
def fit_head2toe_variants(features, labels, n_classes: int, grid: SearchGrid = SearchGrid.paper(),
                          progress: Progress | None = None,
                          keep: np.ndarray | None = None, taps=None, rung: bool = False,
                          n_columns: int | None = None, memo: dict | None = None,
                          path_settings=None) -> dict[str, FitResult]:
    """HEAD2TOE and, when `keep` is given, HEAD2TOE+LINEAR from one group-lasso run per CV model.

    features: float[n, D]; keep: int[K] columns (e.g. the pre-logits) that HEAD2TOE+LINEAR always
    keeps, adding the best k_F others by the same relevance ranking (its selection can only add
    to a head on `keep`). This variant is not in the paper; both are cross-validated on the same
    folds, and each gets its own best (F, lambda, lr, steps) and final refit.
    taps: the columns' `selection.taps.TapPlan`, for the path solver's deploy-aware choice (tap
    budgets, `grid.choice`); the paper solver ranks features alone and picks the best accuracy.
    rung: CV only, for successive halving over T (`fit_head2toe_path`'s rung; the path solver only).
    memo: a dict kept by the caller for one feature matrix, in which a rung leaves its CV path for
    the full fit (`fit_head2toe_path`); give the rung the same `keep`, so that both fit one pool.
    path_settings: the path engine's `PathSettings` (None: its defaults).
    features may be a `ColumnSource` (a feature cache's memmap): the path solver then screens it in
    streamed column blocks and holds only the screened pool (`_streamed`); n_columns: what the
    fractions count against when features are a subset of the columns (None: all of them).
    Returns {"HEAD2TOE": FitResult[, "HEAD2TOE+LINEAR": FitResult]}; their fit_seconds are the
    shared total.
    """
    if taps is not None and not taps.allowed.all():  # --taps-from: fit on the allowed taps' columns only
        return _within_allowed_taps(features, labels, n_classes, grid, progress, keep, taps, rung, memo,
                                    path_settings)
    if getattr(features, "ndim", None) == 2:  # large data: a smaller screening budget (README "Large data")
        grid = grid.for_rows(features.shape[0])
    if isinstance(features, ColumnSource):
        if grid.solver == "path" and grid.max_candidates is not None and features.shape[1] > grid.max_candidates:
            return _streamed(features, labels, n_classes, grid, progress, keep, taps, rung, memo, path_settings)
        features = np.asarray(features)  # nothing to screen: the whole matrix is the pool
    if grid.solver == "path":  # the group-lasso path engine, same contract
        from h2t_edge.selection.path import DEFAULT_SETTINGS, fit_head2toe_path

        return fit_head2toe_path(features, labels, n_classes, grid, progress, keep, device=grid.device, taps=taps,
                                 rung=rung, n_columns=n_columns, memo=memo, settings=path_settings or DEFAULT_SETTINGS)
    if rung or n_columns is not None:
        raise FitError("successive-halving rungs and streamed pools need the path solver (SearchGrid.solver='path')")
    start = time.perf_counter()
    data = prepare_cv(features, labels, n_classes, grid)
    dim = data.x.shape[1]
    models, val_mask = cv_models(data, grid, grid.l21s)
    train_mask = (~val_mask).float()
    screen = screen_candidates(data, train_mask, grid.max_candidates)
    k_of = {f: n_selected(dim, f) for f in grid.fractions}
    fractions = [f for f in grid.fractions if screen is None or k_of[f] <= screen.budget]
    if not fractions:
        raise FitError(f"every fraction in SearchGrid.fractions keeps more than max_candidates="
                       f"{grid.max_candidates} of {dim} features; raise max_candidates or add "
                       f"smaller fractions")
    plan = {HEAD2TOE: (fractions, None)}
    if keep is not None:
        keep_t = torch.from_numpy(np.unique(np.asarray(keep, dtype=np.int64)))
        if keep_t.numel() == 0 or keep_t[0] < 0 or keep_t[-1] >= dim:
            raise FitError(f"keep must name columns in [0, {dim}); got {keep_t.numel()} columns")
        room = (dim if screen is None else len(screen.pool)) - len(keep_t)
        plan[HEAD2TOE_KEEP] = ([f for f in fractions if k_of[f] <= room], keep_t)
        if not plan[HEAD2TOE_KEEP][0]:
            raise FitError(f"no fraction in SearchGrid.fractions leaves room beside the {len(keep_t)} "
                           f"kept columns of {dim}; add smaller fractions")
    extra = {name: 0 if kp is None else len(kp) for name, (_, kp) in plan.items()}
    ks = {name: sorted(set(k_of[f] + extra[name] for f in fr)) for name, (fr, _) in plan.items()}
    variants = {name: (ks[name], kp) for name, (_, kp) in plan.items()}
    accs: dict = {name: {} for name in plan}
    for steps in grid.steps:
        for name, idx, _, _, _, acc in select_and_retrain(
                data, train_mask, val_mask, [m[1] for m in models], [m[0] for m in models],
                steps, cv_batch_size(grid), grid.seed, variants, progress, "cv", screen):
            for j, m in enumerate(idx):
                l21, lr, _ = models[m]
                for fraction in plan[name][0]:
                    k = k_of[fraction] + extra[name]
                    key = (("l21", l21), ("lr", lr), ("steps", steps), ("fraction", fraction),
                           ("n_features", k))
                    accs[name].setdefault(key, []).append(float(acc[j, ks[name].index(k)]))
    tables = {name: summarize_cv(accs[name], {"method": name, "penalty": None}) for name in plan}
    best = {name: best_row(table) for name, table in tables.items()}
    del screen
    all_rows = torch.ones(1, data.x.shape[0])
    screen = screen_candidates(data, all_rows, grid.max_candidates)
    refits: dict = {}
    # variants whose CV picked the same (lambda, lr, steps) share the final selection run
    for config in dict.fromkeys((b["l21"], b["lr"], b["steps"]) for b in best.values()):
        l21, lr, steps = config
        wanted = {name: ([best[name]["n_features"]], plan[name][1]) for name in plan
                  if (best[name]["l21"], best[name]["lr"], best[name]["steps"]) == config}
        for name, _, scores, heads, columns, _ in select_and_retrain(
                data, all_rows, None, [lr], [l21], steps, grid.batch_size, grid.seed, wanted,
                progress, "refit", screen):
            refits[name] = (scores, heads, columns)
    seconds = time.perf_counter() - start
    results = {}
    for name in plan:
        scores, heads, columns = refits[name]
        weight, bias = heads[0]
        order = torch.argsort(columns[0])  # LinearHead keeps columns sorted
        head = LinearHead(weight[0][order].numpy().copy(), bias[0].numpy().copy(),
                          columns[0][order].numpy().astype(np.int64))
        config = chosen_config(best[name], grid, "l21", "lr", "steps", "fraction", "n_features")
        config["screened_to"] = None if screen is None else screen.budget  # candidates per fold
        if extra[name]:
            config["kept_columns"] = extra[name]
        results[name] = FitResult(name, head, config, tables[name],
                                  scores[0].numpy().astype(np.float32), seconds)
    return results
