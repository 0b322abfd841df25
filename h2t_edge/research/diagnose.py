"""Neural-collapse diagnostics per layer: NC1 of every tap of a feature cache.

NC1 follows the seed paper (neural-collapse-transfer, Eq. 4):

    NC1 = (1/K) trace(Sigma_W Sigma_B^+),
    Sigma_W = 1/N sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T   (1/(nK) for K balanced classes of n),
    Sigma_B = 1/K sum_k (mu_k - mu_G)(mu_k - mu_G)^T,

with mu_k the class means, mu_G the global mean of the features and ^+ the pseudo-inverse. Lower
NC1 means more collapsed classes (within-class spread small against the spread of the class
means); the paper finds that a layer whose downstream features collapse more transfers better.

The pseudo-inverse is never formed: with M = [mu_1 - mu_G, ..., mu_K - mu_G] / sqrt(K) (d x K)
and its thin SVD M = U S V^T, Sigma_B^+ = U S^-2 U^T over the singular values kept, so
trace(Sigma_W Sigma_B^+) = sum_j s_j^-2 mean_i (u_j . (h_i - mu_{y_i}))^2: O(N d K), no d x d
matrix. Singular values of Sigma_B below `rtol * max` are dropped, numpy.linalg.pinv's rule.

`diagnose` puts NC1 per tap beside HEAD2TOE's selection (the share of the selected features
that each tap holds) and their Spearman rank correlation, and writes OUT.json and (with
matplotlib) OUT.png.
`prelogits_nc1` is the one-number score of a backbone on a task (its pre-logits), for model
search.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from h2t_edge.core.errors import FitError, H2TEdgeError
from h2t_edge.core.layout import Layout
from h2t_edge.core.plots import MATPLOTLIB_MISSING, have_matplotlib, save_figure
from h2t_edge.selection.names import HEAD2TOE
from h2t_edge.steps.extract import FeatureCache
from runtime.io import atomic_write_json

DIAGNOSE_FORMAT = "h2t-edge/nc1-diagnosis"


def nc1(features: np.ndarray, labels: np.ndarray, rtol: float | None = None) -> float:
    """NC1 (paper Eq. 4) of features float[n, d] with labels int[n].

    Classes are the distinct labels present (K >= 2 needed). rtol: singular values of Sigma_B
    below rtol * the largest are treated as zero (default max(d, K) * float64 eps, as
    numpy.linalg.pinv). Returns 0.0 when every class is a single point; inf when the class means
    coincide (Sigma_B = 0) while the classes still spread.
    """
    h = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if h.ndim != 2 or labels.shape != (h.shape[0],):
        raise FitError(f"NC1 needs features [n, d] and labels [n]; got {h.shape} and {labels.shape}")
    if not np.isfinite(h).all():
        raise FitError("NC1: the features contain NaN or inf; check the feature cache")
    classes, y = np.unique(labels, return_inverse=True)
    k = len(classes)
    if k < 2:
        raise FitError(f"NC1 needs at least 2 classes; the labels hold {k}")
    counts = np.bincount(y, minlength=k).astype(np.float64)
    means = np.zeros((k, h.shape[1]))
    np.add.at(means, y, h)
    means /= counts[:, None]
    centered_means = (means - h.mean(axis=0)).T / np.sqrt(k)  # [d, K]: Sigma_B = M M^T
    u, s, _ = np.linalg.svd(centered_means, full_matrices=False)
    eig = s**2  # eigenvalues of Sigma_B
    tol = (max(h.shape[1], k) * np.finfo(np.float64).eps if rtol is None else rtol) * (eig.max() if eig.size else 0)
    keep = eig > tol
    within = h - means[y]  # [n, d]
    if not keep.any():
        return 0.0 if not np.any(within) else float("inf")
    proj = within @ u[:, keep]  # [n, r]: within-class deviations along the between-class directions
    return float(np.sum(np.mean(proj**2, axis=0) / eig[keep]) / k)


def tap_nc1(cache: FeatureCache, taps: list[str] | None = None, progress=None) -> dict[str, float]:
    """{tap name: NC1 of that tap's features} on the cache's valid rows, in layout order (one tap's
    columns in memory at a time)."""
    labels = cache.labels[cache.valid]
    return _per_tap(cache.layout, lambda cols: cache.arrays(cols)[0], labels, taps, progress)


def nc1_per_tap(features: np.ndarray, labels: np.ndarray, layout: dict, taps: list[str] | None = None,
                progress=None) -> dict[str, float]:
    """{tap name: NC1} from features float[n, D] laid out as `layout` (all taps concatenated)."""
    return _per_tap(layout, lambda cols: features[:, cols], labels, taps, progress)


def _per_tap(layout: dict, columns, labels, taps, progress) -> dict[str, float]:
    by_name = {t["name"]: t for t in layout["taps"]}
    names = list(by_name) if taps is None else list(taps)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise FitError(f"the feature layout has no tap {unknown[0]!r}")
    out = {}
    for i, name in enumerate(names):
        tap = by_name[name]
        out[name] = nc1(columns(slice(tap["offset"], tap["offset"] + tap["features"])), labels)
        if progress:
            progress(i + 1, len(names))
    return out


def prelogits_nc1(cache: FeatureCache | str | os.PathLike) -> float:
    """NC1 of a backbone's pre-logits on a task: the task-aware score for model search.

    cache: a feature cache (or its directory) of the task's training images, extracted with the
    backbone; its layout names the pre-logits tap. Lower is better (more collapsed classes)."""
    if not isinstance(cache, FeatureCache):
        cache = FeatureCache.open(cache)
    name = cache.layout.pre_logits
    return tap_nc1(cache, [name])[name]


def spearman(a, b) -> float:
    """Spearman rank correlation (ties get their average rank); NaN when either side is constant."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse = np.unique(x, return_inverse=True)
    # average rank within each group of equal values
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


@dataclass
class TapDiagnosis:
    """One tap: its depth index, NC1, and (with a fitted task) HEAD2TOE's selection in it."""

    name: str
    depth: int
    features: int
    nc1: float
    selected: int | None = None  # selected features in this tap
    selected_share: float | None = None  # selected here / all selected
    selected_fraction: float | None = None  # selected here / this tap's features


@dataclass
class Diagnosis:
    cache: str
    backbone: str
    classes: int
    examples: int
    pre_logits: str  # the layout's pre-logits tap
    taps: list[TapDiagnosis]
    task: str | None = None
    method: str | None = None
    spearman_nc1_vs_share: float | None = None  # expected negative: low NC1, more selected
    spearman_nc1_vs_fraction: float | None = None

    @property
    def prelogits_nc1(self) -> float | None:
        return next((t.nc1 for t in self.taps if t.name == self.pre_logits), None)

    def to_dict(self) -> dict:
        return {"format": DIAGNOSE_FORMAT, "version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Diagnosis:
        """The inverse of `to_dict` (extra keys, such as a report's, are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["taps"] = [TapDiagnosis(**t) for t in data["taps"]]
        return cls(**values)


def diagnose(cache: FeatureCache | str | os.PathLike, task_dir: str | os.PathLike | None = None,
             progress=None) -> Diagnosis:
    """NC1 per tap of the cache's (training) features; with a fitted task (`h2t-edge fit` output,
    same backbone and layout), its selected-feature share per tap and the rank correlations."""
    from h2t_edge.core.artifacts import TaskHead
    from h2t_edge.steps.fit import check_same_backbone

    if not isinstance(cache, FeatureCache):
        cache = FeatureCache.open(cache)
    head = None
    if task_dir is not None:
        head = TaskHead.load(task_dir)
        check_same_backbone(head, cache)
    values = tap_nc1(cache, progress=progress)
    return build_diagnosis(cache.layout, values, examples=int(cache.valid.sum()), classes=len(cache.classes),
                           source=str(cache.root), selected=None if head is None else head.features,
                           task=None if head is None else head.task,
                           method=HEAD2TOE if head is None else head.method)


def build_diagnosis(layout: Mapping, values: dict[str, float], *, examples: int, classes: int, source: str = "",
                    selected: np.ndarray | None = None, task: str | None = None,
                    method: str = HEAD2TOE) -> Diagnosis:
    """Put NC1 per tap (`tap_nc1` / `nc1_per_tap`) beside a selection: int[k] indices into the
    layout's concatenated features (a fitted head's `features`), or None for NC1 alone."""
    layout = Layout.of(layout)
    taps = []
    if selected is not None:
        selected = np.asarray(selected, dtype=np.int64)
        if selected.size == 0:
            raise FitError("the selection is empty: a fitted head keeps at least one feature")
    for depth, tap in enumerate(layout["taps"]):
        row = TapDiagnosis(tap["name"], depth, int(tap["features"]), values[tap["name"]])
        if selected is not None:
            lo, hi = tap["offset"], tap["offset"] + tap["features"]
            row.selected = int(((selected >= lo) & (selected < hi)).sum())
            row.selected_share = row.selected / len(selected)
            row.selected_fraction = row.selected / row.features
        taps.append(row)
    result = Diagnosis(source, layout.backbone, classes, examples, layout.pre_logits, taps)
    if selected is not None:
        finite = [t for t in taps if np.isfinite(t.nc1)]
        result.task, result.method = task, method
        result.spearman_nc1_vs_share = spearman([t.nc1 for t in finite], [t.selected_share for t in finite])
        result.spearman_nc1_vs_fraction = spearman([t.nc1 for t in finite], [t.selected_fraction for t in finite])
    return result


def write_diagnosis(result: Diagnosis, out: str | os.PathLike) -> dict[str, Path]:
    """Write OUT.json and, where matplotlib is installed, OUT.png (OUT may end in .json).

    Returns {'json': path} plus 'png': path when the figure was drawn."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix == ".json" else out
    json_path = base.with_name(base.name + ".json")
    atomic_write_json(json_path, _json_safe(result.to_dict()))
    paths = {"json": json_path}
    if have_matplotlib():
        paths["png"] = plot_diagnosis(result, base.with_name(base.name + ".png"))
    return paths


