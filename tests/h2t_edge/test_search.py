"""Model search: proxies against scikit-learn, strategies and regret, the pool, the latency budget, the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from h2t_edge.research import model_search as search
from h2t_edge.research.model_search import (
    Candidate, SearchError, add_regrets, fit_logistic, knn_loo_accuracy, linear_probe_cv_accuracy, proxy_scores,
    recommended_ranking, resolve_pool, strategies, stratified_fold_ids,
)

sklearn = pytest.importorskip("sklearn")


def _blobs(n_per_class=20, n_classes=4, d=8, spread=1.5, seed=0):
    """Overlapping Gaussian classes: some rows are misclassified, so accuracies are not all 0 or 1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), d))
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_knn_leave_one_out_matches_sklearn(k):
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    x, y = _blobs()
    reference = cross_val_score(KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute"),
                                x.astype(np.float64), y, cv=LeaveOneOut()).mean()
    ours = knn_loo_accuracy(x, y, k)
    assert 0.2 < ours < 1.0  # a task where the proxy discriminates
    assert ours == pytest.approx(reference, abs=1e-12)
    # rows are compared in chunks; the chunk size must not change the answer
    assert knn_loo_accuracy(x, y, k, chunk=7) == ours


def test_knn_is_cosine_not_euclidean():
    # scaling a row changes Euclidean neighbours but not cosine ones
    x, y = _blobs(seed=1)
    scaled = x * np.random.default_rng(2).uniform(0.1, 10, size=(len(x), 1)).astype(np.float32)
    assert knn_loo_accuracy(scaled, y) == knn_loo_accuracy(x, y)


def test_knn_rejects_bad_k():
    x, y = _blobs()
    with pytest.raises(search.FitError, match="k=80"):
        knn_loo_accuracy(x, y, k=80)


def test_logistic_regression_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(n_per_class=25, n_classes=3, d=6, seed=3)
    x = x.astype(np.float64)
    for c in (0.1, 1.0):
        ref = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
        weight, bias = fit_logistic(x, y, 3, c=c, max_iter=2000, tol=1e-10)
        np.testing.assert_allclose(weight.numpy().T, ref.coef_, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose((x @ weight.numpy() + bias.numpy()), ref.decision_function(x), rtol=1e-4, atol=1e-5)


def test_linear_probe_cv_matches_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import PredefinedSplit, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _blobs(n_per_class=30, n_classes=3, d=10, spread=2.0, seed=4)
    x[:, 3] = 0.5  # a constant column: StandardScaler keeps scale 1 for it
    folds = stratified_fold_ids(y, 3, seed=0)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-8, max_iter=10_000))
    reference = cross_val_score(pipe, x.astype(np.float64), y, cv=PredefinedSplit(folds)).mean()
    ours = linear_probe_cv_accuracy(x, y, folds=3, c=0.5, seed=0, max_iter=1000)
    assert 0.3 < ours < 1.0
    assert ours == pytest.approx(reference, abs=1e-12)


def test_linear_probe_needs_enough_rows_per_class():
    x, y = _blobs()
    y[:] = 0
    y[0] = 1  # class 1 has one example, fewer than 3 folds
    with pytest.raises(search.FitError, match="class 1 has 1 examples"):
        linear_probe_cv_accuracy(x, y, folds=3)


def test_proxy_scores_read_the_right_columns():
    x, y = _blobs(d=8, spread=0.3)
    noise = 3 * np.random.default_rng(5).normal(size=(len(y), 40)).astype(np.float32)
    features = np.concatenate([noise, x], axis=1)  # "pre-logits" are the last 8 columns
    scores, seconds = proxy_scores(features, y, slice(40, 48), ("knn", "knn_all"))
    assert scores["knn"] == knn_loo_accuracy(x, y) and scores["knn_all"] == knn_loo_accuracy(features, y)
    assert scores["knn"] > scores["knn_all"] and set(seconds) == {"knn", "knn_all"}
    with pytest.raises(SearchError, match="unknown proxy"):
        proxy_scores(features, y, slice(40, 48), ("nope",))


