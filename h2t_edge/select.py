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

import contextlib
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.optim.adam import adam as _adam

from .errors import FitError

Progress = Callable[[str, int, int], None]

PENALTIES = ("l21", "l2", "l1")
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_NORM_EPS = 1e-12  # group-lasso subgradient W_i/||W_i||: avoids 0/0 for rows still at zero
_PROGRESS_EVERY = 25  # steps between progress callbacks
_GATHER_BUDGET_BYTES = 1 << 30  # per chunk of retrained models: [models, n, k_max] float32
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # SearchGrid.precision -> GEMM dtype


def _training_threads() -> int:
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    return os.cpu_count() or 1


@contextlib.contextmanager
def _cpu_training_mode():
    """All cores (or $OMP_NUM_THREADS when set, e.g. to run two fits side by side), and
    denormals flushed to zero: saturated softmax probabilities and decayed Adam moments otherwise
    turn into denormals that make GEMMs ~100x slower on x86."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_training_threads())
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

    def __post_init__(self) -> None:
        for name in ("lrs", "steps", "l21s", "penalties", "fractions"):
            values = getattr(self, name)
            object.__setattr__(self, name, tuple(values))
            if not values:
                raise FitError(f"SearchGrid.{name} is empty; give at least one value")
        if self.folds < 2:
            raise FitError(f"SearchGrid.folds={self.folds}; cross-validation needs folds >= 2")
        if self.batch_size < 1 or any(s < 1 for s in self.steps):
            raise FitError("SearchGrid.batch_size and SearchGrid.steps must be positive")
        if any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise FitError(f"SearchGrid.fractions={self.fractions}; each must lie in (0, 1]")
        if self.precision not in PRECISIONS:
            raise FitError(f"SearchGrid.precision={self.precision!r}; use one of {sorted(PRECISIONS)}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise FitError(f"SearchGrid.max_candidates={self.max_candidates}; give a positive "
                           f"budget, or None for the exact (unscreened) group lasso")

    @property
    def compute_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @classmethod
    def paper(cls) -> "SearchGrid":
        """The paper's protocol: 5 folds, lr {0.1, 0.01}, steps {500, 5000}, l21 {1e-3, 1e-5}, and
        its F grid (0.0005 ... 0.1) plus F = 0.2, which CV picks on some tasks at T = 512."""
        return cls()

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
    head: LinearHead
    config: dict  # chosen hyperparameters
    cv_table: list[dict]  # one row per grid point
    scores: np.ndarray | None  # float32[D] relevance of the final selection run (HEAD2TOE)
    fit_seconds: float


def predict_logits(head: LinearHead, features: np.ndarray) -> np.ndarray:
    """features: float[n, D] -> float32[n, C]."""
    x = np.asarray(features[:, head.features], dtype=np.float32)
    return x @ head.weight + head.bias


# ----------------------------------------------------------------------------- input checks


def _prepare(features, labels, n_classes: int, folds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert once: float32 torch [n, D] (shares memory when possible), int64 [n]."""
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
    array = np.asarray(features, dtype=np.float32)  # one conversion (float16 memmap -> float32)
    with warnings.catch_warnings():  # read-only memmaps: we never write into x
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.ascontiguousarray(array))
    if not bool(torch.isfinite(x).all()):
        row = int((~torch.isfinite(x)).any(dim=1).nonzero()[0])
        raise FitError(f"features contain NaN or inf (first in row {row}); re-extract the "
                       f"feature cache or drop the row")
    return x, torch.from_numpy(labels.astype(np.int64))


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


def _n_selected(dim: int, fraction: float) -> int:
    return max(1, int(dim * fraction))


# ----------------------------------------------------------------------------- batched trainers


def _lr_groups(lrs: Sequence[float]) -> list[tuple[float, np.ndarray]]:
    """Model indices per distinct lr (the fused Adam kernel takes one scalar lr per call)."""
    lrs = np.asarray(lrs, dtype=np.float64)
    return [(float(lr), np.flatnonzero(lrs == lr)) for lr in dict.fromkeys(lrs.tolist())]


class _Adam:
    """Adam over a list of tensors with one lr, using torch's fused CPU kernel in place."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.step_count = [torch.zeros((), dtype=torch.float32) for _ in params]

    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        _adam(self.params, grads, self.exp_avg, self.exp_avg_sq, [], self.step_count,
              foreach=False, fused=True, capturable=False, differentiable=False,
              grad_scale=None, found_inf=None, has_complex=False, amsgrad=False,
              beta1=_ADAM_BETAS[0], beta2=_ADAM_BETAS[1], lr=lr, weight_decay=0.0,
              eps=_ADAM_EPS, maximize=False)


class _Matmul:
    """`op(a, b)` into the float32 `out` with a and b in a's dtype (float32 or bfloat16).

    float32: op writes `out` directly. bfloat16: b is cast into a reused buffer, op writes a
    bfloat16 result (accumulated in fp32 by oneDNN) that is then copied into `out`. Buffers are
    kept per call site, so a training loop allocates nothing per step."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._buffers: dict = {}

    def _buffer(self, key, shape) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape:
            buf = self._buffers[key] = torch.empty(shape, dtype=self.dtype)
        return buf

    def __call__(self, op, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, key) -> torch.Tensor:
        if self.dtype == torch.float32:
            return op(a, b, out=out)
        low_b = b if b.dtype == self.dtype else self._buffer((key, "b"), b.shape).copy_(b)
        low_out = self._buffer((key, "out"), out.shape)
        op(a, low_b, out=low_out)
        return out.copy_(low_out)