def _json_safe(value):
    """JSON has no NaN or inf: write them as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def plot_diagnosis(result: Diagnosis, path: str | os.PathLike) -> Path:
    """Write `figure_diagnosis` to the PNG `path`."""
    return save_figure(figure_diagnosis(result), path)


def figure_diagnosis(result: Diagnosis):
    """A matplotlib figure: NC1 across depth (log scale); with a task, its selected share per tap as bars."""
    try:
        import matplotlib
    except ImportError:
        raise H2TEdgeError(f"the NC1 plot needs matplotlib: {MATPLOTLIB_MISSING}") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = [t.depth for t in result.taps]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(depth) + 2), 4))
    if result.task is not None:
        share = ax.twinx()
        share.bar(depth, [100 * t.selected_share for t in result.taps], color="#dd8452", alpha=0.45,
                  label=f"{result.method} selected share")
        share.set_ylabel(f"share of {result.method}'s selected features (%)", color="#dd8452")
        ax.set_zorder(share.get_zorder() + 1)
        ax.patch.set_visible(False)
    ax.plot(depth, [t.nc1 for t in result.taps], "o-", color="#4c72b0", markersize=3)
    ax.set_yscale("log")
    ax.set_ylabel("NC1 = tr(Σ_W Σ_B⁺) / K  (lower: more collapsed)", color="#4c72b0")
    step = max(1, len(depth) // 25)
    ax.set_xticks(depth[::step], [t.name for t in result.taps][::step], rotation=60, ha="right", fontsize=7)
    title = f"{result.backbone}: NC1 per tap on {result.examples} training examples, {result.classes} classes"
    if result.spearman_nc1_vs_share is not None:
        title += f"\nSpearman(NC1, selected share) = {result.spearman_nc1_vs_share:+.2f}"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