def _nc1_reference(x, y):
    """NC1 = tr(Sigma_W Sigma_B^+) / K, written out directly (neural-collapse seed paper, Eq. 4)."""
    x = x.astype(np.float64)
    mu = x.mean(0)
    classes = np.unique(y)
    sw = np.zeros((x.shape[1],) * 2)
    sb = np.zeros_like(sw)
    for c in classes:
        xc = x[y == c]
        d = xc - xc.mean(0)
        sw += d.T @ d / len(x)
        m = (xc.mean(0) - mu)[:, None]
        sb += m @ m.T / len(classes)
    return np.trace(sw @ np.linalg.pinv(sb)) / len(classes)


def test_nc1_proxy_matches_a_numpy_reference_and_ranks_collapse_higher():
    tight, y = _blobs(d=8, spread=0.2)
    loose, _ = _blobs(d=8, spread=2.0)
    features = np.concatenate([loose, tight], axis=1)
    scores, _ = proxy_scores(features, y, slice(8, 16), ("nc1",))
    np.testing.assert_allclose(1 / scores["nc1"] - 1, _nc1_reference(tight, y), rtol=1e-4)
    assert search.nc1_score(tight, y) > search.nc1_score(loose, y)  # more collapsed: higher score
    assert search.format_score("nc1", scores["nc1"]).startswith("NC1 ")


def _cands():
    return [Candidate("a", "bundled", 80.0, "s", scores={"knn": 0.5, "linear": 0.6}),
            Candidate("b", "bundled", 75.0, "s", scores={"knn": 0.9, "linear": 0.7}),
            Candidate("c", "bundled", 70.0, "s", scores={"knn": 0.7, "linear": 0.8}),
            Candidate("d", None, 90.0, "s", status="skipped", reason="no weights"),
            Candidate("e", "bundled", 85.0, "s", status="over budget", reason="p50 > budget")]


def test_strategies_follow_the_paper():
    rows = {(r["strategy"], r["budget"]): r["picks"] for r in strategies(_cands(), ("knn", "linear"), budget=2)}
    # skipped and over-budget backbones are never picked, however good their ImageNet top-1
    assert rows[("imagenet_top1", 1)] == ["a"] and rows[("imagenet_top1", 2)] == ["a", "b"]
    assert rows[("knn", 1)] == ["b"] and rows[("knn", 2)] == ["b", "c"]
    assert rows[("linear", 1)] == ["c"]
    # hybrid: the top task-agnostic pick plus the proxy's best among the others
    assert rows[("hybrid_knn", 2)] == ["a", "b"] and rows[("hybrid_linear", 2)] == ["a", "c"]
    assert recommended_ranking(_cands(), "knn") == ["a", "b", "c"]


def test_regret_is_oracle_minus_best_pick():
    rows = strategies(_cands(), ("knn", "linear"), budget=2)
    oracle = add_regrets(rows, {"a": 0.60, "b": 0.75, "c": 0.90})
    by = {(r["strategy"], r["budget"]): r for r in rows}
    assert oracle == 0.90
    assert by[("imagenet_top1", 1)]["regret"] == pytest.approx(0.30)
    assert by[("knn", 1)]["regret"] == pytest.approx(0.15)
    assert by[("linear", 1)]["regret"] == 0.0 and by[("hybrid_linear", 2)]["regret"] == 0.0
    assert by[("hybrid_knn", 2)]["accuracy"] == 0.75
    # a pick that was not fitted: no regret rather than a wrong one
    add_regrets(rows, {"a": 0.6, "c": 0.9})
    assert by[("knn", 1)]["regret"] is None and by[("linear", 1)]["regret"] == 0.0


def test_pool_lists_backbones_without_offline_weights():
    pool = {c.name: c for c in resolve_pool()}
    assert pool["efficientnet_lite0"].eligible and pool["efficientnet_lite0"].imagenet_top1 == 75.1
    assert pool["resnet50"].status == "skipped" and "--weights resnet50=FILE" in pool["resnet50"].reason
    given = {c.name: c for c in resolve_pool(["resnet50", "efficientnet_lite0"], {"resnet50": "random"})}
    assert given["resnet50"].eligible and given["resnet50"].imagenet_top1 is None
    with pytest.raises(SearchError, match="not in the pool"):
        resolve_pool(["efficientnet_lite0"], {"resnet50": "random"})
    with pytest.raises(SearchError, match="no such file"):
        resolve_pool(["resnet50"], {"resnet50": "/nonexistent.pth"})


