"""Selection that knows what a tap costs: `TapPlan` and rankings within a tap budget.

A deployed head costs the backbone plus one pass over every tap it reads (`h2t_edge.core.costs`),
so a head's cost is set by its taps, not by its feature count. `TapPlan` carries, for the columns
a fit sees, the tap of each column, each tap's cost and the taps the head may read at all
(`--taps-from`: only those a device already computes).

Tap budgets. From a relevance ranking of the columns (the group-lasso path's), a budget of B taps
keeps the B taps of highest relevance per unit cost, sum_{d in tap} ||W_d|| / (cost + c0), with c0
the mean cost of the taps that cost anything (so a free tap, such as the pre-logits, counts as
cheap, not as infinitely good: it still needs relevance), and ranks the columns inside them in their original
order; the columns of the other taps follow (they are never among the top k when k fits in the
budget's taps). The path engine retrains these rankings beside the unbudgeted ones, at the path
point of the most accurate unbudgeted head, so CV sees heads that read 1, 2, 4, 8 ... taps, and
`choose_cheapest` can trade accuracy for latency.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from h2t_edge.core.costs import TapCosts, column_taps
from h2t_edge.core.errors import FitError



@dataclass(frozen=True)
class TapPlan:
    """The taps of the columns a fit sees: column_tap int64[D] (index into names), cost float64[n_taps]
    (fraction of the backbone's latency), names, and allowed bool[n_taps] (False: never read)."""

    column_tap: np.ndarray
    cost: np.ndarray
    names: tuple[str, ...]
    allowed: np.ndarray

    @classmethod
    def of(cls, layout: Mapping, allowed_taps=None, measured: Mapping | None = None) -> "TapPlan":
        """From a feature layout, the tap names a head may read (None: all) and its tap costs
        (`TapCosts.of`: the measured ones when given, checked against the layout, else the bytes
        model). The pre-logits tap is always allowed: every graph that runs the whole backbone pools
        it for the classifier (its cost is 0)."""
        costs = TapCosts.of(layout, measured)
        names = costs.names
        allowed = np.ones(len(names), dtype=bool)
        if allowed_taps is not None:
            wanted = set(allowed_taps)
            unknown = sorted(wanted - set(names))
            if unknown:
                raise FitError(f"taps {unknown[:5]} are not in this export's layout ({len(names)} taps); the device "
                               "graph comes from another backbone or tap set")
            allowed = np.asarray([n in wanted or n == layout["pre_logits"] for n in names])
        return cls(column_taps(layout), np.asarray(costs.fractions, dtype=np.float64), names, allowed)

    def allowed_columns(self) -> np.ndarray:
        """int64[D']: the columns of the allowed taps."""
        return np.flatnonzero(self.allowed[self.column_tap])

    def restrict(self, columns: np.ndarray) -> "TapPlan":
        """The plan of a fit that sees only `columns` (in that order), every tap allowed there."""
        return TapPlan(self.column_tap[columns], self.cost, self.names, np.ones_like(self.allowed))

    def taps_read(self, columns) -> list[str]:
        used = np.unique(self.column_tap[np.asarray(columns, dtype=np.int64)])
        return [self.names[i] for i in used]

    def latency(self, columns) -> float:
        """Estimated deployed latency of a head on `columns`, / the backbone's."""
        return 1.0 + float(self.cost[np.unique(self.column_tap[np.asarray(columns, dtype=np.int64)])].sum())

    def latencies(self, columns: torch.Tensor, ks) -> torch.Tensor:
        """float64[R, len(ks)]: the latency of the heads on columns[r, :k] for every model r and k."""
        tap = torch.from_numpy(self.column_tap).to(columns.device)[columns]  # [R, K]
        cost = torch.from_numpy(self.cost).to(columns.device)
        out = torch.empty(columns.shape[0], len(ks), dtype=torch.float64, device=columns.device)
        for i, k in enumerate(ks):
            used = torch.zeros(columns.shape[0], len(self.cost), dtype=torch.bool, device=columns.device)
            used.scatter_(1, tap[:, :k], True)
            out[:, i] = 1.0 + used.to(torch.float64) @ cost
        return out

    def within_budget(self, ranked: torch.Tensor, relevance: torch.Tensor, budget: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64[M, P] ranked reordered: the columns of each model's best `budget` taps first, in
        their ranked order; int64[M] how many of the ranked columns those taps hold). ranked: int64[M, P] column
        ids (this plan's columns) by decreasing relevance; relevance: float[M, D] per column (0:
        unused)."""
        dev = ranked.device
        tap = torch.from_numpy(self.column_tap).to(dev)
        n_taps = len(self.cost)
        score = torch.zeros(relevance.shape[0], n_taps, dtype=torch.float64, device=dev)
        score.index_add_(1, tap, relevance.to(torch.float64))
        paid = self.cost[self.cost > 0]
        score = score / (torch.from_numpy(self.cost).to(dev) + (float(paid.mean()) if paid.size else 1.0))
        score = score.masked_fill(~torch.from_numpy(self.allowed).to(dev), 0.0)
        top = torch.topk(score, min(budget, n_taps), dim=1)
        chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top.indices, top.values > 0)
        inside = chosen.gather(1, tap[ranked])  # [M, P]
        order = torch.sort((~inside).to(torch.int8), dim=1, stable=True).indices
        return ranked.gather(1, order), inside.sum(1)