def _ce_grad_(logits: torch.Tensor, onehot: torch.Tensor, row_weight: torch.Tensor) -> None:
    """In place: logits[..., C] -> d(weighted mean CE)/d logits = (softmax - onehot) * weight."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    logits.div_(logits.sum(dim=-1, keepdim=True)).sub_(onehot).mul_(row_weight)


def _row_weights(train_mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """float32[b, M]: 1/(own rows in batch) for a model's training rows in the batch, else 0."""
    w = train_mask.index_select(1, idx).t()  # [b, M]
    return w / w.sum(0).clamp_(min=1.0)


def _add_penalty_grad_(grad: torch.Tensor, weight: torch.Tensor, penalty: str | None,
                       coef: torch.Tensor) -> None:
    """grad, weight: [..., C]; coef: float32, broadcastable to weight's shape with 1 for C (one
    coefficient per model) -> grad += d penalty / d weight."""
    if penalty is None:
        return
    if penalty == "l21":
        scale = torch.linalg.vector_norm(weight, dim=-1, keepdim=True).add_(_NORM_EPS)
        grad.addcmul_(weight, torch.div(coef, scale, out=scale))
    elif penalty == "l2":
        grad.addcmul_(weight, 2.0 * coef)
    elif penalty == "l1":
        grad.addcmul_(torch.sign(weight), coef)
    else:
        raise FitError(f"penalty {penalty!r} is unknown; use one of {PENALTIES}")


def _train_wide_group(x, onehot, mask, lr, coef, penalty, batches, progress, stage, done, total,
                      col_mask=None):
    """One lr group of models sharing the columns of x. Returns weight [D, M, C], bias [M, C].

    col_mask: float32[D, M] or None; a model's weight rows where it is 0 get no gradient, so they
    stay exactly 0 (Adam's moments stay 0 and the l21 subgradient of a zero row is 0).
    """
    dim, n_models, n_classes = x.shape[1], mask.shape[0], onehot.shape[1]
    weight = torch.zeros(dim, n_models, n_classes)
    bias = torch.zeros(n_models, n_classes)
    grad_w, grad_b = torch.empty_like(weight), torch.empty_like(bias)
    adam = _Adam([weight, bias])
    xb = torch.empty(batches.shape[1], dim, dtype=x.dtype)  # x's dtype is the GEMM precision
    matmul = _Matmul(x.dtype)
    logits = torch.empty(batches.shape[1], n_models * n_classes)
    steps = batches.shape[0]
    for step in range(steps):
        idx = batches[step]
        torch.index_select(x, 0, idx, out=xb)
        if x.dtype == torch.float32:
            torch.addmm(bias.view(1, -1), xb, weight.view(dim, -1), out=logits)
        else:
            matmul(torch.mm, xb, weight.view(dim, -1), logits, "fwd").add_(bias.view(1, -1))
        g = logits.view(-1, n_models, n_classes)
        _ce_grad_(g, onehot[idx].unsqueeze(1), _row_weights(mask, idx).unsqueeze(2))
        matmul(torch.mm, xb.t(), logits, grad_w.view(dim, -1), "bwd")
        torch.sum(g, dim=0, out=grad_b)
        if col_mask is not None:
            grad_w.mul_(col_mask.unsqueeze(2))
        _add_penalty_grad_(grad_w, weight, penalty, coef.view(1, -1, 1))
        adam.step([grad_w, grad_b], cosine_lr(lr, step, steps))
        if progress is not None and ((step + 1) % _PROGRESS_EVERY == 0 or step + 1 == steps):
            progress(stage, done + step + 1, total)
    return weight, bias