def test_registry_top1_has_a_source():
    from exporters.backbones import list_backbones

    for spec in list_backbones():
        if spec.bundled is not None:
            assert spec.imagenet_top1 is not None and 50 < spec.imagenet_top1 < 100, spec.name
            assert spec.imagenet_top1_source, spec.name


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """3 classes x 9 images of 24 px: a bright square top-left, bottom-right, or none."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c, corner in enumerate(("tl", "br", "none")):
        (root / corner).mkdir()
        for i in range(9):
            img = rng.integers(0, 60, size=(24, 24, 3), dtype=np.uint8)
            if corner == "tl":
                img[2:10, 2:10] = 250
            elif corner == "br":
                img[14:22, 14:22] = 250
            Image.fromarray(img).save(root / corner / f"{i}.png")
    return root


POOL = "test_efficientnet,test_resnet"  # tiny timm models with automatic taps, random weights


@pytest.mark.slow
def test_budget_drops_slow_backbones_before_extraction(tiny_dataset, tmp_path, monkeypatch):
    latencies = {"test_efficientnet": 2.0, "test_resnet": 50.0}
    monkeypatch.setattr(search, "measure_latency",
                        lambda path, *a, **k: {"p50_ms": latencies[path.name.rsplit("-", 2)[0]]})
    report = search.search_models(tiny_dataset, tmp_path / "out", pool=POOL.split(","),
                                  weights={"test_efficientnet": "random", "test_resnet": "random"},
                                  budget_ms=10.0, target_size=64, proxies=("knn", "knn_all"))
    by = {c.name: c for c in report.candidates}
    assert by["test_efficientnet"].eligible and by["test_efficientnet"].scores
    slow = by["test_resnet"]
    assert slow.status == "over budget" and "p50 50.0 ms > budget 10 ms" in slow.reason
    assert not slow.scores and not (tmp_path / "out" / "features" / "test_resnet-T64-random").exists()
    assert all("test_resnet" not in r["picks"] for r in report.strategies)
    monkeypatch.setattr(search, "measure_latency", lambda *a, **k: {"p50_ms": 99.0})
    with pytest.raises(SearchError, match="no backbone is left"):
        search.search_models(tiny_dataset, tmp_path / "out", pool=["test_efficientnet"],
                             weights={"test_efficientnet": "random"}, budget_ms=1.0, target_size=64)


@pytest.mark.slow
def test_cli_search_writes_table_json_plot_and_regrets(tiny_dataset, tmp_path):
    from h2t_edge.cli import cli

    out = tmp_path / "search"
    result = CliRunner().invoke(cli, [
        "search", str(tiny_dataset), "--pool", POOL, "--weights", "test_efficientnet=random",
        "--weights", "test_resnet=random", "-T", "64", "--fit", "2", "--budget-ms", "5000",
        "--latency-repeat", "5", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "test_efficientnet" in result.output and "hybrid_linear" in result.output
    assert "regret" in result.output
    data = json.loads((out / "search.json").read_text())
    assert data["format"] == "h2t-edge/model-search" and len(data["candidates"]) == 2
    for c in data["candidates"]:
        assert c["status"] == "ok" and c["latency_ms"] > 0 and set(c["scores"]) == set(search.PROXIES)
        assert 0 <= c["fit"]["accuracy"] <= 1
    # random weights have no ImageNet top-1: the task-agnostic strategy picks nothing
    assert all(not r["picks"] and r["regret"] is None for r in data["strategies"] if r["strategy"] == "imagenet_top1")
    regrets = [r["regret"] for r in data["strategies"] if r["strategy"] != "imagenet_top1"]
    assert all(r is not None and r >= 0 for r in regrets) and min(regrets) == 0
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_search_errors_are_one_line(tiny_dataset, tmp_path):
    from h2t_edge.cli import cli

    result = CliRunner().invoke(cli, ["search", str(tiny_dataset), "--pool", "resnet50", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "no backbone in the pool has offline weights" in str(result.exception or result.output)
