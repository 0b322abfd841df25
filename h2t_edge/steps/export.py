"""Export: a timm backbone to ONNX with pooled, L2-normalised taps (exporters/ does the graph work).

This module also owns the one export-cache key (`export_key`, `cached_export`): `train`, `eval`
and model search keep their exports under a folder, named by what makes two exports equal
(backbone, weights, taps, class-token policy) and the target sizes they hold.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from exporters import DEFAULT_BACKBONE
from h2t_edge.core.layout import Layout
from runtime.io import atomic_write_bytes, file_sha256


@dataclass
class ExportReport:
    path: Path
    layout: Layout | dict  # a multi-target-size export (`export_multi_step`): its multi-layout JSON
    sha256: str
    bytes: int
    seconds: float


def export_step(
    backbone: str, out: str | Path, target_size: int = 512, weights: str = "bundled",
    taps: Sequence[str] | None = None, cls_token: str = "pool",
) -> ExportReport:
    """Export `backbone` with pooled, normalised taps to the ONNX file `out`.

    cls_token: for token taps (ViT), pool the class token with the rest ('pool'), use it alone
    ('only') or keep it unpooled beside the pooled patch tokens ('separate')."""
    from exporters.backbones import load_backbone
    from exporters.export import export_backbone

    start = time.perf_counter()
    bb = load_backbone(backbone, weights=weights)
    model, layout = export_backbone(bb, target_size, taps, cls_token=cls_token)
    path = Path(out)
    atomic_write_bytes(path, model.SerializeToString())
    return ExportReport(path, Layout(layout), file_sha256(path), path.stat().st_size, time.perf_counter() - start)


def export_multi_step(backbone: str, out: str | Path, target_sizes: Sequence[int], weights: str = "bundled",
                      taps: Sequence[str] | None = None, cls_token: str = "pool") -> ExportReport:
    """Export `backbone` once with every tap pooled at each of `target_sizes` (one backbone pass
    feeds one feature cache per T: `h2t_edge.steps.extract.extract_features_multi`)."""
    from exporters.backbones import load_backbone
    from exporters.multi_export import export_backbone_multi

    start = time.perf_counter()
    bb = load_backbone(backbone, weights=weights)
    model, layout = export_backbone_multi(bb, sorted(set(int(t) for t in target_sizes)), taps, cls_token=cls_token)
    path = Path(out)
    atomic_write_bytes(path, model.SerializeToString())
    return ExportReport(path, layout, file_sha256(path), path.stat().st_size, time.perf_counter() - start)


def export_key(backbone: str, weights: str, taps: Sequence[str] | None = None, cls_token: str = "pool",
               multi: bool = False) -> str:
    """The name stem of an export with these settings: `<backbone>-<10 hex digits>`; exports with
    the same stem differ only in their target sizes. `multi`: a multi-target-size export
    (`export_multi_step`), whose graph differs from the single-T one even at one T."""
    key = json.dumps({"backbone": backbone, "weights": _weights_identity(weights),
                      "taps": list(taps) if taps else None, "cls_token": cls_token, "multi": multi}, sort_keys=True)
    return f"{backbone}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _weights_identity(weights: str) -> str:
    """The weights part of the key: a keyword as it is; a file by its resolved path, size and mtime,
    so that a changed weights file gets a new export."""
    if weights in ("bundled", "hub", "random") or not Path(weights).is_file():
        return weights
    path = Path(weights).resolve()
    stat = path.stat()
    return f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"


def cached_export_path(folder: str | Path, backbone: str, weights: str, target_sizes: Sequence[int],
                       taps: Sequence[str] | None = None, cls_token: str = "pool", multi: bool = False) -> Path:
    """Where the export with these settings is kept in `folder`: an existing export of the same
    key whose target sizes include these, or else a new path named after them."""
    stem = export_key(backbone, weights, taps, cls_token, multi)
    folder = Path(folder)
    for path in sorted(folder.glob(f"{stem}-T*.onnx")):
        if set(target_sizes) <= {int(t) for t in path.stem.rsplit("-T", 1)[1].split("-")}:
            return path
    return folder / f"{stem}-T{'-'.join(map(str, sorted(set(target_sizes))))}.onnx"


def cached_export(folder: str | Path, backbone: str, weights: str, target_sizes: Sequence[int],
                  taps: Sequence[str] | None = None, cls_token: str = "pool", multi: bool = False
                  ) -> tuple[Path, ExportReport | None]:
    """The export with these settings in `folder`, exported now if it is not there yet: the one
    export cache of `train`, `eval` and model search.

    multi=False: one target size, the plain export (`export_step`); multi=True: one graph with
    every size's pooled taps (`export_multi_step`). Returns (path, the report when it was
    exported now, else None)."""
    sizes = sorted(set(int(t) for t in target_sizes))
    if not multi and len(sizes) != 1:
        raise ValueError(f"a single-target-size export takes one target size, got {sizes}; pass multi=True")
    path = cached_export_path(folder, backbone, weights, sizes, taps, cls_token, multi)
    if path.is_file():
        return path, None
    if multi:
        return path, export_multi_step(backbone, path, sizes, weights, taps, cls_token)
    return path, export_step(backbone, path, sizes[0], weights, taps, cls_token)


@dataclass(frozen=True)
class TapRow:
    """One tap of a backbone at target size T: what `h2t-edge taps` shows."""

    name: str
    kind: str
    shape: tuple
    window: str  # 'global', 'HxW' or '-'
    features: int
    cost: float = 0.0  # estimated added latency of reading it, / the backbone's (core.costs bytes model)


def tap_table(backbone: str = DEFAULT_BACKBONE, target_size: int = 512, *, weights: str = "random",
              patterns: Sequence[str] | None = None, cls_token: str = "pool") -> list[TapRow]:
    """The taps an export of `backbone` at target size T would have (those matching `patterns`),
    with their pooling window, candidate features and deployed cost (the bytes model of
    `h2t_edge.core.costs`, over every tap of the backbone). Shapes do not depend on the weights."""
    from exporters.backbones import load_backbone
    from exporters.export import select_taps
    from exporters.pooling import plan_tap_pool
    from h2t_edge.core.costs import TapCosts

    bb = load_backbone(backbone, weights=weights)
    costs = TapCosts.bytes_model({"taps": [{"name": t.name, "shape": list(t.shape)} for t in bb.taps],
                                  "pre_logits": bb.spec.pre_logits}).by_name()
    rows = []
    for tap in select_taps(bb, patterns or None):
        plan = plan_tap_pool(tap.kind, tap.shape, target_size, cls_token if bb.has_cls_token else "pool")
        window = "global" if plan.global_pool else "x".join(map(str, plan.window)) or "-"
        rows.append(TapRow(tap.name, tap.kind, tuple(tap.shape), window, int(plan.features), costs[tap.name]))
    return rows
