"""`Layout`: the feature layout of an exported backbone, typed.

The layout is the contract between export, extraction, selection and compilation: which taps an
export has, where each tap's features sit in the concatenated feature vector, the target size T,
the pre-logits tap and the preprocessing. It travels as JSON (ONNX metadata, cache manifests,
task.json), validated by `h2t_edge.core.schemas.LAYOUT`. `Layout` is that JSON object with
named accessors; it is a dict, so it serializes and compares exactly as the JSON does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from h2t_edge.core.errors import CacheError


@dataclass(frozen=True)
class TapColumns:
    """One tap's block of the feature vector: columns [offset, offset + features)."""

    name: str
    output: str  # the ONNX output that carries it
    offset: int
    features: int

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.features)


class Layout(dict):
    """A feature layout (the JSON object), with typed accessors. Build with `Layout.of(data)`."""

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> "Layout":
        return data if isinstance(data, Layout) else cls(data)

    @property
    def target_size(self) -> int:
        return int(self["target_size"])

    @property
    def total_features(self) -> int:
        return int(self["total_features"])

    @property
    def pre_logits(self) -> str:
        """Name of the tap that feeds the backbone's classifier (what LINEAR reads)."""
        return self["pre_logits"]

    @property
    def preprocess(self) -> dict:
        return self["preprocess"]

    @property
    def backbone(self) -> str:
        return self["backbone"]

    @property
    def weights(self) -> str:
        return self["weights"]

    @property
    def input(self) -> str:
        """Name of the graph's image input."""
        return self.get("input", "images")

    @property
    def cls_token(self) -> str:
        return self.get("cls_token", "pool")

    @property
    def taps(self) -> tuple[TapColumns, ...]:
        return tuple(TapColumns(t["name"], t.get("output", t["name"]), int(t["offset"]), int(t["features"]))
                     for t in self["taps"])

    @property
    def tap_names(self) -> list[str]:
        return [t["name"] for t in self["taps"]]

    def tap(self, name: str) -> TapColumns:
        for tap in self.taps:
            if tap.name == name:
                return tap
        raise CacheError(f"the feature layout of {self.backbone} (T={self.target_size}) has no tap {name!r}; "
                         f"its taps are {', '.join(self.tap_names[:5])}...")

    def columns(self, name: str) -> slice:
        """The feature columns of tap `name`."""
        return self.tap(name).columns

    def pre_logits_columns(self) -> slice:
        return self.columns(self.pre_logits)
