"""The method registry: every method h2t-edge fits, in one place.

`fit`, `train` and `eval` look methods up here instead of matching strings. A `Method` says how it
fits (a function of features, labels, classes, grid and progress), which columns it reads (all
candidates, or the pre-logits tap only) and its penalty.

| method           | reads       | penalty | what                                                        |
|------------------|-------------|---------|-------------------------------------------------------------|
| LINEAR           | pre-logits  | none    | linear probe on the backbone's last features                |
| HEAD2TOE         | all taps    | l21     | group-lasso ranking, top-F features, retrained head (paper) |
| HEAD2TOE+LINEAR  | all taps    | l21     | HEAD2TOE that always keeps the pre-logits (train's guard)   |
| ALL-L1/L2/L21    | all taps    | l1/l2/l21 | one regularized head on every feature (paper baselines)   |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from h2t_edge.core.errors import FitError
from h2t_edge.core.layout import Layout
from h2t_edge.selection.estimators import (
    fit_head2toe_variants,
    fit_linear,
    fit_regularized,
)
from h2t_edge.selection.grid import FitResult
from h2t_edge.selection.taps import TapPlan
from h2t_edge.selection.names import (  # noqa: F401  (re-exported: the registry's names)
    ALL_L1,
    ALL_L2,
    ALL_L21,
    HEAD2TOE,
    HEAD2TOE_LINEAR,
    LINEAR,
    TABLE1_METHODS,
)

# fit(features float32[n, d], labels int64[n], n_classes, grid, progress, layout, taps) -> FitResult
# (taps: the columns' TapPlan, or None)
FitFunction = Callable[..., FitResult]


@dataclass(frozen=True)
class Method:
    name: str
    fit_function: FitFunction
    reads: str  # "all": every candidate feature; "pre_logits": the pre-logits tap only
    penalty: str | None  # "l21", "l2", "l1" or None
    in_paper: bool
    description: str

    def columns(self, layout: Mapping[str, Any]) -> slice | None:
        """The cache columns this method reads (None: all of them)."""
        return Layout.of(layout).pre_logits_columns() if self.reads == "pre_logits" else None

    def fit(self, features, labels, n_classes: int, grid, progress=None, layout: Mapping[str, Any] | None = None,
            allowed_taps=None) -> FitResult:
        """Fit on `features` (already restricted to `columns(layout)`); `layout` is needed by
        methods that keep the pre-logits (HEAD2TOE+LINEAR) and by the deploy-aware choice (tap
        costs); allowed_taps: the tap names a head may read (`--taps-from`; None: all)."""
        taps = None
        if layout is not None and self.reads == "all" and features.shape[1] == Layout.of(layout).total_features:
            taps = TapPlan.of(layout, allowed_taps=allowed_taps)
        elif allowed_taps is not None and self.reads == "all":
            raise FitError(f"{self.name}: --taps-from needs the features of every tap and their layout")
        return self.fit_function(features, labels, n_classes, grid, progress, layout, taps)


def _head2toe(features, labels, n_classes, grid, progress, layout, taps):
    return fit_head2toe_variants(features, labels, n_classes, grid, progress, taps=taps)[HEAD2TOE]


def _keep_pre_logits(features, labels, n_classes, grid, progress, layout, taps):
    if layout is None:
        raise FitError(f"{HEAD2TOE_LINEAR} needs the feature layout to find the pre-logits columns")
    pre = Layout.of(layout).pre_logits_columns()
    return fit_head2toe_variants(features, labels, n_classes, grid, progress, keep=np.arange(pre.start, pre.stop),
                                 taps=taps)[HEAD2TOE_LINEAR]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(LINEAR, lambda x, y, c, g, p, layout, taps: fit_linear(x, y, c, g, p), "pre_logits", None, True,
           "linear probe on the pre-logits"),
    Method(HEAD2TOE, _head2toe, "all", "l21", True,
           "group-lasso ranking of every tap's features, top fraction F, retrained head"),
    Method(HEAD2TOE_LINEAR, _keep_pre_logits, "all", "l21", False,
           "HEAD2TOE whose selection always keeps the pre-logits (the train guard's variant)"),
    *(Method(f"ALL-{p.upper()}", lambda x, y, c, g, pr, layout, taps, p=p: fit_regularized(x, y, c, p, g, pr), "all", p,
             True, f"one {p}-regularized head on every feature") for p in ("l1", "l2", "l21")),
)}


def get_method(name: str, error: type[Exception] = FitError) -> Method:
    """The registered method `name`; `error` (naming the known ones) when there is none."""
    try:
        return METHODS[name]
    except KeyError:
        raise error(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