def _train_screened_group(x, onehot, mask, lr, coef, penalty, batches, progress, stage, done, total,
                          col_mask):
    """`_train_wide_group` with a col_mask, computed on each model's candidates only.

    Models with the same candidates (the lambdas of one CV fold) form a subset; every subset must
    have the same number of models and of candidates K (as `_screen` makes them), else None is
    returned. Each subset's columns are gathered once into [G, n, K], and the GEMMs, the penalty
    and Adam run on [G, K, models per subset, C] rather than on the whole pool [P, M, C]: the same
    math (a masked-out row stays exactly 0 there), with K / P of the weight traffic.
    Returns weight [P, M, C] (zero outside each model's candidates), bias [M, C]; or None.
    """
    subsets, subset_of = torch.unique(col_mask.t() != 0, dim=0, return_inverse=True)  # [G, P], [M]
    per_subset, sizes = torch.bincount(subset_of), subsets.sum(1)
    if per_subset.unique().numel() != 1 or sizes.unique().numel() != 1:
        return None
    n_sub, per, width = subsets.shape[0], int(per_subset[0]), int(sizes[0])
    n, n_models, n_classes = x.shape[0], mask.shape[0], onehot.shape[1]
    order = torch.argsort(subset_of, stable=True)  # model order[g * per + i] is subset g's i-th
    candidates = torch.stack([row.nonzero().squeeze(1) for row in subsets])  # [G, K], sorted
    xs = torch.stack([x.index_select(1, c) for c in candidates])  # [G, n, K], x's dtype
    weight = torch.zeros(n_sub, width, per * n_classes)
    bias = torch.zeros(n_sub, 1, per * n_classes)
    grad_w, grad_b = torch.empty_like(weight), torch.empty_like(bias)
    adam = _Adam([weight, bias])
    matmul = _Matmul(x.dtype)
    mask, coef = mask[order], coef[order].view(n_sub, 1, per, 1)
    b = batches.shape[1]
    xg = torch.empty(n_sub, b, width, dtype=x.dtype)
    logits = torch.empty(n_sub, b, per * n_classes)
    offset = (torch.arange(n_sub) * n).unsqueeze(1)
    steps = batches.shape[0]
    for step in range(steps):
        idx = batches[step]
        torch.index_select(xs.view(-1, width), 0, (offset + idx).view(-1), out=xg.view(-1, width))
        matmul(torch.bmm, xg, weight, logits, "fwd").add_(bias)
        g = logits.view(n_sub, b, per, n_classes)
        row_weight = _row_weights(mask, idx).view(b, n_sub, per).transpose(0, 1).unsqueeze(3)
        _ce_grad_(g, onehot[idx].view(1, b, 1, n_classes), row_weight)
        matmul(torch.bmm, xg.transpose(1, 2), logits, grad_w, "bwd")
        torch.sum(logits, dim=1, keepdim=True, out=grad_b)
        _add_penalty_grad_(grad_w.view(n_sub, width, per, n_classes),
                           weight.view(n_sub, width, per, n_classes), penalty, coef)
        adam.step([grad_w, grad_b], cosine_lr(lr, step, steps))
        if progress is not None and ((step + 1) % _PROGRESS_EVERY == 0 or step + 1 == steps):
            progress(stage, done + step + 1, total)
    full = torch.zeros(x.shape[1], n_models, n_classes)
    for g in range(n_sub):
        models = order[g * per:(g + 1) * per]
        full[candidates[g].unsqueeze(1), models.unsqueeze(0)] = weight[g].view(width, per, n_classes)
    full_bias = torch.empty(n_models, n_classes)
    full_bias[order] = bias.view(n_models, n_classes)
    return full, full_bias


def _wide_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[n, D] x [D, M, C] -> [n, M, C], the GEMM in x's dtype (as the heads were trained)."""
    if x.dtype == torch.float32:
        out = torch.addmm(bias.view(1, -1), x, weight.view(x.shape[1], -1))
    else:
        out = torch.mm(x, weight.view(x.shape[1], -1).to(x.dtype)).float().add_(bias.view(1, -1))
    return out.view(x.shape[0], *bias.shape)


