"""What reading a tap costs a deployed graph, as a fraction of the plain backbone's batch-1 latency.

A task graph runs the backbone and, for every tap its head reads, one more pass over that tap's
feature map (pooling and normalisation) that the plain backbone never makes. Those passes are
memory-bound (benchmarks/results/deploy.md: pooling re-reads 27 MB per image for EfficientNet-
Lite0's 51 taps), plus a few small nodes per tap. So a head's deployed latency is estimated as

    latency / backbone = 1 + sum over the taps it reads of cost(tap)

(ignoring that a graph whose deepest tap is early also drops the backbone's tail: the estimate is
an upper bound). `TapCosts` holds cost(tap) for one export:

- `bytes_model(layout)`: the fallback, from bytes read. The taps together cost `ALL_TAPS` (0.55,
  the all-taps extraction graph of deploy.md on ONNX Runtime CPU: 1.59x; OpenVINO 1.52x), shared
  70% by each tap's map bytes and 30% equally (the per-tap nodes). The pre-logits tap costs 0: the
  plain backbone pools it already, for its classifier.
- measured costs: `TapCosts.of(layout, measured)` takes them in `to_dict`'s form and checks them
  against the layout (nothing in h2t-edge measures them yet: the bytes model is what runs).

The layout gives every tap's map shape, so the model needs no backbone in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from h2t_edge.core.errors import H2TEdgeError
from h2t_edge.core.layout import Layout

ALL_TAPS = 0.55  # added latency of reading every tap, / backbone (bytes model)
BYTES_SHARE = 0.7  # of that, the share spread by map bytes (the rest: per-tap nodes, equally)
COSTS_FORMAT = "h2t-edge/tap-costs"


class CostError(H2TEdgeError):
    """Tap costs that do not fit the layout they are used with."""


@dataclass(frozen=True)
class TapCosts:
    """cost(tap) for every tap of one layout, in the layout's tap order (fractions of the backbone)."""

    names: tuple[str, ...]
    fractions: np.ndarray  # float64[n_taps]
    source: str  # "bytes model" or how they were measured

    @classmethod
    def bytes_model(cls, layout: Mapping) -> "TapCosts":
        layout = Layout.of(layout)
        entries = layout["taps"]
        # the map a tap's pooling reads (float32); a layout without map shapes: its pooled features
        nbytes = np.asarray([4.0 * float(np.prod(t["shape"] if "shape" in t else t["features"])) for t in entries])
        free = np.asarray([t["name"] == layout.pre_logits for t in entries])
        paid = ~free
        if not paid.any():
            return cls(tuple(t["name"] for t in entries), np.zeros(len(entries)), "bytes model")
        share = np.where(paid, nbytes, 0.0) / nbytes[paid].sum()
        fractions = ALL_TAPS * (BYTES_SHARE * share + (1.0 - BYTES_SHARE) * paid / paid.sum())
        return cls(tuple(t["name"] for t in entries), fractions, "bytes model")

    @classmethod
    def of(cls, layout: Mapping, measured: Mapping | None = None) -> "TapCosts":
        """The measured costs when given (`to_dict`'s form, checked against the layout), else the bytes model."""
        if measured is None:
            return cls.bytes_model(layout)
        costs = cls.from_dict(measured)
        names = tuple(t["name"] for t in Layout.of(layout)["taps"])
        if costs.names != names:
            raise CostError(f"tap costs measured for taps {list(costs.names)[:3]}... do not match this layout's "
                            f"{len(names)} taps; measure them again for this export")
        return costs

    def to_dict(self) -> dict:
        return {"format": COSTS_FORMAT, "version": 1, "source": self.source,
                "taps": {name: float(f) for name, f in zip(self.names, self.fractions)}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "TapCosts":
        if data.get("format") != COSTS_FORMAT or not isinstance(data.get("taps"), Mapping):
            raise CostError(f"not an h2t-edge tap-cost record (format {data.get('format')!r})")
        fractions = np.asarray(list(data["taps"].values()), dtype=np.float64)
        if not np.isfinite(fractions).all() or (fractions < 0).any():
            raise CostError("tap costs must be finite and >= 0")
        return cls(tuple(data["taps"]), fractions, str(data.get("source", "measured")))

    def by_name(self) -> dict[str, float]:
        return {name: float(f) for name, f in zip(self.names, self.fractions)}

    def latency(self, taps: Iterable[str]) -> float:
        """Estimated batch-1 latency of a graph reading `taps`, / the plain backbone's."""
        cost = self.by_name()
        return 1.0 + sum(cost[t] for t in set(taps))


def column_taps(layout: Mapping) -> np.ndarray:
    """int64[D]: the index (in the layout's tap order) of the tap each feature column comes from."""
    layout = Layout.of(layout)
    out = np.empty(layout.total_features, dtype=np.int64)
    for i, tap in enumerate(layout.taps):
        out[tap.columns] = i
    return out

