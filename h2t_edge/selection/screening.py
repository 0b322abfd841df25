"""Screening large candidate pools (group-lasso strong rule) and the selection run: a group-lasso
head ranks the candidates, then unregularized heads are retrained on nested top-k sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from h2t_edge.core.errors import FitError
from h2t_edge.core.progress import Progress
from h2t_edge.selection.grid import CVData, batch_schedule
from h2t_edge.selection.kernels import nested_chunks, nested_val_accuracy, run_wide, top_columns, train_nested_group


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
class Screen:
    """The candidate pool of a screened group-lasso run."""

    budget: int  # candidates per model
    pool: torch.Tensor  # int64[P], sorted: union of every model's candidates
    x: torch.Tensor  # float32[n, P] = data.x[:, pool]
    col_mask: torch.Tensor  # float32[P, M]: 1 where the pool column is one of model m's candidates


def screen_candidates(data: CVData, train_mask: torch.Tensor, budget: int | None) -> Screen | None:
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
    return Screen(budget, pool, data.x.index_select(1, pool), col_mask)


def keep_first(ranked: torch.Tensor, keep: torch.Tensor, extra: int) -> torch.Tensor:
    """int64[M, K + extra]: the kept columns keep[K] first, then each model's `extra` best ranked
    columns outside them. ranked: int64[M, W] with W >= K + extra, by decreasing relevance."""
    rows = []
    for order in ranked:
        rest = order[~torch.isin(order, keep)][:extra]
        rows.append(torch.cat([keep, rest]))
    return torch.stack(rows)


def select_and_retrain(data, mask, val_mask, lrs, l21s, steps, batch_size, seed, variants,
                        progress, stage, screen: Screen | None = None):
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
    for models, w, _ in run_wide(x, data.onehot, mask, lrs, l21s, "l21", steps, batch_size,
                                  seed, progress, f"{stage} select steps={steps}", col_mask,
                                  data.dtype):
        scores, ranked = top_columns(w, width, None if col_mask is None else col_mask[:, models])
        del w
        if screen is not None:
            ranked = screen.pool[ranked]
            scores = torch.zeros(len(models), dim).index_copy_(1, screen.pool, scores)
        lr = lrs[models[0]]
        batches = batch_schedule(n, batch_size, steps, seed)
        for name, (ks, keep) in variants.items():
            k_max = ks[-1]
            columns = (ranked[:, :k_max].contiguous() if keep is None
                       else keep_first(ranked, keep, k_max - len(keep)))
            chunks = nested_chunks(np.arange(len(models)), n, k_max)
            for i, chunk in enumerate(chunks):
                weights, biases, logits = train_nested_group(
                    data.x, data.onehot, mask[models[chunk]], lr, columns[chunk], ks, batches,
                    progress, f"{stage} retrain {name} steps={steps}", i * steps, len(chunks) * steps,
                    data.dtype, 0 if keep is None else len(keep))
                acc = None if val_mask is None else nested_val_accuracy(
                    logits, data.y, val_mask[models[chunk]])
                del logits
                yield (name, models[chunk], scores[chunk], list(zip(weights, biases)), columns[chunk],
                       acc)


# ----------------------------------------------------------------------------- streamed screening


@dataclass(frozen=True)
class ColumnSource:
    """A fit's feature matrix left where it lies (a feature cache's float16 memmap), read in blocks.

    features: [N, D_all] (any dtype numpy indexes); rows: int64[n], the rows the fit uses (the
    cache's valid ones); columns: int64[D] of D_all, or None for all. `block` and `gather` return
    float32[n, k] for k columns, reading `row_chunk` rows at a time, so nothing holds float32[n, D];
    `source[:, idx]` is `gather(idx)` (what `TaskHead.logits` reads) and np.asarray(source) the
    whole matrix (the fallback where nothing is screened)."""

    features: np.ndarray
    rows: np.ndarray
    columns: np.ndarray | None = None
    row_chunk: int = 2048

    ndim = 2

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.features.shape[1] if self.columns is None else len(self.columns)

    def restrict(self, columns: np.ndarray) -> "ColumnSource":
        """The source of columns[k] of this one (in that order)."""
        columns = np.asarray(columns, dtype=np.int64)
        return ColumnSource(self.features, self.rows, columns if self.columns is None else self.columns[columns],
                            self.row_chunk)

    def block(self, lo: int, hi: int) -> np.ndarray:
        """float32[n, hi - lo]: columns lo..hi-1."""
        if self.columns is None:  # a contiguous slice of every row: the memmap's cheapest read
            return self._read(lambda rows: self.features[rows, lo:hi], hi - lo)
        return self.gather(np.arange(lo, hi))

    def gather(self, idx) -> np.ndarray:
        """float32[n, len(idx)]: the columns idx (indices into this source's columns)."""
        idx = np.asarray(idx, dtype=np.int64)
        cols = idx if self.columns is None else self.columns[idx]
        return self._read(lambda rows: self.features[np.ix_(rows, cols)], len(cols))

    def _read(self, take, width: int) -> np.ndarray:
        out = np.empty((len(self.rows), width), dtype=np.float32)
        for i in range(0, len(self.rows), self.row_chunk):
            out[i:i + self.row_chunk] = take(self.rows[i:i + self.row_chunk])
        return out

    def __getitem__(self, key):
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)):
            raise TypeError("a ColumnSource reads columns only: source[:, idx]")
        return self.gather(key[1])

    def __array__(self, dtype=None, copy=None):
        whole = self.block(0, self.shape[1])
        return whole if dtype is None else whole.astype(dtype, copy=False)


def stream_screen(source: ColumnSource, onehot: torch.Tensor, subsets: torch.Tensor, budget: int, *,
                  block_bytes: int = 1 << 28, device: str | torch.device = "cpu", progress: Progress | None = None,
                  stage: str = "screen") -> torch.Tensor:
    """int64[G, budget]: each training subset's top-`budget` columns of `source` by
    `strong_rule_scores`, in decreasing order (ties: the lower column), as `screen_candidates`
    ranks them, from blocks of at most `budget` columns and about `block_bytes` of float32 (one
    progress tick per block).

    onehot: float32[n, C]; subsets: [G, n] (nonzero = row in the subset). Memory: a block, and
    G x (budget + block) scores, whatever D is. Raises FitError on a NaN or inf feature."""
    n, dim = source.shape
    width = max(1, min(budget, block_bytes // (4 * max(n, 1))))
    onehot, subsets = onehot.to(device), subsets.to(device)
    g = subsets.shape[0]
    top_scores = torch.empty(g, 0)
    top_idx = torch.empty(g, 0, dtype=torch.int64)
    starts = range(0, dim, width)
    for b, lo in enumerate(starts):
        hi = min(dim, lo + width)
        xb = torch.from_numpy(source.block(lo, hi))
        if not bool(torch.isfinite(xb).all()):
            row = int((~torch.isfinite(xb)).any(dim=1).nonzero()[0])
            raise FitError(f"features contain NaN or inf (first in row {row}, columns {lo}..{hi - 1}); re-extract "
                           "the feature cache or drop the row")
        stat = strong_rule_scores(xb.to(device), onehot, subsets).cpu()
        # earlier columns first: a stable sort keeps the lower column among equal scores, as one sort of all would
        scores = torch.cat([top_scores, stat], dim=1)
        idx = torch.cat([top_idx, torch.arange(lo, hi).expand(g, -1)], dim=1)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :budget]
        top_scores, top_idx = scores.gather(1, order), idx.gather(1, order)
        if progress is not None:
            progress(stage, b + 1, len(starts))
    return top_idx