@_cpu_training_mode()
def train_heads(features, labels, n_classes: int, train_mask, lrs: Sequence[float], steps: int,
                *, penalty: str | None = None, coefs: Sequence[float] | None = None,
                batch_size: int = 128, seed: int = 0, progress: Progress | None = None,
                stage: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Train M linear heads at once on the batches `batch_schedule(n, batch_size, steps, seed)`.

    features: float32[n, D]; labels: int64[n]; train_mask: bool[M, n] (rows each model trains
    on: its loss is the mean CE over its own rows of the batch); lrs, coefs: float[M]; penalty:
    None | 'l21' | 'l2' | 'l1'. Batching does not change the math: each model ends exactly as it
    would alone with the same seed.
    Returns weight float32[M, D, C], bias float32[M, C].
    """
    x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    mask = torch.as_tensor(np.asarray(train_mask), dtype=torch.float32)
    onehot = torch.nn.functional.one_hot(y, n_classes).float()
    weight = torch.empty(mask.shape[0], x.shape[1], n_classes)
    bias = torch.empty(mask.shape[0], n_classes)
    for models, w, b in _run_wide(x, onehot, mask, lrs, coefs, penalty, steps, batch_size, seed,
                                  progress, stage):
        weight[models], bias[models] = w.permute(1, 0, 2), b
    return weight, bias


def _top_columns(weight: torch.Tensor, k: int,
                 col_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [D, M, C] -> relevance [M, D], columns int64[M, k] by decreasing relevance.

    Ties go to the lower column index (stable sort), so the selection is deterministic. Columns
    outside col_mask [D, M] rank after every allowed one.
    """
    scores = torch.linalg.vector_norm(weight, dim=2).t().contiguous()
    ranked = scores if col_mask is None else scores.masked_fill(col_mask.t() == 0, -1.0)
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    return scores, order[:, :k].contiguous()


def _train_nested_group(x, onehot, mask, lr, columns, ks, batches, progress, stage, done, total,
                        dtype=torch.float32, shared: int = 0):
    """Unregularized heads on nested column prefixes, one lr; the GEMMs in `dtype`.

    columns: int64[M, k_max] ranked columns per model; head f of model m uses columns[m, :ks[f]].
    shared: the first `shared` columns are the same for every model (HEAD2TOE+LINEAR's kept
    columns; shared <= ks[0]): they are gathered once and enter every model through one GEMM.
    Returns per f: weight [M, ks[f], C], bias [M, C]; and the logits of every head on every row,
    float32[M, n, F, C].
    """
    n_models = columns.shape[0]
    n_classes = onehot.shape[1]
    n_heads = len(ks)
    if shared and (shared > ks[0] or not bool((columns[:, :shared] == columns[:1, :shared]).all())):
        raise FitError(f"internal: the first {shared} columns are not common to every model and head")
    # Column block j (edges[j]:edges[j+1]) feeds the heads whose prefix covers it, first[j]..F-1, so
    # its weights for all of them sit side by side: one GEMM per block instead of one per head,
    # with the same FLOPs but wider, more efficient GEMMs where a block feeds many heads. Adam is
    # elementwise, so regrouping the parameters does not change the optimisation.
    edges = sorted({0, *ks, *([shared] if shared else [])})
    widths = [edges[j + 1] - edges[j] for j in range(len(edges) - 1)]
    first = [next(f for f, k in enumerate(ks) if k >= edges[j + 1]) for j in range(len(widths))]
    fed = [n_heads - f for f in first]
    common = 1 if shared else 0  # blocks [0, common) are shared by every model
    # The shared block: features [n, K] and weights [K, M * fed * C] (one mm for all models).
    # Per-model blocks: features [M, n, dk] and weights [M, dk, fed * C] (bmm). Separate contiguous
    # blocks, not slices of one [M, n, k_max]: bf16 bmm on strided slices is up to 10x slower.
    gathered, blocks = [], []
    for j, w in enumerate(widths):
        cols = columns[:, edges[j]:edges[j + 1]]
        if j < common:
            gathered.append(x.index_select(1, cols[0]).to(dtype))
            blocks.append(torch.zeros(w, n_models * fed[j] * n_classes))
            continue
        block = torch.empty(n_models, x.shape[0], w, dtype=dtype)
        for m in range(n_models):
            if dtype == x.dtype:
                torch.index_select(x, 1, cols[m], out=block[m])
            else:
                block[m].copy_(x.index_select(1, cols[m]))
        gathered.append(block)
        blocks.append(torch.zeros(n_models, w, fed[j] * n_classes))
    bias = torch.zeros(n_models, n_heads, n_classes)
    grads = [torch.empty_like(p) for p in blocks + [bias]]
    adam = _Adam(blocks + [bias])
    matmul = _Matmul(dtype)

    def buffers(rows: int):
        return (torch.empty(n_models, rows, n_heads, n_classes),
                [torch.empty(rows, n_models * fed[j] * n_classes) if j < common else
                 torch.empty(n_models, rows, fed[j] * n_classes) for j in range(len(widths))])

    def forward(xs: list[torch.Tensor], logits: torch.Tensor, partial: list[torch.Tensor]) -> None:
        rows = logits.shape[1]
        logits.copy_(bias.unsqueeze(1).expand_as(logits))
        for j in range(len(widths)):
            if j < common:  # [rows, M * fed * C] -> [M, rows, fed, C]
                out = matmul(torch.mm, xs[j], blocks[j], partial[j], ("fwd", j, rows))
                logits[:, :, first[j]:].add_(out.view(rows, n_models, fed[j], n_classes).transpose(0, 1))
            else:
                out = matmul(torch.bmm, xs[j], blocks[j], partial[j], ("fwd", j, rows))
                logits[:, :, first[j]:].add_(out.view(n_models, rows, fed[j], n_classes))

    b = batches.shape[1]
    xg = [torch.empty(b, w, dtype=dtype) if j < common else torch.empty(n_models, b, w, dtype=dtype)
          for j, w in enumerate(widths)]
    logits, partial = buffers(b)
    # A step's rows of every model in one 2-D row gather per block: [M * n, dk] -> [M * b, dk]
    # (3x faster in bf16 than index_select on dim 1 of [M, n, dk]).
    model_offset = (torch.arange(n_models) * x.shape[0]).unsqueeze(1)
    steps = batches.shape[0]
    for step in range(steps):
        idx = batches[step]
        rows = (model_offset + idx).view(-1)
        for j, w in enumerate(widths):
            if j < common:
                torch.index_select(gathered[j], 0, idx, out=xg[j])
            else:
                torch.index_select(gathered[j].view(-1, w), 0, rows, out=xg[j].view(-1, w))
        forward(xg, logits, partial)
        _ce_grad_(logits, onehot[idx].unsqueeze(1), _row_weights(mask, idx).t().view(n_models, b, 1, 1))
        for j in range(len(widths)):
            if j < common:
                upstream = logits[:, :, first[j]:].transpose(0, 1).reshape(b, -1)  # [b, M * fed * C]
                matmul(torch.mm, xg[j].t(), upstream, grads[j], ("bwd", j))
            else:
                matmul(torch.bmm, xg[j].transpose(1, 2), logits[:, :, first[j]:].reshape(n_models, b, -1),
                       grads[j], ("bwd", j))
        torch.sum(logits, dim=1, out=grads[-1])
        adam.step(grads, cosine_lr(lr, step, steps))
        if progress is not None and ((step + 1) % _PROGRESS_EVERY == 0 or step + 1 == steps):
            progress(stage, done + step + 1, total)
    del xg
    all_logits, all_partial = buffers(x.shape[0])
    forward(gathered, all_logits, all_partial)

    def head_slice(j: int, f: int) -> torch.Tensor:  # block j's weights of head f: [M, dk, C]
        if j < common:
            return blocks[j].view(widths[j], n_models, fed[j], n_classes)[:, :, f - first[j]].transpose(0, 1)
        return blocks[j][:, :, (f - first[j]) * n_classes:(f - first[j] + 1) * n_classes]

    weights = [torch.cat([head_slice(j, f) for j in range(len(widths)) if first[j] <= f], dim=1)
               for f in range(n_heads)]
    biases = [bias[:, f].contiguous() for f in range(n_heads)]
    return weights, biases, all_logits


def _nested_chunks(models: np.ndarray, n: int, k_max: int) -> list[np.ndarray]:
    per_model = max(1, n * k_max * 4)
    size = max(1, _GATHER_BUDGET_BYTES // per_model)
    return [models[i:i + size] for i in range(0, len(models), size)]


def _nested_val_accuracy(logits, labels, val_mask) -> torch.Tensor:
    """float64[M, F]: accuracy of every nested head on its model's validation rows.

    logits: float32[M, n, F, C] of _train_nested_group; val_mask: [M, n]."""
    correct = (logits.argmax(-1) == labels.view(1, -1, 1)).double()  # [M, n, F]
    return _masked_mean(correct.transpose(1, 2), val_mask.unsqueeze(1))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.double()
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


# ----------------------------------------------------------------------------- protocols


@dataclass
class _Data:
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


def _setup(features, labels, n_classes, grid: SearchGrid) -> _Data:
    if grid.precision == "bf16" and not native_bf16():
        warnings.warn("SearchGrid.precision='bf16' on a CPU without native bfloat16 (AVX512-BF16 or AMX): "
                      "the fit is emulated and slower than fp32; use --fit-precision fp32", RuntimeWarning,
                      stacklevel=3)
    x, y = _prepare(features, labels, n_classes, grid.folds)
    fold = torch.from_numpy(stratified_folds(y.numpy(), grid.folds, grid.seed))
    return _Data(x, y, n_classes, torch.nn.functional.one_hot(y, n_classes).float(), fold,
                 grid.compute_dtype)


def _cv_batch_size(grid: SearchGrid) -> int:
    # each fold model trains on (folds-1)/folds of a batch: ~batch_size own rows per step
    return round(grid.batch_size * grid.folds / (grid.folds - 1))


def _cv_models(data: _Data, grid: SearchGrid, coefs: Sequence[float | None]):
    """Model axis of a CV run: (coef, lr, fold) for every combination."""
    models = [(c, lr, f) for lr in grid.lrs for c in coefs for f in range(grid.folds)]
    folds = torch.tensor([m[2] for m in models])
    val_mask = data.fold.unsqueeze(0) == folds.unsqueeze(1)  # [M, n]
    return models, val_mask


def _run_wide(x, onehot, mask, lrs, coefs, penalty, steps, batch_size, seed, progress, stage,
              col_mask=None, dtype=torch.float32):
    """Yields (models, weight [D, Mg, C], bias [Mg, C]) per lr group; coefs may hold None.

    col_mask: float32[D, M] or None, the columns each model may use (see _train_wide_group);
    dtype: the GEMM precision (x is cast to it once).
    """
    x = x.to(dtype)
    batches = batch_schedule(x.shape[0], batch_size, steps, seed)
    coefs = torch.tensor([0.0 if c is None else float(c) for c in
                          (coefs if coefs is not None else [None] * len(lrs))])
    groups = _lr_groups(lrs)
    for i, (lr, models) in enumerate(groups):
        args = (x, onehot, mask[models], lr, coefs[models], penalty, batches, progress, stage, i * steps,
                len(groups) * steps)
        group_mask = None if col_mask is None else col_mask[:, models].contiguous()
        result = None if group_mask is None else _train_screened_group(*args, group_mask)
        if result is None:  # no mask, or uneven candidate subsets: the masked pool
            result = _train_wide_group(*args, group_mask)
        yield models, *result


def _summarize(rows_acc: dict, base: dict) -> list[dict]:
    table = []
    for key, accs in rows_acc.items():
        accs = np.asarray(accs, dtype=np.float64)
        table.append({**base, **dict(key), "val_acc_mean": float(accs.mean()),
                      "val_acc_std": float(accs.std())})
    return table


def _best(table: list[dict]) -> dict:
    """Best mean validation accuracy; ties -> fewer features, then fewer steps, then grid order."""
    return min(table, key=lambda r: (-round(r["val_acc_mean"], 9), r["n_features"], r["steps"]))


def _cv_wide_table(data, grid, penalty, coefs, method, coef_key, progress) -> list[dict]:
    models, val_mask = _cv_models(data, grid, coefs)
    lrs = [m[1] for m in models]
    accs: dict = {}
    dim = data.x.shape[1]
    x = data.x.to(data.dtype)  # once for every steps value and lr group (_run_wide keeps it as it is)
    for steps in grid.steps:
        for idx, w, b in _run_wide(x, data.onehot, (~val_mask).float(), lrs,
                                   [m[0] for m in models], penalty, steps, _cv_batch_size(grid),
                                   grid.seed, progress, f"cv {method} steps={steps}",
                                   dtype=data.dtype):
            pred = _wide_logits(x, w, b).argmax(-1).t()  # [Mg, n]
            acc = _masked_mean((pred == data.y).double(), val_mask[idx])
            for j, m in enumerate(idx):
                coef, lr, _ = models[m]
                key = ((coef_key, coef), ("lr", lr), ("steps", steps))
                accs.setdefault(key, []).append(float(acc[j]))
    base = {"method": method, "l21": None, "penalty": None, "fraction": 1.0, "n_features": dim}
    return _summarize(accs, base)


def _refit_wide(data, grid, penalty, coef, lr, steps, progress) -> LinearHead:
    mask = torch.ones(1, data.x.shape[0])
    (_, w, b), = _run_wide(data.x, data.onehot, mask, [lr], [coef], penalty, steps,
                           grid.batch_size, grid.seed, progress, "refit", dtype=data.dtype)
    return LinearHead(w[:, 0].numpy().copy(), b[0].numpy().copy(),
                      np.arange(data.x.shape[1], dtype=np.int64))


def _config(row: dict, grid: SearchGrid, *keys: str) -> dict:
    return {**{k: row[k] for k in keys}, "batch_size": grid.batch_size, "folds": grid.folds,
            "seed": grid.seed}


@_cpu_training_mode()
def fit_linear(features, labels, n_classes: int, grid: SearchGrid = SearchGrid.paper(),
               progress: Progress | None = None) -> FitResult:
    """LINEAR baseline: unregularized head on all given features (grid lrs x steps by CV)."""
    start = time.perf_counter()
    data = _setup(features, labels, n_classes, grid)
    table = _cv_wide_table(data, grid, None, [None], "LINEAR", "penalty", progress)
    best = _best(table)
    head = _refit_wide(data, grid, None, None, best["lr"], best["steps"], progress)
    return FitResult("LINEAR", head, _config(best, grid, "lr", "steps"), table, None,
                     time.perf_counter() - start)


@_cpu_training_mode()
def fit_regularized(features, labels, n_classes: int, penalty: str,
                    grid: SearchGrid = SearchGrid.paper(),
                    progress: Progress | None = None) -> FitResult:
    """+ALL baselines: one head on all features with an l2 / l1 / l21 penalty (grid.penalties)."""
    if penalty not in PENALTIES:
        raise FitError(f"penalty {penalty!r} is unknown; use one of {PENALTIES}")
    start = time.perf_counter()
    data = _setup(features, labels, n_classes, grid)
    method = f"ALL-{penalty.upper()}"
    table = _cv_wide_table(data, grid, penalty, grid.penalties, method, "penalty", progress)
    best = _best(table)
    head = _refit_wide(data, grid, penalty, best["penalty"], best["lr"], best["steps"], progress)
    return FitResult(method, head, _config(best, grid, "penalty", "lr", "steps"), table, None,
                     time.perf_counter() - start)


# ----------------------------------------------------------------------------- screening


def strong_rule_scores(x: torch.Tensor, onehot: torch.Tensor, train_mask: torch.Tensor) -> torch.Tensor:
    """float32[G, D]: ||X_S^T (Y_S - mean Y_S)||_2 / |S| per training subset S = row g of train_mask.

    x: float32[n, D]; onehot: float32[n, C]; train_mask: [G, n] (nonzero = row in S). This is the
    norm of the mean cross-entropy gradient of feature d's weight row at W = 0 with the bias at
    the class priors: the group-lasso strong-rule statistic. One GEMM for all subsets.
    """
    mask = (train_mask != 0).float()
    count = mask.sum(1).clamp(min=1.0)
    prior = (mask @ onehot) / count.unsqueeze(1)  # [G, C]
    resid = (onehot.unsqueeze(0) - prior.unsqueeze(1)) * (mask / count.unsqueeze(1)).unsqueeze(2)
    grad = x.t() @ resid.permute(1, 0, 2).reshape(x.shape[0], -1)  # [D, G*C]
    return torch.linalg.vector_norm(grad.view(x.shape[1], *prior.shape), dim=2).t().contiguous()


@dataclass
class _Screen:
    """The candidate pool of a screened group-lasso run."""

    budget: int  # candidates per model
    pool: torch.Tensor  # int64[P], sorted: union of every model's candidates
    x: torch.Tensor  # float32[n, P] = data.x[:, pool]
    col_mask: torch.Tensor  # float32[P, M]: 1 where the pool column is one of model m's candidates


def _screen(data: _Data, train_mask: torch.Tensor, budget: int | None) -> _Screen | None:
    """Each model's top-`budget` columns by strong_rule_scores on its own training rows, or None
    when D <= budget (no screening). Models with the same rows (the lambdas of a fold) share one."""
    dim = data.x.shape[1]
    if budget is None or dim <= budget:
        return None
    subsets, subset_of = torch.unique(train_mask != 0, dim=0, return_inverse=True)
    stat = strong_rule_scores(data.x, data.onehot, subsets)
    top = torch.sort(stat, dim=1, descending=True, stable=True).indices[:, :budget]
    pool = torch.unique(top)
    allowed = torch.zeros(len(subsets), dim, dtype=torch.bool).scatter_(1, top, True)
    col_mask = allowed[:, pool][subset_of].t().float().contiguous()
    return _Screen(budget, pool, data.x.index_select(1, pool), col_mask)


def _keep_first(ranked: torch.Tensor, keep: torch.Tensor, extra: int) -> torch.Tensor:
    """int64[M, K + extra]: the kept columns keep[K] first, then each model's `extra` best ranked
    columns outside them. ranked: int64[M, W] with W >= K + extra, by decreasing relevance."""
    rows = []
    for order in ranked:
        rest = order[~torch.isin(order, keep)][:extra]
        rows.append(torch.cat([keep, rest]))
    return torch.stack(rows)


def _select_and_retrain(data, mask, val_mask, lrs, l21s, steps, batch_size, seed, variants,
                        progress, stage, screen: _Screen | None = None):
    """Group-lasso selection run, then nested unregularized retraining, per lr group.

    variants: {name: (ks ascending, keep int64[K] or None)}; every variant retrains on the same
    ranking (one group-lasso run): head f of a plain variant uses the top ks[f] columns, that of a
    keep variant the K kept columns plus the best ks[f] - K others. Variants with no ks are skipped.
    Yields (variant, models, relevance [Mg, D], heads: list of (weight [Mg, k, C], bias [Mg, C])
    per k, columns int64[Mg, ks[-1]] ranked, accuracy float64[Mg, F] or None). With a screen, the
    group lasso sees only the pool and each model only its candidates; relevance is 0 elsewhere.
    """
    variants = {name: v for name, v in variants.items() if v[0]}
    n, dim = data.x.shape
    x, col_mask = (data.x, None) if screen is None else (screen.x, screen.col_mask)
    width = min(x.shape[1], max(ks[-1] + (0 if keep is None else len(keep))
                                for ks, keep in variants.values()))
    for models, w, _ in _run_wide(x, data.onehot, mask, lrs, l21s, "l21", steps, batch_size,
                                  seed, progress, f"{stage} select steps={steps}", col_mask,
                                  data.dtype):
        scores, ranked = _top_columns(w, width, None if col_mask is None else col_mask[:, models])
        del w
        if screen is not None:
            ranked = screen.pool[ranked]
            scores = torch.zeros(len(models), dim).index_copy_(1, screen.pool, scores)
        lr = lrs[models[0]]
        batches = batch_schedule(n, batch_size, steps, seed)
        for name, (ks, keep) in variants.items():
            k_max = ks[-1]
            columns = (ranked[:, :k_max].contiguous() if keep is None
                       else _keep_first(ranked, keep, k_max - len(keep)))
            chunks = _nested_chunks(np.arange(len(models)), n, k_max)
            for i, chunk in enumerate(chunks):
                weights, biases, logits = _train_nested_group(
                    data.x, data.onehot, mask[models[chunk]], lr, columns[chunk], ks, batches,
                    progress, f"{stage} retrain {name} steps={steps}", i * steps, len(chunks) * steps,
                    data.dtype, 0 if keep is None else len(keep))
                acc = None if val_mask is None else _nested_val_accuracy(
                    logits, data.y, val_mask[models[chunk]])
                del logits
                yield (name, models[chunk], scores[chunk], list(zip(weights, biases)), columns[chunk],
                       acc)


HEAD2TOE_KEEP = "HEAD2TOE+LINEAR"  # HEAD2TOE whose selection always keeps given columns


@_cpu_training_mode()
def fit_head2toe(features, labels, n_classes: int, grid: SearchGrid = SearchGrid.paper(),
                 progress: Progress | None = None) -> FitResult:
    """HEAD2TOE: group-lasso relevance on all D features, keep the top fraction, retrain.

    features: float[n, D] (per-tap pooled, L2-normalized), labels: int[n] in [0, n_classes).
    CV over grid.l21s x lrs x steps x fractions; the best config is refitted on all rows.
    """
    return fit_head2toe_variants(features, labels, n_classes, grid, progress)["HEAD2TOE"]


@_cpu_training_mode()
def fit_head2toe_variants(features, labels, n_classes: int, grid: SearchGrid = SearchGrid.paper(),
                          progress: Progress | None = None,
                          keep: np.ndarray | None = None) -> dict[str, FitResult]:
    """HEAD2TOE and, when `keep` is given, HEAD2TOE+LINEAR from one group-lasso run per CV model.

    features: float[n, D]; keep: int[K] columns (e.g. the pre-logits) that HEAD2TOE+LINEAR always
    keeps, adding the best k_F others by the same relevance ranking (its selection can only add
    to a head on `keep`). This variant is not in the paper; both are cross-validated on the same
    folds, and each gets its own best (F, lambda, lr, steps) and final refit.
    Returns {"HEAD2TOE": FitResult[, "HEAD2TOE+LINEAR": FitResult]}; their fit_seconds are the
    shared total.
    """
    start = time.perf_counter()
    data = _setup(features, labels, n_classes, grid)
    dim = data.x.shape[1]
    models, val_mask = _cv_models(data, grid, grid.l21s)
    train_mask = (~val_mask).float()
    screen = _screen(data, train_mask, grid.max_candidates)
    k_of = {f: _n_selected(dim, f) for f in grid.fractions}
    fractions = [f for f in grid.fractions if screen is None or k_of[f] <= screen.budget]
    if not fractions:
        raise FitError(f"every fraction in SearchGrid.fractions keeps more than max_candidates="
                       f"{grid.max_candidates} of {dim} features; raise max_candidates or add "
                       f"smaller fractions")
    plan = {"HEAD2TOE": (fractions, None)}
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
        for name, idx, _, _, _, acc in _select_and_retrain(
                data, train_mask, val_mask, [m[1] for m in models], [m[0] for m in models],
                steps, _cv_batch_size(grid), grid.seed, variants, progress, "cv", screen):
            for j, m in enumerate(idx):
                l21, lr, _ = models[m]
                for fraction in plan[name][0]:
                    k = k_of[fraction] + extra[name]
                    key = (("l21", l21), ("lr", lr), ("steps", steps), ("fraction", fraction),
                           ("n_features", k))
                    accs[name].setdefault(key, []).append(float(acc[j, ks[name].index(k)]))
    tables = {name: _summarize(accs[name], {"method": name, "penalty": None}) for name in plan}
    best = {name: _best(table) for name, table in tables.items()}
    del screen
    all_rows = torch.ones(1, data.x.shape[0])
    screen = _screen(data, all_rows, grid.max_candidates)
    refits: dict = {}
    # variants whose CV picked the same (lambda, lr, steps) share the final selection run
    for config in dict.fromkeys((b["l21"], b["lr"], b["steps"]) for b in best.values()):
        l21, lr, steps = config
        wanted = {name: ([best[name]["n_features"]], plan[name][1]) for name in plan
                  if (best[name]["l21"], best[name]["lr"], best[name]["steps"]) == config}
        for name, _, scores, heads, columns, _ in _select_and_retrain(
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
        config = _config(best[name], grid, "l21", "lr", "steps", "fraction", "n_features")
        config["screened_to"] = None if screen is None else screen.budget  # candidates per fold
        if extra[name]:
            config["kept_columns"] = extra[name]
        results[name] = FitResult(name, head, config, tables[name],
                                  scores[0].numpy().astype(np.float32), seconds)
    return results
