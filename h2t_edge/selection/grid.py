"""The selection protocol's data: the CV grid (`SearchGrid`), linear heads, fit results, input
checks, folds and batch schedules, and the CV bookkeeping shared by every estimator.

The method itself is described in `h2t_edge.selection.estimators`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from h2t_edge.core.errors import FitError

T = TypeVar("T")

SOLVERS = ("paper", "path")  # SearchGrid.solver
CHOICES = ("cheapest", "accuracy")  # SearchGrid.choice: see `choose_cheapest`

PENALTIES = ("l21", "l2", "l1")
RUNG_MAX_FRACTION = 0.02  # a successive-halving rung retrains heads of at most this fraction of D
F_STOP_PATIENCE = 2  # SearchGrid.f_stop: sizes in a row below the margin before CV retraining stops
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # SearchGrid.precision -> GEMM dtype


def resolve_device(device: str) -> str:
    """`--device`: "auto" is "cuda" where torch sees a GPU and "cpu" elsewhere; others pass through,
    and "cuda..." without a GPU is refused (never a silent move to the CPU)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FitError(f"--device {device}: torch sees no GPU here (torch.cuda.is_available() is False; torch "
                       f"{torch.__version__}); use --device cpu, or auto to take a GPU only where there is one")
    return device


def training_threads() -> int:
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    return os.cpu_count() or 1


