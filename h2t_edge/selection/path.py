"""HEAD2TOE on a group-lasso path: the default engine (`--solver path`), with `fit_head2toe_variants`' contract.

`fit_head2toe_variants` follows the paper literally: for every CV fold x lr x lambda x steps a
minibatch-Adam group-lasso head ranks the D features, and every top-k set is retrained with Adam.
`fit_head2toe_path` gives the same kind of answer (a group-lasso relevance ranking, top-F heads,
CV over F and lambda) with much less work.

Problem. For each model m (the training rows S_m of a CV fold, or all rows for the refit), with
features X: [n, D] and one-hot labels Y: [n, C]:

    min_{W: [D, C], b: [C]}  (1/|S_m|) sum_{i in S_m} CE(x_i W + b, y_i)  +  lambda * sum_d ||W_d,:||_2,

the objective the Adam heads of `estimators` descend (lambdas are on the scale of grid.l21s). X is
centred on each model's training rows inside the solver (x_i W + b = (x_i - mu) W + (b + mu W)), an
exact change of the unpenalized intercept that conditions the problem far better (on dSprites-
location features at T=512 the curvature bound drops from 49 to 0.43).

Path. lambda_j = lambda_max * ratio^((j+1)/J), j = 0..J-1 (J = `PathSettings.n_lambdas`, ratio =
`lambda_ratio`), lambda_max = max_d ||grad_d at W = 0|| on all rows (the strong-rule statistic of
`screening`: at lambda >= lambda_max, W = 0). Each point is warm-started from the previous one; the
CV folds share every step on one model axis (W: [K, M, C], one GEMM per iteration for all folds).

Solver (one path point). FISTA (Beck & Teboulle 2009) with gradient-based adaptive restart
(O'Donoghue & Candes 2015) per model: group soft-thresholding of the rows of W, the intercept
unpenalized. Steps from the block-diagonal majorizer of the cross-entropy Hessian (the softmax
Hessian is <= I/2 in the logits, and centred X is orthogonal to the intercept column): 1/L_W with
L_W = 1.05 * 0.5 * ||X_S,c||_2^2 / |S| (power iteration on the working set, per model), and 1/0.5
for the intercept. Working sets (as in celer / skglm): every active row plus the rows with the
largest ||grad_d|| at the previous point (the sequential strong-rule statistic), 2x the active
count and at least `ws_min` rows; after a solve one full gradient checks the KKT conditions (a zero
row needs ||grad_d|| <= lambda (1 + kkt_tol)) and the worst violators join (at most doubling the
set). A solve stops when no row's gradient mapping exceeds tol * lambda (every model), or when the
top-k sets for every k the fractions need are unchanged for `patience` checks `check_every`
iterations apart, or at `max_iter`.

Ranking. At path point j the columns go by relevance s_d = ||W_d||; rows that are zero there go by
the point at which they first entered the path (earlier first, among points 0..j), then by
||grad_d|| at point j (the sequential strong-rule statistic: nearest to entering first), then by
index. CV picks (path point, F) together; the refit runs the all-rows path down to the chosen
point and ranks there.

Retraining. Each top-k head (k = max(1, int(D F)), as `n_selected`) minimizes the mean training CE
plus a tiny ridge retrain_l2 / 2 * ||W~||^2 (default 1e-3) on its columns standardized over the
model's training rows (W~_d = s_d W_d, s_d the column's standard deviation there): `retrain_iters`
(default 100) full-batch Nesterov steps with restart from W = 0, steps from the same curvature
bound. Standardizing makes the fixed step budget treat small- and large-scale taps alike, as Adam's
per-coordinate steps do; on dSprites-location it beats the Adam retraining by several points.
Every (fold, path point) model is batched on one bmm axis, and nested heads share their column
blocks (block j feeds heads j..F-1: one bmm per block, as `kernels.train_nested_group`). CV
retrains at every `cv_every`-th path point (always including the last).

Screening. Pools larger than grid.max_candidates are screened per fold by `screen_candidates` (the
strong rule at W = 0, as in `estimators`); a model's rows outside its candidates stay 0.

Deployed cost (with a `TapPlan`, as `train` and `fit` pass one). Every CV row also carries the
estimated deployed latency of its heads (mean over folds; `h2t_edge.core.costs`). At the path point
of the most accurate unbudgeted row, HEAD2TOE also retrains rankings within grid.tap_budgets taps
(`TapPlan.within_budget`: the taps of highest relevance per cost first), and each variant keeps
`choose_cheapest`'s row (grid.choice "cheapest", the default: the least latency within one standard
error of the best CV accuracy) or `choose_best`'s ("accuracy"); grid.latency_budget drops rows above
it first (none left: the cheapest row, which the caller may refuse).

Everything runs in torch on one `device` ("cpu" or "cuda"); grid.lrs, grid.steps, grid.l21s and
grid.batch_size parameterize the Adam engine and are not used here. GEMMs run in float32 only.

Measured (benchmarks/results/path_speed.md, dSprites location, T=512, D=28,296, 2 cores): both
variants in 38 s, the time of the Adam engine with steps=(500,) only (37 s; the paper grid adds
5000 steps, about 10x that), with HEAD2TOE CV 78.2 / test 75.6 % against 67.6 / 65.1 %. The path
takes 9 s (90 to 1000 FISTA iterations per point, working sets of 67 to 1,338 rows), the CV
retraining 27 s. The suite over three seeds against the paper solver: benchmarks/results/
fit_speed.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from h2t_edge.core.errors import FitError
from h2t_edge.core.progress import Progress
from h2t_edge.selection.estimators import HEAD2TOE_KEEP
from h2t_edge.selection.grid import (
    F_STOP_PATIENCE,
    FitResult,
    LinearHead,
    SearchGrid,
    choose_best,
    choose_cheapest,
    cpu_training_mode,
    cv_subset,
    n_selected,
    prepare_cv,
    standard_error,
    summarize_cv,
)
from h2t_edge.selection.screening import screen_candidates, strong_rule_scores
from h2t_edge.selection.taps import TapPlan

_LIP_SAFETY = 1.05  # power iteration approaches the top singular value from below
_POWER_ITERS = 30  # path solves (working sets are small)
_RETRAIN_POWER_ITERS = 20  # retraining: <= 3% low on dSprites-location's widest heads, under the safety
_LB = 0.5  # curvature bound of the mean cross-entropy in the intercept
_TINY = 1e-30
RETRAIN_FORMS = ("auto", "primal", "dual")  # PathSettings.retrain_form


@dataclass(frozen=True)
class PathSettings:
    """Knobs of the path engine (see the module docstring)."""

    n_lambdas: int = 12  # path points below lambda_max
    lambda_ratio: float = 1e-2  # lambda_min / lambda_max
    tol: float = 0.05  # a solve stops when no row's gradient mapping exceeds tol * lambda ...
    patience: int = 3  # ... or when the top-k sets are unchanged for this many checks in a row
    check_every: int = 5  # iterations between top-k checks
    max_iter: int = 1000  # FISTA iterations per solve (per path point and KKT round)
    kkt_tol: float = 0.05  # a zero row violates KKT when ||grad_d|| > lambda * (1 + kkt_tol)
    ws_min: int = 64  # smallest working set
    max_kkt_rounds: int = 10
    cv_every: int = 3  # CV retrains at every cv_every-th path point, the last included
    retrain_iters: int = 100  # Nesterov steps of every retrained head
    retrain_l2: float = 1e-3  # retrain_l2 / 2 * ||W~||^2 on the standardized retrained heads
    gather_bytes: int = 1 << 30  # gathered columns (or dual Gram matrices) per retraining chunk
    # which heads retrain in the dual (kernel) form, where a step costs n^2 instead of n x k: "auto"
    # (those it makes cheaper, `_dual_from`), "primal" (none) or "dual" (all); the iterates are the same
    retrain_form: str = "auto"

    def __post_init__(self) -> None:
        if self.n_lambdas < 1 or not 0.0 < self.lambda_ratio < 1.0:
            raise FitError(f"PathSettings: n_lambdas={self.n_lambdas} must be >= 1 and lambda_ratio="
                           f"{self.lambda_ratio} in (0, 1)")
        counts = ("patience", "check_every", "max_iter", "ws_min", "max_kkt_rounds", "cv_every", "retrain_iters",
                  "gather_bytes")
        if min(getattr(self, name) for name in counts) < 1:
            raise FitError(f"PathSettings: {', '.join(counts)} must be positive")
        if self.tol < 0 or self.kkt_tol < 0 or self.retrain_l2 < 0:
            raise FitError("PathSettings: tol, kkt_tol and retrain_l2 must be >= 0")
        if self.retrain_form not in RETRAIN_FORMS:
            raise FitError(f"PathSettings: retrain_form={self.retrain_form!r}; use one of {list(RETRAIN_FORMS)}")

    def cv_points(self) -> list[int]:
        """The path points whose rankings CV retrains and scores."""
        return [j for j in range(self.n_lambdas) if (self.n_lambdas - 1 - j) % self.cv_every == 0]


DEFAULT_SETTINGS = PathSettings()
_PAPER = SearchGrid.paper()


def _residual(logits: torch.Tensor, onehot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d(weighted CE)/d logits = (softmax(logits) - onehot) * weight, broadcast over [..., C]."""
    return (torch.softmax(logits, dim=-1) - onehot) * weight


