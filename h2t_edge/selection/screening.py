"""Screening large candidate pools (group-lasso strong rule) and the selection run: a group-lasso
head ranks the candidates, then unregularized heads are retrained on nested top-k sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