@contextlib.contextmanager
def cpu_training_mode():
    """All cores (or $OMP_NUM_THREADS when set, e.g. to run two fits side by side), and
    denormals flushed to zero: saturated softmax probabilities and decayed Adam moments otherwise
    turn into denormals that make GEMMs ~100x slower on x86."""
    threads = torch.get_num_threads()
    torch.set_num_threads(training_threads())
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class SearchGrid:
    """Hyperparameter grid and CV protocol (paper Appendix A)."""

    lrs: tuple[float, ...] = (0.1, 0.01)
    steps: tuple[int, ...] = (500, 5000)
    l21s: tuple[float, ...] = (1e-3, 1e-5)  # Head2Toe group-lasso coefficients
    penalties: tuple[float, ...] = (1e-5, 1e-4, 1e-3)  # +ALL baselines (l2 / l1 / l21)
    fractions: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    folds: int = 5
    batch_size: int = 128
    seed: int = 0
    max_candidates: int | None = 32768  # HEAD2TOE: screen larger pools per fold (None: exact)
    precision: str = "fp32"  # GEMM inputs: "fp32" or "bf16" (see the module docstring)
    # HEAD2TOE's engine: "path" (group-lasso paths with warm starts, h2t_edge.selection.path; the
    # default) or "paper" (minibatch Adam per (fold, lr, lambda, steps), the paper's recipe, which
    # alone uses lrs, steps, l21s, batch_size and precision)
    solver: str = "path"
    device: str = "cpu"  # where the "path" engine runs ("cuda" on a GPU); the paper engine runs on the CPU
    # which CV candidate wins: "cheapest" (the least deployed latency within one standard error of
    # the best CV accuracy, `choose_cheapest`) or "accuracy" (the best CV accuracy, `choose_best`)
    choice: str = "cheapest"
    tap_budgets: tuple[int, ...] = (1, 2, 4, 8)  # path solver: also rank within the best B taps (by relevance per cost)
    latency_budget: float | None = None  # a hard bound on the estimated deployed latency / backbone
    # choice "cheapest" prefers a cheaper candidate only when it saves at least this share of the
    # backbone's batch-1 latency: the spread of repeated measurements of one graph on one machine
    # (benchmarks/results/choice.md) hides smaller savings, so they cannot pay for accuracy
    min_saving: float = 0.05
    # successive halving over T (`train`, path solver): every T first gets a cheap rung (one path
    # point, F <= RUNG_MAX_FRACTION, HEAD2TOE only); the full fit runs for the best rung and every T
    # within `halving` standard errors of it (None: the full fit at every T)
    halving: float | None = 2.0
    # large data (the path solver; README "Large data"): CV runs on a stratified subsample of at most
    # cv_rows images (the refit on all of them), and the screening budget shrinks so that the
    # screened pool, float32[n, (folds + 1) x budget] at most, stays under pool_bytes
    cv_rows: int | None = 4000
    pool_bytes: int | None = 3 << 30
    # path solver: CV retraining along F (ascending) stops once F_STOP_PATIENCE sizes in a row score
    # more than `f_stop` standard errors below the best so far (None: every F is retrained)
    f_stop: float | None = 2.0

    def __post_init__(self) -> None:
        for name in ("lrs", "steps", "l21s", "penalties", "fractions", "tap_budgets"):
            values = getattr(self, name)
            object.__setattr__(self, name, tuple(values))
            if not values and name != "tap_budgets":
                raise FitError(f"SearchGrid.{name} is empty; give at least one value")
        if self.folds < 2:
            raise FitError(f"SearchGrid.folds={self.folds}; cross-validation needs folds >= 2")
        if self.batch_size < 1 or any(s < 1 for s in self.steps):
            raise FitError("SearchGrid.batch_size and SearchGrid.steps must be positive")
        if any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise FitError(f"SearchGrid.fractions={self.fractions}; each must lie in (0, 1]")
        if self.choice not in CHOICES:
            raise FitError(f"SearchGrid.choice={self.choice!r}; use one of {list(CHOICES)}")
        if self.latency_budget is not None and not self.latency_budget >= 1.0:
            raise FitError(f"SearchGrid.latency_budget={self.latency_budget}; a deployed graph runs the backbone, "
                           "so give a bound >= 1.0 (times the backbone's latency)")
        if not 0.0 <= self.min_saving < 1.0:
            raise FitError(f"SearchGrid.min_saving={self.min_saving}; give a share of the backbone's latency in [0, 1)")
        if any(int(b) < 1 for b in self.tap_budgets):
            raise FitError(f"SearchGrid.tap_budgets={self.tap_budgets}; each budget must be >= 1 tap")
        if self.solver not in SOLVERS:
            raise FitError(f"SearchGrid.solver={self.solver!r}; use one of {list(SOLVERS)}")
        if self.device != "cpu" and self.solver != "path":
            raise FitError(f"SearchGrid.device={self.device!r}: only the 'path' solver runs off the CPU; "
                           "use --solver path with --device")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise FitError(f"SearchGrid.device={self.device!r}; use 'cpu', 'cuda' or 'cuda:N' (or --device auto)")
        if self.precision not in PRECISIONS:
            raise FitError(f"SearchGrid.precision={self.precision!r}; use one of {sorted(PRECISIONS)}")
        if self.precision != "fp32" and self.solver != "paper":
            raise FitError(f"SearchGrid.precision={self.precision!r} is for the paper solver's Adam GEMMs; the "
                           f"{self.solver!r} solver computes in fp32: use --solver paper with --fit-precision "
                           f"{self.precision}")
        for name in ("cv_rows", "pool_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise FitError(f"SearchGrid.{name}={getattr(self, name)}; give a positive size, or None for no limit")
        if self.cv_rows is not None and self.cv_rows < 2 * self.folds:
            raise FitError(f"SearchGrid.cv_rows={self.cv_rows}; CV needs at least 2 x folds rows")
        for name in ("halving", "f_stop"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0.0:
                raise FitError(f"SearchGrid.{name}={getattr(self, name)}; give a margin >= 0 standard errors, "
                               "or None to search everything")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise FitError(f"SearchGrid.max_candidates={self.max_candidates}; give a positive "
                           f"budget, or None for the exact (unscreened) group lasso")

    @property
    def compute_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @classmethod
    def paper(cls) -> "SearchGrid":
        """The paper's protocol: 5 folds and its F grid (0.0005 ... 0.1) plus F = 0.2, which CV picks on
        some tasks at T = 512; with solver="paper", also its lr {0.1, 0.01}, steps {500, 5000} and
        l21 {1e-3, 1e-5} (the path solver draws its lambdas from the data instead)."""
        return cls()

    def for_rows(self, n: int) -> "SearchGrid":
        """This grid for n training rows: max_candidates lowered so that (folds + 1) screened
        candidate sets of n float32 rows fit in pool_bytes (the memory of a streamed fit grows with
        n x budget, `estimators._streamed`)."""
        if self.max_candidates is None or self.pool_bytes is None:
            return self
        budget = max(1, min(self.max_candidates, self.pool_bytes // (4 * max(n, 1) * (self.folds + 1))))
        return self if budget == self.max_candidates else dataclasses.replace(self, max_candidates=budget)

    def rung(self) -> "SearchGrid":
        """The grid of a successive-halving rung: fractions up to RUNG_MAX_FRACTION (at least the
        smallest), no tap budgets, the best CV accuracy (rungs compare T, not deployed cost)."""
        small = tuple(f for f in self.fractions if f <= RUNG_MAX_FRACTION) or (min(self.fractions),)
        return dataclasses.replace(self, fractions=small, tap_budgets=(), choice="accuracy", latency_budget=None)

    @classmethod
    def quick(cls) -> "SearchGrid":
        """A cheaper protocol for demos and tests: 500 steps, 3 folds."""
        return cls(steps=(500,), folds=3)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


@dataclass
class LinearHead:
    """logits = features[:, self.features] @ weight + bias."""

    weight: np.ndarray  # float32[k, C]
    bias: np.ndarray  # float32[C]
    features: np.ndarray  # int64[k], sorted unique column indices into the input D


@dataclass
class FitResult:
    method: str  # 'HEAD2TOE' | 'LINEAR' | 'ALL-L2' | 'ALL-L1' | 'ALL-L21'
    head: LinearHead | None  # None: CV only (a successive-halving rung)
    config: dict  # chosen hyperparameters
    cv_table: list[dict]  # one row per grid point
    scores: np.ndarray | None  # float32[D] relevance of the final selection run (HEAD2TOE)
    fit_seconds: float


def predict_logits(head: LinearHead, features: np.ndarray) -> np.ndarray:
    """features: float[n, D] -> float32[n, C]."""
    x = np.asarray(features[:, head.features], dtype=np.float32)
    return x @ head.weight + head.bias


# ----------------------------------------------------------------------------- input checks


def prepare_arrays(features, labels, n_classes: int, folds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert once: float32 torch [n, D] (shares memory when possible), int64 [n]."""
    labels = check_labels(features, labels, n_classes, folds)
    array = np.asarray(features, dtype=np.float32)  # one conversion (float16 memmap -> float32)
    with warnings.catch_warnings():  # read-only memmaps: we never write into x
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.ascontiguousarray(array))
    if not bool(torch.isfinite(x).all()):
        row = int((~torch.isfinite(x)).any(dim=1).nonzero()[0])
        raise FitError(f"features contain NaN or inf (first in row {row}); re-extract the "
                       f"feature cache or drop the row")
    return x, torch.from_numpy(labels.astype(np.int64))


def check_labels(features, labels, n_classes: int, folds: int) -> np.ndarray:
    """The labels as an integer array after the shape and CV checks (FitError naming the fix);
    features: anything with .ndim and .shape (it is not read)."""
    if getattr(features, "ndim", None) != 2:
        raise FitError(f"features must be a 2-D array [n, D], got shape "
                       f"{getattr(features, 'shape', None)}; flatten the taps per image first")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise FitError(f"labels shape {labels.shape} does not match features shape "
                       f"{features.shape}; pass one label per feature row")
    if not np.issubdtype(labels.dtype, np.integer):
        raise FitError(f"labels have dtype {labels.dtype}; pass integer class ids")
    if n_classes < 2:
        raise FitError(f"n_classes={n_classes}; a classifier needs at least 2 classes")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        bad = labels[(labels < 0) | (labels >= n_classes)][0]
        raise FitError(f"label {bad} is outside [0, {n_classes}); fix the labels or n_classes")
    counts = np.bincount(labels, minlength=n_classes)
    if counts.min() < folds:
        c = int(np.argmin(counts))
        raise FitError(f"class {c} has {counts[c]} training examples, fewer than the {folds} CV "
                       f"folds; add examples or lower SearchGrid.folds")
    return labels


def cv_plan(labels: np.ndarray, grid: SearchGrid) -> tuple[np.ndarray | None, np.ndarray]:
    """(rows int64[m] sorted, or None for all n rows; fold int64[m] of each): the rows that CV
    scores and their folds. Above grid.cv_rows rows, a stratified subsample of about cv_rows (each
    class in proportion, at least `folds` rows), so that CV costs the same at any n and only the
    refit grows with n."""
    labels = np.asarray(labels)
    n = len(labels)
    if grid.cv_rows is None or n <= grid.cv_rows:
        return None, stratified_folds(labels, grid.folds, grid.seed)
    rng = np.random.default_rng(grid.seed)
    take = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        take.append(rng.choice(rows, min(len(rows), max(grid.folds, round(len(rows) * grid.cv_rows / n))),
                               replace=False))
    rows = np.sort(np.concatenate(take))
    return rows, stratified_folds(labels[rows], grid.folds, grid.seed)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """int64[n] fold id per row; every class is spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = (offset + np.arange(len(rows))) % folds
        offset += len(rows)  # continue the round-robin so fold sizes stay balanced
    return fold


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """int64[steps, b] row indices: shuffled epochs, remainder dropped, b = min(batch_size, n)."""
    b = min(batch_size, n)
    per_epoch = n // b
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-steps // per_epoch)
    perms = torch.stack([torch.randperm(n, generator=gen)[: per_epoch * b] for _ in range(epochs)])
    return perms.reshape(-1, b)[:steps]


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """Learning rate of step `step` (0-based): lr at step 0, decaying to 0 at step `steps`."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def n_selected(dim: int, fraction: float) -> int:
    return max(1, int(dim * fraction))






@dataclass
class CVData:
    x: torch.Tensor  # float32[n, D]
    y: torch.Tensor  # int64[n]
    n_classes: int
    onehot: torch.Tensor  # float32[n, C]
    fold: torch.Tensor  # int64[n]
    dtype: torch.dtype  # GEMM precision (SearchGrid.compute_dtype)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def prepare_cv(features, labels, n_classes, grid: SearchGrid) -> CVData:
    if grid.precision == "bf16" and not native_bf16():
        warnings.warn("SearchGrid.precision='bf16' on a CPU without native bfloat16 (AVX512-BF16 or AMX): "
                      "the fit is emulated and slower than fp32; use --fit-precision fp32", RuntimeWarning,
                      stacklevel=3)
    x, y = prepare_arrays(features, labels, n_classes, grid.folds)
    fold = torch.from_numpy(stratified_folds(y.numpy(), grid.folds, grid.seed))
    return CVData(x, y, n_classes, torch.nn.functional.one_hot(y, n_classes).float(), fold,
                 grid.compute_dtype)


def cv_subset(data: CVData, grid: SearchGrid) -> CVData:
    """The CVData that CV scores (`cv_plan`): `data` itself, or its subsample with its own folds."""
    rows, fold = cv_plan(data.y.numpy(), grid)
    if rows is None:
        return data
    index = torch.from_numpy(rows)
    return CVData(data.x.index_select(0, index), data.y[index], data.n_classes, data.onehot[index],
                  torch.from_numpy(fold), data.dtype)


def cv_batch_size(grid: SearchGrid) -> int:
    # each fold model trains on (folds-1)/folds of a batch: ~batch_size own rows per step
    return round(grid.batch_size * grid.folds / (grid.folds - 1))


def cv_models(data: CVData, grid: SearchGrid, coefs: Sequence[float | None]):
    """Model axis of a CV run: (coef, lr, fold) for every combination."""
    models = [(c, lr, f) for lr in grid.lrs for c in coefs for f in range(grid.folds)]
    folds = torch.tensor([m[2] for m in models])
    val_mask = data.fold.unsqueeze(0) == folds.unsqueeze(1)  # [M, n]
    return models, val_mask


def summarize_cv(rows_acc: dict, base: dict) -> list[dict]:
    table = []
    for key, accs in rows_acc.items():
        accs = np.asarray(accs, dtype=np.float64)
        table.append({**base, **dict(key), "val_acc_mean": float(accs.mean()),
                      "val_acc_std": float(accs.std())})
    return table


def choose_best(items: Sequence[T], accuracy: Callable[[T], float], *tie_breaks: Callable[[T], Any]) -> T:
    """The item with the highest accuracy; the one rule every "best of" in h2t-edge follows.

    Accuracies are compared rounded to 9 decimals, so float noise never decides. Ties go to the
    smallest value of each tie-break in turn (callers pass cost first: fewer features, then fewer
    steps or the smaller target size), and then to the earliest item."""
    if not items:
        raise FitError("nothing to choose from: no candidate was fitted")
    return min(items, key=lambda item: (-round(float(accuracy(item)), 9), *(tb(item) for tb in tie_breaks)))


def standard_error(row: dict, folds: int) -> float:
    """The standard error of a CV row's mean accuracy: sample std over folds / sqrt(folds) (rows
    keep the population std, np.std)."""
    return float(row["val_acc_std"]) / math.sqrt(max(folds - 1, 1))


def choose_cheapest(items: Sequence[T], accuracy: Callable[[T], float], error: Callable[[T], float],
                    cost: Callable[[T], float], *tie_breaks: Callable[[T], Any], min_saving: float = 0.0) -> T:
    """The one-standard-error rule applied to deployment cost: among the items whose accuracy is at
    least the best item's (`choose_best` with `tie_breaks`) minus its standard error, and that cost
    at least `min_saving` less than the best item (`SearchGrid.min_saving`: a saving too small to
    measure buys nothing for the accuracy it may cost), the cheapest (cost rounded to 6 decimals);
    none: the best item. Ties go to the higher accuracy, then `tie_breaks`, then the earliest. With
    every cost equal this is `choose_best`."""
    best = choose_best(items, accuracy, *tie_breaks)
    floor = round(float(accuracy(best)) - float(error(best)), 9)
    ceiling = round(float(cost(best)) - min_saving, 6)
    near = [item for item in items if round(float(accuracy(item)), 9) >= floor
            and (item is best or round(float(cost(item)), 6) <= ceiling)]
    return min(near, key=lambda item: (round(float(cost(item)), 6), -round(float(accuracy(item)), 9),
                                       *(tb(item) for tb in tie_breaks)))


def chosen_row(table: list[dict], config: dict) -> dict:
    """The CV row of a fit's chosen configuration: config holds exactly the keys that pick it (lr,
    steps, l21, fraction, and the path solver's tap budget, as row "taps")."""
    return next(r for r in table if all(r.get(k) == config[k] for k in ("lr", "steps", "l21", "fraction")
                                        if k in config) and r.get("taps") == config.get("tap_budget"))


def best_row(table: list[dict]) -> dict:
    """Best mean validation accuracy of a CV table; ties -> fewer features, then fewer steps, then grid order."""
    return choose_best(table, lambda r: r["val_acc_mean"], lambda r: r["n_features"], lambda r: r["steps"])


def chosen_config(row: dict, grid: SearchGrid, *keys: str) -> dict:
    return {**{k: row[k] for k in keys}, "batch_size": grid.batch_size, "folds": grid.folds,
            "seed": grid.seed}