# ----------------------------------------------------------------------------- the path


@dataclass
class GroupLassoPath:
    """A group-lasso path of M models over P columns (tensors on the solver's device)."""

    lambdas: list[float]  # [J], decreasing
    norms: torch.Tensor  # float32[J, M, P]: ||W_d|| at each point (0: inactive)
    grad_norms: torch.Tensor  # float32[J, M, P]: ||grad_d|| of the smooth loss at each point
    weight: torch.Tensor  # float32[P, M, C] at the last point
    bias: torch.Tensor  # float32[M, C] at the last point (for the raw, uncentred features)
    iterations: list[int] = field(default_factory=list)  # FISTA iterations per point (all KKT rounds)
    kkt_rounds: list[int] = field(default_factory=list)  # solves per point (1 = no violator)
    working_set: list[int] = field(default_factory=list)  # rows in the last working set per point

    def active(self) -> torch.Tensor:
        """int64[J, M]: nonzero rows per point and model."""
        return (self.norms > 0).sum(2)

    def ranking(self, j: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """int64[M, P]: the columns by decreasing relevance at point j (the module docstring's
        order); columns outside `allowed` (bool[P, M]) come last."""
        norms, grads = self.norms[j], self.grad_norms[j]
        entered = self.norms[:j + 1] > 0  # [j+1, M, P]
        never = torch.full_like(norms, j + 1, dtype=torch.int64)
        first = torch.where(entered.any(0), entered.to(torch.int8).argmax(0), never)  # first point > 0
        if allowed is not None:
            norms = norms.masked_fill(~allowed.t(), -1.0)
        # stable sorts from the last key to the first: gradient norm, entry point, relevance
        order = torch.sort(grads, dim=1, descending=True, stable=True).indices
        order = order.gather(1, torch.sort(first.gather(1, order), dim=1, stable=True).indices)
        return order.gather(1, torch.sort(norms.gather(1, order), dim=1, descending=True, stable=True).indices)


def lambda_max(x: torch.Tensor, onehot: torch.Tensor, train_mask: torch.Tensor) -> float:
    """The smallest lambda at which W = 0 solves every model: max_d ||grad_d at W = 0||."""
    return float(strong_rule_scores(x, onehot, train_mask).max())


def lambda_path(lam_max: float, settings: PathSettings = DEFAULT_SETTINGS) -> list[float]:
    """[J] decreasing: lam_max * ratio^((j+1)/J)."""
    j = settings.n_lambdas
    return [lam_max * settings.lambda_ratio ** ((i + 1) / j) for i in range(j)]


class _Models:
    """M models' training rows over x: [n, P], centred per model (one GEMM serves all models)."""

    def __init__(self, x: torch.Tensor, onehot: torch.Tensor, train_mask: torch.Tensor):
        mask = (train_mask != 0).to(x.dtype)
        self.weight = (mask / mask.sum(1, keepdim=True).clamp(min=1.0)).t().contiguous()  # [n, M]: 1/|S_m| on S_m
        self.mean = self.weight.t() @ x  # [M, P]: column means over each model's training rows
        self.x, self.onehot = x, onehot.unsqueeze(1)  # [n, 1, C]
        self.n_models = mask.shape[0]

    def residual(self, xs: torch.Tensor, mean: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """float32[n, M, C]: d(mean training CE)/d logits for the centred columns xs: [n, K] (their
        means [M, K]), w: [K, M, C] and the centred intercept b: [M, C]."""
        k, m, c = w.shape
        logits = (xs @ w.reshape(k, m * c)).view(-1, m, c) + (b - torch.einsum("mk,kmc->mc", mean, w))
        return _residual(logits, self.onehot, self.weight.unsqueeze(2))

    def gradient(self, xs: torch.Tensor, mean: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
        """(grad_w [K, M, C], grad_b [M, C]) of every model's mean training CE."""
        k, m, c = w.shape
        r = self.residual(xs, mean, w, b)
        r_sum = r.sum(0)
        return (xs.t() @ r.view(-1, m * c)).view(k, m, c) - mean.t().unsqueeze(2) * r_sum.unsqueeze(0), r_sum

    def grad_norms(self, r: torch.Tensor) -> torch.Tensor:
        """float32[M, P]: ||grad_d|| of every column of x from the residual r: [n, M, C]."""
        n, m, c = r.shape
        g = (self.x.t() @ r.reshape(n, m * c)).view(-1, m, c) - self.mean.t().unsqueeze(2) * r.sum(0).unsqueeze(0)
        return torch.linalg.vector_norm(g, dim=2).t()

    def curvature(self, xs: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """float32[M]: L_W = safety * 0.5 * ||(xs - mean_m)_S||_2^2 / |S| per model (power iteration)."""
        k = xs.shape[1]
        if k == 0:
            return torch.ones(self.n_models, device=xs.device)
        gen = torch.Generator(device=xs.device).manual_seed(0)
        v = torch.randn(k, self.n_models, generator=gen, device=xs.device, dtype=xs.dtype)
        sigma2 = torch.zeros(self.n_models, device=xs.device, dtype=xs.dtype)
        for _ in range(_POWER_ITERS):
            v = v / torch.linalg.vector_norm(v, dim=0).clamp(min=_TINY)
            u = (xs @ v - (mean * v.t()).sum(1)) * self.weight  # [n, M]
            v = xs.t() @ u - mean.t() * u.sum(0)
            sigma2 = torch.linalg.vector_norm(v, dim=0)
        return (0.5 * _LIP_SAFETY * sigma2).clamp(min=1e-12)


def _topk_signature(ks: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """check(w [K, M, C]) -> bool[M, K, F']: whether each row is in each model's top-k, k < K."""

    def check(w: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(w, dim=2).t()  # [M, K]
        k_all = norms.shape[1]
        order = torch.sort(norms, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(k_all, device=w.device).expand_as(order))
        inside = [rank < k for k in ks if k < k_all]
        return torch.stack(inside, dim=2) if inside else torch.zeros(0, dtype=torch.bool, device=w.device)

    return check


def _fista(models: _Models, xs: torch.Tensor, mean: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
           lam: float, allowed: torch.Tensor | None, settings: PathSettings,
           check: Callable | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One group-lasso solve on a working set, every model at once (the module docstring's solver).

    xs: [n, K] raw columns, mean: [M, K] their per-model training means, w: [K, M, C] and the
    centred intercept b: [M, C] (the warm start), allowed: float32[K, M, 1] or None (0: the row
    stays 0 for that model). Returns (w, b, iterations)."""
    m = w.shape[1]
    lw = models.curvature(xs, mean).view(1, m, 1)
    threshold = (lam / lw).view(1, m)
    z_w, z_b = w, b
    t = torch.ones(m, dtype=b.dtype, device=b.device)
    last, stable = None, 0
    for it in range(1, settings.max_iter + 1):
        g_w, g_b = models.gradient(xs, mean, z_w, z_b)
        v = z_w - g_w / lw
        norms = torch.linalg.vector_norm(v, dim=2)  # group soft-thresholding of the rows
        w_new = v * (1.0 - threshold / norms.clamp(min=_TINY)).clamp_(min=0.0).unsqueeze(2)
        if allowed is not None:
            w_new = w_new * allowed
        b_new = z_b - g_b / _LB
        d_w, d_b = w_new - w, b_new - b
        map_w, map_b = lw * (z_w - w_new), _LB * (z_b - b_new)  # the gradient mapping at z
        # restart the models whose step goes against their momentum: <G(z), x+ - x> > 0
        restart = ((map_w * d_w).sum((0, 2)) + (map_b * d_b).sum(1)) > 0
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        beta = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_new)
        t = torch.where(restart, torch.ones_like(t), t_new)
        z_w, z_b = w_new + beta.view(1, m, 1) * d_w, b_new + beta.unsqueeze(1) * d_b
        w, b = w_new, b_new
        worst = torch.linalg.vector_norm(map_b, dim=1)
        if map_w.numel():
            worst = torch.maximum(worst, torch.linalg.vector_norm(map_w, dim=2).amax(0))
        if bool((worst <= settings.tol * lam).all()):
            return w, b, it
        if check is not None and it % settings.check_every == 0:
            now = check(w)
            stable = stable + 1 if last is not None and torch.equal(now, last) else 0
            last = now
            if stable >= settings.patience:
                return w, b, it
    return w, b, settings.max_iter


def group_lasso_path(x: torch.Tensor, onehot: torch.Tensor, train_mask: torch.Tensor, lambdas: Sequence[float],
                     *, allowed: torch.Tensor | None = None, ks: Sequence[int] = (),
                     settings: PathSettings = DEFAULT_SETTINGS, progress: Progress | None = None,
                     stage: str = "path") -> GroupLassoPath:
    """Solve M multinomial group lassos along `lambdas` (decreasing), warm-started, on x's device.

    x: float32[n, P]; onehot: float32[n, C]; train_mask: [M, n] (nonzero: a model's training row);
    allowed: bool[P, M] or None, the columns each model may use (screening; the others stay 0);
    ks: the top-k sizes whose sets may stop a solve early (empty: the gradient-mapping test only).
    """
    n, p = x.shape
    c = onehot.shape[1]
    models = _Models(x, onehot, train_mask)
    m, dev = models.n_models, x.device
    b = torch.log((models.weight.t() @ onehot).clamp(min=1e-12))  # [M, C]: the optimal intercept at W = 0
    w = torch.zeros(p, m, c, device=dev)
    allow_t = None if allowed is None else allowed.t()  # [M, P]
    usable = torch.ones(p, dtype=torch.bool, device=dev) if allow_t is None else allow_t.any(0)

    def grad_norms_of(r: torch.Tensor) -> torch.Tensor:
        g = models.grad_norms(r)
        return g if allow_t is None else g * allow_t

    grad_norms = grad_norms_of(_residual(b.expand(n, m, c), models.onehot, models.weight.unsqueeze(2)))
    j_count = len(lambdas)
    path = GroupLassoPath([float(lam) for lam in lambdas], torch.zeros(j_count, m, p, device=dev),
                          torch.zeros(j_count, m, p, device=dev), w, b)
    row_norms = torch.zeros(m, p, device=dev)
    check = _topk_signature(sorted(set(ks))) if ks else None
    for j, lam in enumerate(path.lambdas):
        # working set: the active rows, then those nearest to entering, 2x the active count (>= ws_min)
        active = (row_norms > 0).any(0)
        score = grad_norms.amax(0).masked_fill(active, float("inf")).masked_fill(~usable, -1.0)
        size = min(int(usable.sum()), max(settings.ws_min, 2 * int(active.sum())))
        ws = torch.sort(torch.topk(score, size).indices).values
        iters = rounds = 0
        while True:
            rounds += 1
            xs, mean = x.index_select(1, ws), models.mean.index_select(1, ws)
            mask = None if allowed is None else allowed.index_select(0, ws).unsqueeze(2).to(x.dtype)
            w_ws, b, it = _fista(models, xs, mean, w.index_select(0, ws), b, lam, mask, settings, check)
            iters += it
            w.index_copy_(0, ws, w_ws)
            grad_norms = grad_norms_of(models.residual(xs, mean, w_ws, b))
            outside = torch.ones(p, dtype=torch.bool, device=dev)
            outside[ws] = False
            excess = torch.where(outside, grad_norms.amax(0), torch.zeros_like(score))
            n_violators = int((excess > lam * (1.0 + settings.kkt_tol)).sum())
            if n_violators == 0 or rounds >= settings.max_kkt_rounds:
                break
            add = torch.topk(excess, min(n_violators, int(ws.numel()) or settings.ws_min)).indices  # the worst
            ws = torch.sort(torch.cat([ws, add])).values
        row_norms = torch.linalg.vector_norm(w, dim=2).t()
        path.norms[j], path.grad_norms[j] = row_norms, grad_norms
        path.iterations.append(iters)
        path.kkt_rounds.append(rounds)
        path.working_set.append(int(ws.numel()))
        if progress is not None:
            progress(stage, j + 1, j_count)
    path.weight = w
    path.bias = b - torch.einsum("mp,pmc->mc", models.mean, w)
    return path


def group_lasso_objective(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lam: float) -> float:
    """Mean CE of x: [n, D] @ w: [D, C] + b: [C] against labels y: [n], plus lam * sum_d ||w_d||."""
    ce = torch.nn.functional.cross_entropy(x @ w + b, y)
    return float(ce + lam * torch.linalg.vector_norm(w, dim=1).sum())


# ----------------------------------------------------------------------------- retraining

def retrain_heads(x: torch.Tensor, onehot: torch.Tensor, train_mask: torch.Tensor, columns: torch.Tensor,
                  ks: Sequence[int], settings: PathSettings = DEFAULT_SETTINGS,
                  val_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  progress: Progress | None = None, stage: str = "retrain", *, weights: bool = True,
                  ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, torch.Tensor | None]:
    """Heads on the column prefixes columns[r, :k] for every k in ks and every model r.

    x: float32[n, D]; onehot: float32[n, C]; train_mask: [R, n]; columns: int64[R, >= ks[-1]];
    ks: strictly increasing. Each head minimizes its model's mean training CE + retrain_l2 / 2 *
    ||W~||^2 on its columns standardized over the model's training rows (W~_d = s_d W_d, s_d the
    column's standard deviation there) by `retrain_iters` full-batch Nesterov steps with restart
    from W = 0 (`_nested_agd`). The narrow heads run on their columns (the primal form); the heads
    for which it is cheaper run in the dual form (`_dual_agd`: the same iterates on n x n Gram
    matrices, `_dual_from`). Models are batched on bmm in chunks of about `settings.gather_bytes`
    of gathered columns and Gram matrices.
    Returns per k: (weight float32[R, k, C], bias float32[R, C]) for the raw features (None with
    weights=False), and, when val_mask [R, n] and labels int64[n] are given, accuracy
    float64[R, F] on each model's val rows.
    """
    ks = [int(k) for k in ks]
    if ks[0] < 1 or any(b <= a for a, b in itertools.pairwise(ks)):
        raise FitError(f"internal: retraining sizes must be positive and strictly increasing, got {ks}")
    n, c = x.shape[0], onehot.shape[1]
    r_all, n_heads = columns.shape[0], len(ks)
    dev = x.device
    split = _dual_from(n, ks, c, settings)  # heads ks[split:] run in the dual form
    per_model = max(2 * n * (ks[split - 1] if split else 0), _Grams.elements_per_model(n, n_heads - split)) * 4
    per_chunk = max(1, settings.gather_bytes // per_model)
    out_w = [torch.empty(r_all, k, c, device=dev) for k in ks] if weights else None
    biases = torch.empty(r_all, n_heads, c, device=dev)
    acc = None if val_mask is None else torch.empty(r_all, n_heads, dtype=torch.float64, device=dev)
    chunks = range(0, r_all, per_chunk)
    for done, start in enumerate(chunks):
        rows = slice(start, min(r_all, start + per_chunk))
        mask = (train_mask[rows] != 0).to(x.dtype)
        tw = (mask / mask.sum(1, keepdim=True).clamp(min=1.0)).unsqueeze(2)  # [R, n, 1]: 1/|S| on S
        parts = []  # (first head, logits [R, n, F', C], raw weights per head or None, raw bias [R, F', C])
        if split:
            blocks = _Blocks(x, columns[rows], ks[:split], tw)
            w, b = _nested_agd(blocks, onehot, tw, settings)  # standardized columns, centred intercept
            logits = blocks.logits(w, b) if acc is not None else None
            raw_w = [torch.empty(w[0].shape[0], k, c, device=dev) for k in ks[:split]] if weights else None
            for j, (lo, hi) in enumerate(itertools.pairwise(blocks.edges) if weights else ()):  # the centring -> bias
                raw = w[j] / blocks.scale[j].transpose(1, 2).unsqueeze(3)  # [R, dk, F - j, C]
                b[:, j:] -= torch.einsum("rd,rdfc->rfc", blocks.mean[j].squeeze(1), raw)
                for f in range(j, split):
                    raw_w[f][:, lo:hi] = raw[:, :, f - j]
            parts.append((0, logits, raw_w, b))
            del blocks
        if split < n_heads:
            grams = _Grams(x, columns[rows], ks[split:], tw)
            a, b, kernel_logits = _dual_agd(grams, onehot, tw, settings)
            raw_w, b = grams.raw_heads(x, columns[rows], a, b, weights)
            parts.append((split, kernel_logits.transpose(1, 2), raw_w, b))
            del grams
        for first, logits, raw_w, b in parts:
            heads = range(first, first + b.shape[1])
            biases[rows, first:first + b.shape[1]] = b
            for f in heads if weights else ():
                out_w[f][rows] = raw_w[f - first]
            if acc is not None:
                pred = logits.argmax(-1)  # [R, n, F']
                vm = val_mask[rows].to(torch.float64).unsqueeze(2)
                hit = (pred == labels.view(1, -1, 1)).to(torch.float64)
                acc[rows, first:first + b.shape[1]] = (hit * vm).sum(1) / vm.sum(1).clamp(min=1.0)
        if progress is not None:
            progress(stage, done + 1, len(chunks))
    heads = [(out_w[f], biases[:, f]) for f in range(n_heads)] if weights else None
    return heads, acc


def retrain_cv_along_f(x: torch.Tensor, onehot: torch.Tensor, train_mask: torch.Tensor, val_mask: torch.Tensor,
                       labels: torch.Tensor, columns: torch.Tensor, ks: Sequence[int], folds: int,
                       margin: float | None, settings: PathSettings = DEFAULT_SETTINGS,
                       progress: Progress | None = None, stage: str = "retrain cv") -> torch.Tensor:
    """Validation accuracy float64[R, F'] of the CV heads on columns[r, :k], k in ks (ascending), for
    the first F' <= len(ks) sizes: retraining along F stops once F_STOP_PATIENCE sizes in a row
    score more than `margin` standard errors (of the best so far) below the best so far (None:
    every size, as one nested `retrain_heads` call). Sizes run in nested groups (`_f_groups`); a
    group that runs past the stop gives the same result (its extra sizes are dropped).

    Rows r = point * folds + fold (the CV models of one or more path points); a size's score is its
    best point's mean over folds. Heads are independent (own curvature, momentum and start), so a
    size retrained alone gets the head the nested call would give it (up to float summation order).
    The largest heads cost the most and, once a head fits every training row, score worst: they are
    the ones this skips."""
    if margin is None or len(ks) == 1:
        return retrain_heads(x, onehot, train_mask, columns, ks, settings, val_mask, labels, progress, stage,
                             weights=False)[1]
    parts, best, below, ran = [], None, 0, 0
    for group in _f_groups(len(ks), F_STOP_PATIENCE):
        sizes = [ks[i] for i in group]
        parts.append(retrain_heads(x, onehot, train_mask, columns[:, :sizes[-1]], sizes, settings, val_mask,
                                   labels, weights=False)[1])
        for i in range(parts[-1].shape[1]):
            ran += 1
            if progress is not None:  # one tick per size; a stop completes the stage
                progress(stage, ran, len(ks))
            per_point = parts[-1][:, i].view(-1, folds).cpu()
            mean = per_point.mean(1)
            top = int(mean.argmax())
            score = float(mean[top])
            se = standard_error({"val_acc_std": float(per_point[top].std(unbiased=False))}, folds)  # as CV rows
            if best is None or score > best[0]:
                best, below = (score, se), 0
            elif score < best[0] - margin * best[1] - 1e-9:
                below += 1
            else:
                below = 0
            if below >= F_STOP_PATIENCE:
                if progress is not None:
                    progress(stage, len(ks), len(ks))
                return torch.cat(parts, dim=1)[:, :ran]  # a size the group ran past the stop is dropped
    return torch.cat(parts, dim=1)


def _f_groups(n: int, size: int) -> list[range]:
    """The sizes 0..n-1 in consecutive groups of `size`, counted from the widest (the first group
    takes the remainder): each group is one nested `retrain_heads` call. A nested call reads each
    column once per step for all its heads, so pairing the widest sizes costs about 1.3x the
    widest head where one call per size costs about 1.8x (sizes about 2x apart), and a stop still
    skips every later group."""
    first = n % size or size
    return [range(0, first)] + [range(lo, lo + size) for lo in range(first, n, size)]


def _gathered(x: torch.Tensor, columns: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """float32[R, n, hi - lo]: each model's columns[r, lo:hi] of x [n, D]."""
    block = torch.empty(columns.shape[0], x.shape[0], hi - lo, device=x.device, dtype=x.dtype)
    for i in range(columns.shape[0]):
        torch.index_select(x, 1, columns[i, lo:hi], out=block[i])
    return block


def _standardized(block: torch.Tensor, tw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block centred and scaled in place over each model's training rows, mean [R, 1, dk], scale
    [R, 1, dk]) for weights tw [R, n, 1] summing to 1 per model; a column constant there gets scale 1."""
    mean = torch.bmm(tw.transpose(1, 2), block)
    block -= mean
    scale = torch.bmm(tw.transpose(1, 2), block * block).sqrt_()
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    block /= scale
    return block, mean, scale


class _Blocks:
    """The standardized columns of R models' nested heads, in blocks that the heads share.

    Block j = columns[:, ks[j-1]:ks[j]] ([R, n, dk], with a contiguous transpose for the backward
    bmm, 2x faster than a transposed view on CPU) feeds heads j..F-1, so one bmm per block and
    direction serves every head, as in `kernels.train_nested_group`. Each column is centred and
    scaled over the model's training rows (weights tw: [R, n, 1], summing to 1 per model); a
    column constant there gets scale 1 (its weight stays 0)."""

    def __init__(self, x: torch.Tensor, columns: torch.Tensor, ks: list[int], tw: torch.Tensor):
        self.edges = [0, *ks]
        self.n_heads = len(ks)
        self.x, self.xt, self.mean, self.scale = [], [], [], []
        for lo, hi in itertools.pairwise(self.edges):
            block, mean, scale = _standardized(_gathered(x, columns, lo, hi), tw)
            self.x.append(block)
            self.xt.append(block.transpose(1, 2).contiguous())
            self.mean.append(mean)
            self.scale.append(scale)

    def logits(self, w: list[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
        """float32[R, n, F, C] of every head: w[j]: [R, dk, F - j, C] (block j's rows of heads j..F-1),
        b: [R, F, C]; also used with one vector per head for C (the power iteration)."""
        r, n = self.x[0].shape[:2]
        out = b.unsqueeze(1).expand(r, n, *b.shape[1:]).clone()
        for j, (xb, wj) in enumerate(zip(self.x, w)):
            out[:, :, j:] += torch.bmm(xb, wj.reshape(r, xb.shape[2], -1)).view(r, n, *wj.shape[2:])
        return out

    def backward(self, res: torch.Tensor) -> list[torch.Tensor]:
        """Per block j: X_j^T res[:, :, j:] as [R, dk, F - j, C'] for res: [R, n, F, C']."""
        r, n = res.shape[:2]
        return [torch.bmm(xt, res[:, :, j:].reshape(r, n, -1)).view(r, xt.shape[1], self.n_heads - j, -1)
                for j, xt in enumerate(self.xt)]


def _per_head(parts: list[torch.Tensor], n_heads: int) -> torch.Tensor:
    """float32[R, F]: sum over the blocks of each head of parts[j]: [R, F - j] (block j feeds heads j..)."""
    out = torch.zeros(parts[0].shape[0], n_heads, device=parts[0].device)
    for j, part in enumerate(parts):
        out[:, j:] += part
    return out


def _nested_curvature(blocks: _Blocks, tw: torch.Tensor) -> torch.Tensor:
    """float32[R, F]: safety * 0.5 * top eigenvalue of X_f^T diag(tw) X_f for every head f (power
    iteration for every head at once, `_RETRAIN_POWER_ITERS` steps)."""
    r, n_heads = blocks.x[0].shape[0], blocks.n_heads
    # start from all-ones: a head's start (and so its estimate) does not depend on the other heads
    v = [torch.ones(r, xb.shape[2], n_heads - j, 1, device=tw.device, dtype=xb.dtype) for j, xb in enumerate(blocks.x)]
    zero = torch.zeros(r, n_heads, 1, device=tw.device)
    sigma = zero.squeeze(2)
    for _ in range(_RETRAIN_POWER_ITERS):
        norm = _per_head([(vj * vj).sum((1, 3)) for vj in v], n_heads).sqrt_().clamp_(min=_TINY)
        v = [vj / norm[:, j:].view(r, 1, -1, 1) for j, vj in enumerate(v)]
        v = blocks.backward(blocks.logits(v, zero) * tw.unsqueeze(3))
        sigma = _per_head([(vj * vj).sum((1, 3)) for vj in v], n_heads).sqrt_()
    return 0.5 * _LIP_SAFETY * sigma


def _nested_agd(blocks: _Blocks, onehot: torch.Tensor, tw: torch.Tensor, settings: PathSettings):
    """Nesterov-accelerated gradient with restart for every nested head at once, `retrain_iters` steps.

    Minimizes sum_i tw_ri CE(logits_rfi, y_i) + retrain_l2 / 2 * ||W_rf||^2 for each model r and
    head f from W = 0 and the log-prior intercept, one momentum per (model, head); steps 1 / (L_f +
    retrain_l2) with L_f from `_nested_curvature`, 1 / 0.5 for the intercept.
    Returns (w: per block [R, dk, F - j, C], b: [R, F, C])."""
    r, n, n_heads = blocks.x[0].shape[0], blocks.x[0].shape[1], blocks.n_heads
    c, l2 = onehot.shape[1], settings.retrain_l2
    lw = _nested_curvature(blocks, tw).clamp_(min=1e-12) + l2  # [R, F]
    steps = [(1.0 / lw[:, j:]).view(r, 1, -1, 1) for j in range(n_heads)]
    b = torch.log((tw * onehot).sum(1).clamp(min=1e-12)).unsqueeze(1).repeat(1, n_heads, 1)  # [R, F, C]
    w = [torch.zeros(r, xb.shape[2], n_heads - j, c, device=tw.device) for j, xb in enumerate(blocks.x)]
    z_w, z_b = w, b
    t = torch.ones(r, n_heads, device=tw.device)
    target, weight = onehot.view(1, n, 1, c), tw.unsqueeze(3)
    for _ in range(settings.retrain_iters):
        res = _residual(blocks.logits(z_w, z_b), target, weight)  # [R, n, F, C]
        w_new = [zj - sj * (gj + l2 * zj) for zj, sj, gj in zip(z_w, steps, blocks.backward(res))]
        b_new = z_b - res.sum(1) / _LB
        # restart the (model, head) pairs whose step goes against their momentum: <G(z), x+ - x> > 0
        dot = _LB * ((z_b - b_new) * (b_new - b)).sum(2)
        dot += _per_head([((zj - wn) * (wn - wo)).sum((1, 3)) for zj, wn, wo in zip(z_w, w_new, w)], n_heads) * lw
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        beta = torch.where(dot > 0, torch.zeros_like(t), (t - 1.0) / t_new)
        t = torch.where(dot > 0, torch.ones_like(t), t_new)
        z_w = [wn + beta[:, j:].view(r, 1, -1, 1) * (wn - wo) for j, (wn, wo) in enumerate(zip(w_new, w))]
        z_b = b_new + beta.unsqueeze(2) * (b_new - b)
        w, b = w_new, b_new
    return w, b


def _dual_from(n: int, ks: Sequence[int], c: int, settings: PathSettings) -> int:
    """The first head that retrains in the dual form (len(ks): none), by estimated flops per model.

    A primal head of k columns costs about 4 n k per class per step (logits and gradient), a dual
    head 2 n^2 (one Gram product), plus, once for the dual heads together, 2 n^2 k_max to build
    their nested Gram matrices: the dual pays for heads wider than a few hundred columns at n in the
    low thousands, where a head of 0.5-20% of a large pool reads every column 100 times in the
    primal. The dual heads' Gram matrices must fit in `settings.gather_bytes` for one model."""
    if settings.retrain_form != "auto":
        return 0 if settings.retrain_form == "dual" else len(ks)
    per_step = settings.retrain_iters * c + _RETRAIN_POWER_ITERS  # GEMM columns over the steps
    primal = [4 * n * k * per_step for k in ks]

    def cost(s: int) -> float:
        dual = 0 if s == len(ks) else 2 * n * n * (ks[-1] + (len(ks) - s) * per_step)
        return sum(primal[:s]) + dual

    fits = [s for s in range(len(ks) + 1) if 4 * _Grams.elements_per_model(n, len(ks) - s) <= settings.gather_bytes]
    return min(fits, key=lambda s: (cost(s), -s))


class _Grams:
    """The dual form of R models' nested heads: per head f, K_f = X~ X~^T over the head's columns
    (standardized over the model's training rows, as `_Blocks`), float32[R, F, n, n], built by
    streaming column blocks; and X~ 1, the start of the power iteration.

    With W = X~^T A (A: [n, C], zero off the training rows), a primal step W - s (X~^T G + l2 W)
    on the gradient X~^T G is the step A - s (G + l2 A): a head of k >> n columns then costs n^2
    per class and step instead of n k (`_dual_agd`)."""

    def __init__(self, x: torch.Tensor, columns: torch.Tensor, ks: list[int], tw: torch.Tensor):
        r, n = columns.shape[0], x.shape[0]
        self.ks, self.edges = ks, _Grams._edges(ks, r, n)
        self.gram = torch.empty(r, len(ks), n, n, device=x.device, dtype=x.dtype)
        self.row_sums = torch.empty(r, len(ks), n, device=x.device, dtype=x.dtype)
        self.mean = torch.empty(r, ks[-1], device=x.device, dtype=x.dtype)
        self.scale = torch.empty(r, ks[-1], device=x.device, dtype=x.dtype)
        gram = torch.zeros(r, n, n, device=x.device, dtype=x.dtype)
        row_sums = torch.zeros(r, n, device=x.device, dtype=x.dtype)
        for lo, hi in self.edges:
            block, mean, scale = _standardized(_gathered(x, columns, lo, hi), tw)
            self.mean[:, lo:hi], self.scale[:, lo:hi] = mean.squeeze(1), scale.squeeze(1)
            gram.baddbmm_(block, block.transpose(1, 2))
            row_sums += block.sum(2)
            if hi in ks:
                f = ks.index(hi)
                self.gram[:, f], self.row_sums[:, f] = gram, row_sums
        del gram

    @staticmethod
    def elements_per_model(n: int, n_heads: int) -> int:
        """float32 elements per model: the Gram matrices, the running sum and a few [n, n] temporaries."""
        return (n_heads + 2) * n * n if n_heads else 0

    @staticmethod
    def _edges(ks: list[int], r: int, n: int) -> list[tuple[int, int]]:
        """Column blocks of at most ~64 MiB for R models, split at every head's edge."""
        width = max(64, (64 << 20) // (4 * max(r * n, 1)))
        out = []
        for lo, hi in itertools.pairwise([0, *ks]):
            out += [(a, min(hi, a + width)) for a in range(lo, hi, width)]
        return out

    def raw_heads(self, x: torch.Tensor, columns: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: bool,
                  ) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        """(per head float32[R, k, C] raw weights W = (X~^T A) / scale, or None without `weights`;
        the raw bias b - mean . W [R, F, C]) from the dual coefficients a: [R, F, n, C]."""
        if not weights:  # the accuracy only: the centred intercept is what the logits used
            return None, b
        r, c = a.shape[0], a.shape[3]
        out = [torch.empty(r, k, c, device=a.device, dtype=a.dtype) for k in self.ks]
        b = b.clone()
        for lo, hi in self.edges:
            mean, scale = self.mean[:, lo:hi].unsqueeze(1), self.scale[:, lo:hi].unsqueeze(1)
            block = (_gathered(x, columns, lo, hi) - mean) / scale
            first = next(f for f, k in enumerate(self.ks) if k >= hi)  # the heads that hold this block
            for f in range(first, len(self.ks)):
                raw = torch.bmm(block.transpose(1, 2), a[:, f]) / self.scale[:, lo:hi].unsqueeze(2)  # [R, dk, C]
                out[f][:, lo:hi] = raw
                b[:, f] -= torch.einsum("rd,rdc->rc", self.mean[:, lo:hi], raw)
        return out, b


def _dual_curvature(grams: _Grams, tw: torch.Tensor) -> torch.Tensor:
    """float32[R, F]: `_nested_curvature`'s estimate, on the Gram matrices. Its iterates are
    v_t = X~^T u_t: v_1 = X~^T (tw * X~ 1 / sqrt(k)), u_{t+1} = tw * K u_t / ||v_t||, with
    ||v_t||^2 = u_t^T K u_t, so it is the same estimate (the same start, the same steps)."""
    k = torch.tensor(grams.ks, device=tw.device, dtype=tw.dtype).view(1, -1, 1)
    weight = tw.transpose(1, 2)  # [R, 1, n]
    u = weight * grams.row_sums / k.sqrt()
    for _ in range(_RETRAIN_POWER_ITERS - 1):
        ku = torch.matmul(grams.gram, u.unsqueeze(3)).squeeze(3)
        u = weight * ku / (u * ku).sum(2, keepdim=True).clamp_(min=0.0).sqrt_().clamp_(min=_TINY)
    ku = torch.matmul(grams.gram, u.unsqueeze(3)).squeeze(3)
    return 0.5 * _LIP_SAFETY * (u * ku).sum(2).clamp_(min=0.0).sqrt_()


def _dual_agd(grams: _Grams, onehot: torch.Tensor, tw: torch.Tensor, settings: PathSettings):
    """`_nested_agd` in the dual form: the same steps, restarts and result, W = X~^T A.

    Keeps A and K A for the iterate and the extrapolated point; one Gram product K G per step
    (K A_new = K Z - s (K G + l2 K Z)), and the restart test <Z - A_new, K (A_new - A)>.
    Returns (a: [R, F, n, C], b: [R, F, C] centred intercepts, logits: [R, F, n, C])."""
    gram = grams.gram
    r, n_heads, n = gram.shape[:3]
    c, l2 = onehot.shape[1], settings.retrain_l2
    lw = _dual_curvature(grams, tw).clamp_(min=1e-12) + l2  # [R, F]
    step = (1.0 / lw).view(r, n_heads, 1, 1)
    b = torch.log((tw * onehot).sum(1).clamp(min=1e-12)).unsqueeze(1).repeat(1, n_heads, 1)  # [R, F, C]
    a = torch.zeros(r, n_heads, n, c, device=tw.device, dtype=gram.dtype)
    ka = torch.zeros_like(a)
    z_a, kz, z_b = a, ka, b
    t = torch.ones(r, n_heads, device=tw.device)
    target, weight = onehot.view(1, 1, n, c), tw.view(r, 1, n, 1)
    for _ in range(settings.retrain_iters):
        res = _residual(kz + z_b.unsqueeze(2), target, weight)  # [R, F, n, C]
        a_new = z_a - step * (res + l2 * z_a)
        ka_new = kz - step * (torch.matmul(gram, res) + l2 * kz)
        b_new = z_b - res.sum(2) / _LB
        dot = _LB * ((z_b - b_new) * (b_new - b)).sum(2) + lw * ((z_a - a_new) * (ka_new - ka)).sum((2, 3))
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        beta = torch.where(dot > 0, torch.zeros_like(t), (t - 1.0) / t_new)
        t = torch.where(dot > 0, torch.ones_like(t), t_new)
        beta_w = beta.view(r, n_heads, 1, 1)
        z_a, kz = a_new + beta_w * (a_new - a), ka_new + beta_w * (ka_new - ka)
        z_b = b_new + beta.unsqueeze(2) * (b_new - b)
        a, ka, b = a_new, ka_new, b_new
    return a, b, ka + b.unsqueeze(2)


# ----------------------------------------------------------------------------- the estimator


def _with_keep(ranked: torch.Tensor, keep: torch.Tensor, extra: int) -> torch.Tensor:
    """int64[M, K + extra]: keep[K] first, then each row's first `extra` ranked columns not in keep.
    ranked: int64[M, W], W >= K + extra."""
    kept = torch.isin(ranked, keep).to(torch.int8)
    position = torch.sort(kept, dim=1, stable=True).indices[:, :extra]  # not-kept columns, in ranked order
    return torch.cat([keep.expand(ranked.shape[0], -1), ranked.gather(1, position)], dim=1)


def _path_key(x: torch.Tensor, train_mask: torch.Tensor, lambdas: Sequence[float], ks: Sequence[int],
              settings: PathSettings, stage: str) -> tuple:
    """What a path depends on: its matrix (shape and float64 column sums), the models' training
    rows, the lambdas, the top-k sizes of its stopping check and the solver settings (not
    cv_every, which only picks the points CV retrains)."""
    sums = torch.sum(x, 0, dtype=torch.float64).cpu().numpy().tobytes()
    rows = train_mask.to(torch.uint8).cpu().numpy().tobytes()
    solver = dataclasses.replace(settings, cv_every=1)
    return (stage, tuple(x.shape), hashlib.blake2b(sums + rows, digest_size=16).hexdigest(), tuple(lambdas),
            tuple(ks), solver)


@cpu_training_mode()
def fit_head2toe_path(features, labels, n_classes: int, grid: SearchGrid = _PAPER,
                      progress: Progress | None = None, keep: np.ndarray | None = None, *,
                      device: str | torch.device = "cpu", settings: PathSettings = DEFAULT_SETTINGS,
                      stats: dict | None = None, taps: TapPlan | None = None, rung: bool = False,
                      n_columns: int | None = None, memo: dict | None = None) -> dict[str, FitResult]:
    """HEAD2TOE (and HEAD2TOE+LINEAR when `keep` is given) from group-lasso paths, with the contract
    and return shape of `fit_head2toe_variants` (module docstring: the method).

    features: float[n, D]; labels: int[n] in [0, n_classes); keep: int[K] columns that
    HEAD2TOE+LINEAR always keeps, adding the best k_F others by the same ranking. CV over (path
    point, F) on grid.folds stratified folds; of the grid, fractions, folds, seed and
    max_candidates are used. device: where every tensor lives ("cpu", "cuda", ...).
    stats: a dict to fill with the path's lambdas, iterations, KKT rounds, working-set and active
    sizes per point (CV and refit), and the seconds of each stage.
    taps: the columns' taps and costs (`TapPlan`). With it, every CV row carries `latency` (the
    estimated deployed latency / backbone, mean over folds), HEAD2TOE also CVs rankings within
    grid.tap_budgets taps (rows with `taps` = B; module `h2t_edge.selection.taps`), and with
    grid.choice "cheapest" each variant keeps its cheapest row within one standard error of its
    best (`choose_cheapest`).
    rung: a successive-halving rung (`SearchGrid.halving`): `grid.rung()`, CV at the last path point
    only, HEAD2TOE only (keep is ignored) and no refit: the result's head and scores are None, its
    config the best CV row's.
    n_columns: what the fractions count against when features are a screened pool of a larger
    matrix (`estimators._streamed`; None: D).
    memo: a dict the caller keeps for one feature matrix: the CV path is left in it, and a later
    call with the same CV rows, folds, pool and path (`_path_key`: shapes, column sums, lambdas,
    top-k sizes, settings) takes it from there instead of solving it again. A rung solves its path
    with the full grid's top-k sizes, so the full fit after it reuses the rung's path.
    Returns {"HEAD2TOE": FitResult[, "HEAD2TOE+LINEAR": FitResult]}; fit_seconds is the shared
    total. CV rows and configs carry l21 (the path point's lambda), fraction and n_features, with
    lr and steps None (this engine has neither); configs add engine="path" and its settings.
    """
    start = time.perf_counter()
    all_fractions = grid.fractions  # the path's top-k check serves every size, also in a rung (`memo`)
    if rung:
        grid, keep = grid.rung(), None
        settings = dataclasses.replace(settings, cv_every=settings.n_lambdas)
    if grid.precision != "fp32":
        raise FitError(f"the path engine computes in fp32; SearchGrid.precision={grid.precision!r} is for "
                       f"the Adam engine (fit_head2toe_variants)")
    data = prepare_cv(features, labels, n_classes, grid)
    grid = grid.for_rows(len(data.y))
    dev = torch.device(device)
    dim = data.x.shape[1]
    x, onehot = data.x.to(dev), data.onehot.to(dev)
    cv = cv_subset(data, grid)  # above grid.cv_rows rows: CV on a subsample, the refit on every row
    xc, oc, yc = (x, onehot, data.y.to(dev)) if cv is data else (cv.x.to(dev), cv.onehot.to(dev), cv.y.to(dev))
    val_mask = cv.fold.to(dev).unsqueeze(0) == torch.arange(grid.folds, device=dev).unsqueeze(1)  # [M, n_cv]
    train_mask = (~val_mask).float()
    k_of = {f: n_selected(n_columns or dim, f) for f in grid.fractions}
    screen = screen_candidates(cv, train_mask.cpu(), grid.max_candidates)
    path_ks = sorted({k for k in (n_selected(n_columns or dim, f) for f in all_fractions)
                      if screen is None or k <= screen.budget})
    fractions = [f for f in grid.fractions if screen is None or k_of[f] <= screen.budget]
    if not fractions:
        raise FitError(f"every fraction in SearchGrid.fractions keeps more than max_candidates="
                       f"{grid.max_candidates} of {dim} features; raise max_candidates or add "
                       f"smaller fractions")
    plan: dict = {"HEAD2TOE": (fractions, None)}
    if keep is not None:
        keep_t = torch.from_numpy(np.unique(np.asarray(keep, dtype=np.int64)))
        if keep_t.numel() == 0 or keep_t[0] < 0 or keep_t[-1] >= dim:
            raise FitError(f"keep must name columns in [0, {dim}); got {keep_t.numel()} columns")
        room = (dim if screen is None else len(screen.pool)) - len(keep_t)
        plan[HEAD2TOE_KEEP] = ([f for f in fractions if k_of[f] <= room], keep_t.to(dev))
        if not plan[HEAD2TOE_KEEP][0]:
            raise FitError(f"no fraction in SearchGrid.fractions leaves room beside the {len(keep_t)} "
                           f"kept columns of {dim}; add smaller fractions")
    extra = {name: 0 if kp is None else len(kp) for name, (_, kp) in plan.items()}
    lambdas = lambda_path(lambda_max(x, onehot, torch.ones(1, x.shape[0], device=dev)), settings)
    seconds: dict = {}

    def run_path(mask, scr, lams, stage, xs, oh):
        """The path of the models in mask [M, n] over xs [n, D] (one-hot labels oh) on scr's pool (or
        all columns): (path, allowed, pool)."""
        t0 = time.perf_counter()
        allowed = None if scr is None else scr.col_mask.to(dev) != 0
        xp = xs if scr is None else scr.x.to(dev)
        key = _path_key(xp, mask, lams, path_ks, settings, stage) if memo is not None and stage == "path cv" else None
        if key is not None and memo.get("key") == key:
            path = memo["path"]
        else:
            path = group_lasso_path(xp, oh, mask, lams, allowed=allowed, ks=path_ks, settings=settings,
                                    progress=progress, stage=stage)
            if key is not None:
                memo.update(key=key, path=path)
        seconds[stage] = time.perf_counter() - t0
        return path, allowed, None if scr is None else scr.pool.to(dev)

    def full_ranking(path, allowed, pool, j, budget=None):
        """(int64[M, P] column ids by relevance at point j, within `budget` taps first when given;
        int64[M] columns in those taps, or None)."""
        ranked = path.ranking(j, allowed)
        ranked = ranked if pool is None else pool[ranked]
        if budget is None:
            return ranked, None
        relevance = torch.zeros(ranked.shape[0], dim, device=dev)
        relevance[:, slice(None) if pool is None else pool] = path.norms[j]
        return taps.within_budget(ranked, relevance, budget)

    def ranked_columns(path, allowed, pool, j, name, budget=None):
        """int64[M, k_max (+ K)]: column ids of variant `name`'s widest head at point j (kept first)."""
        ranked, _ = full_ranking(path, allowed, pool, j, budget)
        fr, kp = plan[name]
        k_max = max(k_of[f] for f in fr)
        return ranked[:, :k_max] if kp is None else _with_keep(ranked, kp, k_max)

    def cv_rows(name, cols, ks, fr, budget, accs, latencies, at=None):
        """Retrain the CV heads on cols [len(at) * folds, k] (path points `at`, default the CV
        points) and add their rows to accs / latencies."""
        at = points if at is None else at
        acc = retrain_cv_along_f(xc, oc, train_mask.repeat(len(at), 1), val_mask.repeat(len(at), 1), yc, cols, ks,
                                 grid.folds, grid.f_stop, settings, progress,
                                 f"retrain cv {name}" + ("" if budget is None else f" {budget} taps"))
        ks = ks[:acc.shape[1]]  # the sizes retrained before CV accuracy turned down
        acc = acc.view(len(at), grid.folds, len(ks)).cpu()
        lat = None if taps is None else taps.latencies(cols[:, :ks[-1]], ks).view(len(at), grid.folds, len(ks)).cpu()
        for i, j in enumerate(at):
            for f in fr:
                k = k_of[f] + extra[name]
                if k not in ks:
                    continue
                key = (("l21", lambdas[j]), ("lr", None), ("steps", None), ("fraction", f), ("n_features", k),
                       ("taps", budget))
                accs[key] = acc[i, :, ks.index(k)].tolist()
                if lat is not None:
                    latencies[key] = float(lat[i, :, ks.index(k)].mean())

    # CV: one fold-batched path; the heads of every CV point, fold and F retrained at once
    path, allowed, pool = run_path(train_mask, screen, lambdas, "path cv", xc, oc)
    points = settings.cv_points()
    tables, best = {}, {}
    t0 = time.perf_counter()
    for name, (fr, _) in plan.items():
        ks = sorted({k_of[f] + extra[name] for f in fr})
        accs, latencies = {}, {}
        cols = torch.cat([ranked_columns(path, allowed, pool, j, name) for j in points])  # [points * folds, k]
        cv_rows(name, cols, ks, fr, None, accs, latencies)
        if taps is not None and extra[name] == 0 and grid.tap_budgets:
            # tap budgets rerank at the most accurate unbudgeted point only (4x less retraining than at every point)
            top = choose_best(summarize_cv(accs, {}), lambda row: row["val_acc_mean"], lambda row: row["n_features"],
                              lambda row: -row["l21"])
            j = lambdas.index(top["l21"])
            for budget in grid.tap_budgets:
                ranked, room = full_ranking(path, allowed, pool, j, budget)
                ks_b = [k for k in ks if k <= int(room.min())]  # columns inside every fold's budget taps
                if ks_b:
                    cv_rows(name, ranked[:, :ks_b[-1]], ks_b, fr, budget, accs, latencies, at=[j])
        tables[name] = summarize_cv(accs, {"method": name, "penalty": None})
        for row, key in zip(tables[name], accs):
            if key in latencies:
                row["latency"] = latencies[key]
        # ties: fewer features, then the larger lambda (the earlier, sparser path point), then no budget
        tie_breaks = (lambda row: row["n_features"], lambda row: -row["l21"], lambda row: row["taps"] or 0)
        rows = tables[name]
        if taps is not None and grid.latency_budget is not None:  # a hard bound; none within: the cheapest
            rows = [r for r in rows if r["latency"] <= grid.latency_budget + 1e-9] or [
                min(rows, key=lambda r: (r["latency"], -r["val_acc_mean"]))]
        if taps is not None and grid.choice == "cheapest":
            best[name] = choose_cheapest(rows, lambda row: row["val_acc_mean"],
                                         lambda row: standard_error(row, grid.folds), lambda row: row["latency"],
                                         *tie_breaks, min_saving=grid.min_saving)
        else:
            best[name] = choose_best(rows, lambda row: row["val_acc_mean"], *tie_breaks)
    seconds["retrain cv"] = time.perf_counter() - t0
    if rung:
        row = best["HEAD2TOE"]
        config = {k: row[k] for k in ("l21", "fraction", "n_features")} | {"folds": grid.folds, "rung": True}
        return {"HEAD2TOE": FitResult("HEAD2TOE", None, config, tables["HEAD2TOE"], None,
                                      time.perf_counter() - start)}
    cv_path = path
    del path, allowed, pool, screen

    # refit: the all-rows path down to the furthest chosen point; each variant ranks at its own point
    all_rows = torch.ones(1, x.shape[0], device=dev)
    screen = screen_candidates(data, all_rows.cpu(), grid.max_candidates)
    chosen = {name: lambdas.index(best[name]["l21"]) for name in plan}
    path, allowed, pool = run_path(all_rows, screen, lambdas[:max(chosen.values()) + 1], "path refit", x, onehot)
    t0 = time.perf_counter()
    parts = {}
    for name in plan:
        j, k = chosen[name], best[name]["n_features"]
        cols = ranked_columns(path, allowed, pool, j, name, best[name]["taps"])[:, :k]
        ((weight, bias),), _ = retrain_heads(x, onehot, all_rows, cols, [k], settings, progress=progress,
                                             stage=f"retrain refit {name}")
        scores = torch.zeros(dim, device=dev)
        scores[slice(None) if pool is None else pool] = path.norms[j, 0]
        order = torch.argsort(cols[0])  # LinearHead keeps its columns sorted
        parts[name] = (weight[0][order], bias[0], cols[0][order], scores)
    seconds["retrain refit"] = time.perf_counter() - t0
    total = time.perf_counter() - start
    results = {}
    for name, (weight, bias, cols, scores) in parts.items():
        head = LinearHead(weight.cpu().numpy().astype(np.float32), bias.cpu().numpy().astype(np.float32),
                          cols.cpu().numpy().astype(np.int64))
        row = best[name]
        config = {"l21": row["l21"], "lr": None, "steps": None, "fraction": row["fraction"],
                  "n_features": row["n_features"], "folds": grid.folds, "seed": grid.seed,
                  "screened_to": None if screen is None else screen.budget,  # candidates per fold
                  "cv_rows": len(cv.y),  # the rows CV scored (grid.cv_rows: a subsample of large data)
                  "engine": "path", "path_index": chosen[name], "n_lambdas": settings.n_lambdas,
                  "lambda_ratio": settings.lambda_ratio, "retrain_iters": settings.retrain_iters,
                  "retrain_l2": settings.retrain_l2, "tap_budget": row["taps"],
                  "choice": grid.choice if taps is not None else "accuracy"}
        if taps is not None:
            config["taps_read"] = taps.taps_read(head.features)
            config["latency_estimate"] = taps.latency(head.features)
        if extra[name]:
            config["kept_columns"] = extra[name]
        results[name] = FitResult(name, head, config, tables[name], scores.cpu().numpy().astype(np.float32), total)
    if stats is not None:
        stats.update({
            "lambdas": lambdas, "cv_points": points, "settings": asdict(settings), "seconds": seconds,
            "device": str(dev),
            **{stage: {"iterations": p.iterations, "kkt_rounds": p.kkt_rounds, "working_set": p.working_set,
                       "active": p.active().cpu().tolist()} for stage, p in (("cv", cv_path), ("refit", path))},
        })
    return results
