"""The group-lasso path engine (`h2t_edge.selection.path`): its solver against a slow float64
reference, its ranking, its retraining, `fit_head2toe_path`'s contract and CV accuracy next to the
Adam engine, and its errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from h2t_edge.core.errors import FitError
from h2t_edge.selection import (
    HEAD2TOE_KEEP,
    PathSettings,
    SearchGrid,
    fit_head2toe_path,
    fit_head2toe_variants,
    predict_logits,
    stratified_folds,
)
from h2t_edge.selection import path as path_mod
from h2t_edge.selection.path import (
    group_lasso_objective,
    group_lasso_path,
    lambda_max,
    lambda_path,
    retrain_heads,
)

# the synthetic task and small grid of the Adam engine's tests: one definition for both engines
from test_select import INFORMATIVE, small_grid, synthetic  # noqa: E402  (same folder, on sys.path)


def tensors(x, y, n_classes=3):
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    return xt, yt, torch.nn.functional.one_hot(yt, n_classes).float()


def reference_group_lasso(x: np.ndarray, y: np.ndarray, n_classes: int, lam: float, iters: int = 20000):
    """Plain proximal gradient (ISTA) in float64 on the raw features with an unpenalized intercept:
    step 1 / L with L = 0.5 * ||[X, 1]||_2^2 / n (a global bound on the CE Hessian), no momentum,
    no working set, no centring. Returns (w [D, C], b [C], KKT residual / lam)."""
    n = x.shape[0]
    xa = np.hstack([x.astype(np.float64), np.ones((n, 1))])
    onehot = np.eye(n_classes)[y]
    step = 1.0 / (0.5 * np.linalg.norm(xa, 2) ** 2 / n)
    wb = np.zeros((xa.shape[1], n_classes))

    def grad(wb):
        logits = xa @ wb
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return xa.T @ (p - onehot) / n

    for _ in range(iters):
        v = wb - step * grad(wb)
        norms = np.linalg.norm(v[:-1], axis=1, keepdims=True)
        v[:-1] *= np.maximum(0.0, 1.0 - step * lam / np.maximum(norms, 1e-300))
        wb = v
    g = grad(wb)
    w = wb[:-1]
    norms = np.linalg.norm(w, axis=1)
    active = norms > 0
    kkt = np.concatenate([np.linalg.norm(g[:-1][active] + lam * w[active] / norms[active, None], axis=1),
                          np.maximum(0.0, np.linalg.norm(g[:-1][~active], axis=1) - lam),
                          np.abs(g[-1])])
    return w, wb[-1], float(kkt.max() / lam)


@pytest.fixture(scope="module")
def reference_problem():
    x, y = synthetic(120, dim=60, seed=3, signal=2.0)
    xt, _, onehot = tensors(x, y)
    lam = 0.15 * lambda_max(xt, onehot, torch.ones(1, 120))
    w, b, kkt = reference_group_lasso(x, y, 3, lam)
    assert kkt < 1e-6, "the reference solver must be converged for the comparison to mean anything"
    return x, y, lam, w, b


# ----------------------------------------------------------------------------- the solver


def test_path_solution_matches_a_slow_float64_reference(reference_problem):
    """Tight settings: objective within 1e-5 (relative) and the same support as plain ISTA."""
    x, y, lam, w_ref, b_ref = reference_problem
    xt, yt, onehot = tensors(x, y)
    # a working set of 4 rows to start with: the KKT check must bring in the other active rows
    tight = PathSettings(tol=1e-5, kkt_tol=0.0, max_iter=20000, patience=10**6, ws_min=4)
    path = group_lasso_path(xt, onehot, torch.ones(1, len(y)), [lam], settings=tight)
    assert path.kkt_rounds[0] > 1
    w, b = path.weight[:, 0].double(), path.bias[0].double()
    ours = group_lasso_objective(xt.double(), yt, w, b, lam)
    ref = group_lasso_objective(xt.double(), yt, torch.from_numpy(w_ref), torch.from_numpy(b_ref), lam)
    assert abs(ours - ref) <= 1e-5 * ref
    ref_norms, our_norms = np.linalg.norm(w_ref, axis=1), w.norm(dim=1).numpy()
    assert 10 <= np.count_nonzero(ref_norms) < 30  # a sparse, nontrivial solution (15 of 60 rows)
    np.testing.assert_array_equal(our_norms > 0, ref_norms > 0)
    np.testing.assert_allclose(our_norms, ref_norms, atol=2e-3 * ref_norms.max())


def test_default_stopping_rule_is_near_the_optimum_along_a_path(reference_problem):
    """Default settings (tol 5% of lambda, top-k early stop), reached along a warm-started path:
    the objective is within 0.2% of the reference and the support's large rows agree."""
    x, y, lam, w_ref, b_ref = reference_problem
    xt, yt, onehot = tensors(x, y)
    lams = [lam * r for r in (3.0, 2.0, 1.5, 1.0)]
    lams = [min(v, lambda_max(xt, onehot, torch.ones(1, len(y))) * 0.99) for v in lams]
    path = group_lasso_path(xt, onehot, torch.ones(1, len(y)), lams, ks=(2, 6),
                            settings=dataclasses.replace(PathSettings(), ws_min=8))
    w, b = path.weight[:, 0].double(), path.bias[0].double()
    ours = group_lasso_objective(xt.double(), yt, w, b, lam)
    ref = group_lasso_objective(xt.double(), yt, torch.from_numpy(w_ref), torch.from_numpy(b_ref), lam)
    assert ref <= ours <= ref * 1.002
    big = np.linalg.norm(w_ref, axis=1) > 0.1 * np.linalg.norm(w_ref, axis=1).max()
    assert np.all(w.norm(dim=1).numpy()[big] > 0)
    assert len(path.iterations) == 4 and all(it >= 1 for it in path.iterations)


def test_folds_batched_on_one_axis_equal_each_fold_alone():
    x, y = synthetic(150, dim=60, seed=1)
    xt, _, onehot = tensors(x, y)
    folds = torch.from_numpy(stratified_folds(y, 3, seed=0))
    masks = torch.stack([(folds != f).float() for f in range(3)])
    lams = lambda_path(lambda_max(xt, onehot, torch.ones(1, 150)), PathSettings(n_lambdas=4, lambda_ratio=0.1))
    tight = PathSettings(tol=1e-5, kkt_tol=0.0, max_iter=20000, patience=10**6)
    together = group_lasso_path(xt, onehot, masks, lams, settings=tight)
    for f in range(3):
        alone = group_lasso_path(xt, onehot, masks[f:f + 1], lams, settings=tight)
        torch.testing.assert_close(together.norms[:, f], alone.norms[:, 0], atol=2e-4, rtol=1e-3)


def test_screened_models_keep_rows_outside_their_candidates_at_zero():
    x, y = synthetic(120, dim=50, seed=2)
    xt, _, onehot = tensors(x, y)
    allowed = torch.zeros(50, 2, dtype=torch.bool)
    allowed[::2, 0] = True  # model 0: even columns; model 1: all
    allowed[:, 1] = True
    lams = lambda_path(lambda_max(xt, onehot, torch.ones(1, 120)), PathSettings(n_lambdas=5, lambda_ratio=0.05))
    path = group_lasso_path(xt, onehot, torch.ones(2, 120), lams, allowed=allowed)
    assert torch.all(path.norms[:, 0, 1::2] == 0) and torch.all(path.grad_norms[:, 0, 1::2] == 0)
    assert torch.any(path.norms[-1, 0, ::2] > 0) and torch.any(path.norms[-1, 1, 1::2] > 0)
    ranked = path.ranking(len(lams) - 1, allowed)[0]
    assert torch.all(ranked[:25] % 2 == 0)  # disallowed columns rank last


# ----------------------------------------------------------------------------- ranking


def test_ranking_finds_the_informative_columns_first():
    x, y = synthetic(300)
    xt, _, onehot = tensors(x, y)
    folds = torch.from_numpy(stratified_folds(y, 3, seed=0))
    masks = torch.stack([(folds != f).float() for f in range(3)])
    lams = lambda_path(lambda_max(xt, onehot, torch.ones(1, 300)), PathSettings())
    path = group_lasso_path(xt, onehot, masks, lams, ks=(6, 20))
    for j in (4, len(lams) - 1):
        ranked = path.ranking(j)
        for m in range(3):
            np.testing.assert_array_equal(np.sort(ranked[m, :6].numpy()), INFORMATIVE)


def test_ranking_breaks_ties_by_entry_point_then_gradient():
    """Zero rows at point j: those that entered earlier first, then by ||grad_d|| at j."""
    from h2t_edge.selection.path import GroupLassoPath

    norms = torch.tensor([[[0.0, 0.0, 2.0, 0.0, 0.0, 0.0]],   # point 0: column 2 active
                          [[0.0, 1.0, 3.0, 0.0, 0.0, 0.0]],   # point 1: column 1 enters
                          [[0.0, 0.0, 4.0, 0.5, 0.0, 0.0]]])  # point 2: 1 drops out, 3 enters
    grads = torch.tensor([[[0.0] * 6], [[0.0] * 6], [[0.3, 0.2, 1.0, 1.0, 0.1, 0.8]]])
    path = GroupLassoPath([3.0, 2.0, 1.0], norms, grads, torch.zeros(6, 1, 2), torch.zeros(1, 2))
    # 2 (norm 4), 3 (0.5), then zeros: 1 (entered at point 1, despite its small gradient), then by
    # gradient 5 (0.8), 0 (0.3), 4 (0.1)
    assert path.ranking(2)[0].tolist() == [2, 3, 1, 5, 0, 4]


# ----------------------------------------------------------------------------- retraining


def test_nested_retraining_equals_retraining_each_prefix_alone():
    x, y = synthetic(90, dim=50, seed=4)
    xt, yt, onehot = tensors(x, y)
    folds = torch.from_numpy(stratified_folds(y, 3, seed=0))
    masks = torch.stack([(folds != 0).float(), (folds != 2).float()])
    columns = torch.stack([torch.randperm(50, generator=torch.Generator().manual_seed(s))[:20] for s in range(2)])
    settings = PathSettings(retrain_iters=60)
    heads, acc = retrain_heads(xt, onehot, masks, columns, [2, 7, 20], settings, ~masks.bool(), yt)
    assert acc.shape == (2, 3) and torch.all((acc >= 0) & (acc <= 1))
    for f, k in enumerate([2, 7, 20]):
        (alone,), _ = retrain_heads(xt, onehot, masks, columns[:, :k], [k], settings)
        torch.testing.assert_close(heads[f][0], alone[0], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(heads[f][1], alone[1], atol=1e-4, rtol=1e-3)


def _wide_problem(n=120, dim=400, n_classes=4, models=3, seed=6):
    """More columns than rows (the dual form's case), columns of very different scales and offsets,
    a few informative ones, and models with different training rows and column orders."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=gen)
    x = torch.randn(n, dim, generator=gen) * torch.rand(dim, generator=gen) * 4 + torch.randn(dim, generator=gen)
    x[:, :20] += torch.nn.functional.one_hot(y, n_classes).float() @ torch.randn(n_classes, 20, generator=gen)
    folds = torch.arange(n) % models
    val = folds.unsqueeze(0) == torch.arange(models).unsqueeze(1)
    columns = torch.stack([torch.randperm(dim, generator=gen) for _ in range(models)])
    return x, y, torch.nn.functional.one_hot(y, n_classes).float(), (~val).float(), val, columns


@pytest.mark.parametrize("ks", [[5, 60, 250, 400], [400]])
def test_dual_retraining_gives_the_primal_heads(ks):
    """The dual form (Gram matrices, A with W = X~^T A) takes the primal's steps: the same weights,
    intercepts and validation accuracy, up to float32 summation order."""
    x, y, onehot, train, val, columns = _wide_problem()
    out = {form: retrain_heads(x, onehot, train, columns, ks, PathSettings(retrain_iters=80, retrain_form=form),
                               val, y) for form in ("primal", "dual")}
    (primal, acc_p), (dual, acc_d) = out["primal"], out["dual"]
    torch.testing.assert_close(acc_d, acc_p, atol=1.5 / val.sum(1).min().item(), rtol=0)  # a borderline row at most
    assert float(acc_p.mean()) > 1.5 / onehot.shape[1]  # the heads learned something
    for (wp, bp), (wd, bd) in zip(primal, dual):
        torch.testing.assert_close(wd, wp, atol=2e-3 * float(wp.abs().max()), rtol=0)
        torch.testing.assert_close(bd, bp, atol=2e-3 * float(bp.abs().max()) + 1e-4, rtol=0)


def test_auto_form_splits_narrow_primal_from_wide_dual_heads():
    x, y, onehot, train, val, columns = _wide_problem(n=60, dim=2000)
    ks = [4, 30, 500, 2000]
    split = path_mod._dual_from(60, ks, 4, PathSettings())
    assert 0 < split < len(ks)  # narrow heads primal, wide heads dual
    assert path_mod._dual_from(60, ks, 4, PathSettings(retrain_form="primal")) == len(ks)
    assert path_mod._dual_from(60, ks, 4, PathSettings(retrain_form="dual")) == 0
    assert path_mod._dual_from(50_000, ks, 4, PathSettings()) == len(ks)  # n x n Gram matrices: too big
    auto = retrain_heads(x, onehot, train, columns, ks, PathSettings(retrain_iters=40), val, y)
    primal = retrain_heads(x, onehot, train, columns, ks, PathSettings(retrain_iters=40, retrain_form="primal"), val, y)
    for (wa, ba), (wp, bp) in zip(auto[0], primal[0]):
        torch.testing.assert_close(wa, wp, atol=2e-3 * float(wp.abs().max()), rtol=0)
    torch.testing.assert_close(auto[1], primal[1], atol=1.5 / val.sum(1).min().item(), rtol=0)


def test_retraining_without_weights_gives_the_same_accuracy():
    x, y, onehot, train, val, columns = _wide_problem()
    settings = PathSettings(retrain_iters=30)
    heads, acc = retrain_heads(x, onehot, train, columns, [10, 400], settings, val, y)
    none, acc_only = retrain_heads(x, onehot, train, columns, [10, 400], settings, val, y, weights=False)
    assert none is None and heads is not None
    torch.testing.assert_close(acc_only, acc)


def test_retraining_converges_to_the_standardized_ridge_optimum():
    """Many steps reach the stated objective: mean CE + l2 / 2 * ||s * W||^2 (s: column stds)."""
    x, y = synthetic(120, dim=30, seed=5)
    xt, yt, onehot = tensors(x, y)
    cols = torch.arange(0, 30, 3)
    l2 = 1e-2
    (head,), _ = retrain_heads(xt, onehot, torch.ones(1, 120), cols.unsqueeze(0), [10],
                               PathSettings(retrain_iters=3000, retrain_l2=l2))
    xs = xt[:, cols].double()
    scale = xs.std(0, unbiased=False)

    def objective(w, b):
        return torch.nn.functional.cross_entropy(xs @ w + b, yt) + l2 / 2 * ((scale[:, None] * w) ** 2).sum()

    w_ref = torch.zeros(10, 3, dtype=torch.float64, requires_grad=True)
    b_ref = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w_ref, b_ref], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(w_ref, b_ref)
        loss.backward()
        return loss

    opt.step(closure)
    ours = float(objective(head[0][0].double(), head[1][0].double()))
    assert ours <= float(objective(w_ref, b_ref).detach()) * (1 + 1e-4)
    torch.testing.assert_close(head[0][0].double(), w_ref.detach(), atol=2e-2 * float(w_ref.detach().abs().max()), rtol=0)


# ----------------------------------------------------------------------------- the estimator


@pytest.fixture(scope="module")
def path_fit():
    x, y = synthetic(300)
    stats: dict = {}
    results = fit_head2toe_path(x, y, 3, small_grid(), keep=np.arange(390, 400), stats=stats)
    return results, stats


def test_fit_returns_both_variants_with_valid_heads(path_fit):
    results, _ = path_fit
    assert set(results) == {"HEAD2TOE", HEAD2TOE_KEEP}
    for name, result in results.items():
        head, config = result.head, result.config
        assert result.method == name
        k = config["n_features"]
        assert head.weight.shape == (k, 3) and head.weight.dtype == np.float32
        assert head.bias.shape == (3,) and head.bias.dtype == np.float32
        assert np.all(np.isfinite(head.weight)) and np.all(np.isfinite(head.bias))
        assert head.features.dtype == np.int64 and len(head.features) == k
        assert np.all(np.diff(head.features) > 0)  # sorted and unique
        assert {"l21", "lr", "steps", "fraction", "n_features", "folds", "seed", "screened_to",
                "engine"} <= config.keys()
        assert config["engine"] == "path" and config["screened_to"] is None
        assert result.scores.shape == (400,) and result.scores.dtype == np.float32
        assert result.fit_seconds > 0
    kept = results[HEAD2TOE_KEEP]
    assert set(range(390, 400)) <= set(kept.head.features)
    assert kept.config["kept_columns"] == 10
    assert kept.config["n_features"] == 10 + max(1, int(400 * kept.config["fraction"]))


def test_fit_selects_the_informative_columns(path_fit):
    result = path_fit[0]["HEAD2TOE"]
    assert result.config["fraction"] == 0.015  # 6 of 400 columns
    np.testing.assert_array_equal(result.head.features, INFORMATIVE)
    np.testing.assert_array_equal(np.sort(np.argsort(-result.scores)[:6]), INFORMATIVE)
    x_test, y_test = synthetic(600, seed=7)
    assert (predict_logits(result.head, x_test).argmax(1) == y_test).mean() > 0.85


def test_cv_tables_have_one_row_per_cv_point_and_fraction(path_fit):
    results, stats = path_fit
    points = PathSettings().cv_points()
    assert stats["cv_points"] == points and len(stats["lambdas"]) == PathSettings().n_lambdas
    for name, result in results.items():
        table = result.cv_table
        assert len(table) == len(points) * len(small_grid().fractions)
        assert {row["l21"] for row in table} == {stats["lambdas"][j] for j in points}
        for row in table:
            assert {"method", "penalty", "l21", "lr", "steps", "fraction", "n_features", "val_acc_mean",
                    "val_acc_std"} <= row.keys()
            assert row["method"] == name and row["penalty"] is None
            assert 0.0 <= row["val_acc_mean"] <= 1.0
        # the config names exactly one row: the best (what `train` looks up)
        chosen = [r for r in table if all(r[k] == result.config[k] for k in ("lr", "steps", "l21", "fraction"))]
        assert len(chosen) == 1 and chosen[0]["val_acc_mean"] == max(r["val_acc_mean"] for r in table)


def test_stats_report_the_solver_work(path_fit):
    _, stats = path_fit
    for stage in ("cv", "refit"):
        assert len(stats[stage]["iterations"]) == len(stats[stage]["working_set"]) >= 1
        assert all(it >= 1 for it in stats[stage]["iterations"])
    assert set(stats["seconds"]) == {"path cv", "retrain cv", "path refit", "retrain refit"}


def test_cv_accuracy_is_within_a_few_points_of_the_adam_engine():
    x, y = synthetic(300, signal=1.2)
    grid = small_grid(l21s=(1e-3, 1e-5))
    path = fit_head2toe_path(x, y, 3, grid)["HEAD2TOE"]
    adam = fit_head2toe_variants(x, y, 3, grid)["HEAD2TOE"]

    def best(result):
        return max(row["val_acc_mean"] for row in result.cv_table)

    assert abs(best(path) - best(adam)) <= 0.05  # measured: 77.3 vs 80.3 %
    x_test, y_test = synthetic(600, seed=9, signal=1.2)
    tests = [(predict_logits(r.head, x_test).argmax(1) == y_test).mean() for r in (path, adam)]
    assert tests[0] >= tests[1] - 0.04  # measured: 77.7 vs 79.2 %


def test_screened_fit_uses_each_folds_candidates():
    x, y = synthetic(240, dim=3000, seed=6, signal=2.5)
    grid = small_grid(fractions=(0.001, 0.002, 0.05), max_candidates=64)
    result = fit_head2toe_path(x, y, 3, grid)["HEAD2TOE"]
    assert result.config["screened_to"] == 64
    assert {row["fraction"] for row in result.cv_table} == {0.001, 0.002}  # 0.05 keeps 150 > 64
    assert set(result.head.features) <= set(INFORMATIVE) and len(result.head.features) >= 3
    assert np.count_nonzero(result.scores) <= 64


def test_progress_reports_every_stage():
    x, y = synthetic(90, dim=40)
    seen = set()
    fit_head2toe_path(x, y, 3, small_grid(), lambda stage, done, total: seen.add(stage) if done == total else None)
    assert {"path cv", "retrain cv HEAD2TOE", "path refit", "retrain refit HEAD2TOE"} <= seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare CUDA and CPU fits")
def test_cuda_fit_matches_cpu_fit():
    x, y = synthetic(300)
    cpu = fit_head2toe_path(x, y, 3, small_grid())["HEAD2TOE"]
    cuda = fit_head2toe_path(x, y, 3, small_grid(), device="cuda")["HEAD2TOE"]
    np.testing.assert_array_equal(cuda.head.features, cpu.head.features)
    assert cuda.config["l21"] == pytest.approx(cpu.config["l21"], rel=1e-4)
    for a, b in zip(cuda.cv_table, cpu.cv_table):
        assert abs(a["val_acc_mean"] - b["val_acc_mean"]) <= 0.02
    np.testing.assert_allclose(cuda.head.weight, cpu.head.weight, rtol=1e-2, atol=1e-2 * np.abs(cpu.head.weight).max())


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("corrupt, match", [
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), y), "NaN"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 0, 3, y)), "label 3"),
    (lambda x, y: (x, y[:-1]), "does not match"),
    (lambda x, y: (x[0], y), "2-D"),
    (lambda x, y: (x[:14], np.r_[np.zeros(12, int), 1, 2]), "fewer than the 3"),
])
def test_bad_input_raises_fit_error(corrupt, match):
    x, y = synthetic(30, dim=20)
    x, y = corrupt(x, y)
    with pytest.raises(FitError, match=match):
        fit_head2toe_path(x, y, 3, small_grid())


def test_bad_options_raise_fit_error():
    x, y = synthetic(60, dim=20)
    with pytest.raises(FitError, match="keep"):
        fit_head2toe_path(x, y, 3, small_grid(), keep=np.array([5, 20]))
    with pytest.raises(FitError, match="room"):
        fit_head2toe_path(x, y, 3, small_grid(fractions=(1.0,)), keep=np.arange(3))
    with pytest.raises(FitError, match="max_candidates"):
        fit_head2toe_path(x, y, 3, small_grid(fractions=(0.9,), max_candidates=5))
    with pytest.raises(FitError, match="fp32"):
        fit_head2toe_path(x, y, 3, dataclasses.replace(small_grid(), precision="bf16"))
    with pytest.raises(FitError, match="lambda_ratio"):
        PathSettings(lambda_ratio=1.5)
    with pytest.raises(FitError, match="positive"):
        PathSettings(retrain_iters=0)


def test_search_grid_solver_picks_the_engine_and_is_recorded(tmp_path):
    """`SearchGrid(solver="path")` (`--solver path`) routes HEAD2TOE to this engine through the
    paper engine's entry point, and the choice is in the task's config (task.json) and report.json."""
    import dataclasses
    import json

    from click.testing import CliRunner

    from h2t_edge.cli import cli
    from h2t_edge.selection import fit_head2toe_variants

    x, y = synthetic(120, dim=60)
    routed = fit_head2toe_variants(x, y, 3, small_grid(solver="path"))["HEAD2TOE"]
    direct = fit_head2toe_path(x, y, 3, small_grid())["HEAD2TOE"]
    np.testing.assert_array_equal(routed.head.features, direct.head.features)
    assert routed.config["engine"] == direct.config["engine"]
    assert SearchGrid().solver == "path" and small_grid().to_dict()["solver"] == "paper"  # path is the default
    with pytest.raises(FitError, match="solver"):
        SearchGrid(solver="newton")
    with pytest.raises(FitError, match="only the 'path' solver runs off the CPU"):
        SearchGrid(solver="paper", device="cuda")
    with pytest.raises(FitError, match="bf16.*--solver paper"):
        SearchGrid(precision="bf16")
    assert dataclasses.replace(small_grid(), solver="path", device="cuda").device == "cuda"

    from test_diagnose import _synthetic_cache  # the same folder: pytest puts it on sys.path

    cache = _synthetic_cache(tmp_path / "cache", n=60)
    result = CliRunner().invoke(cli, ["fit", str(cache.root), "-o", str(tmp_path / "task"), "--grid", "quick",
                                      "--solver", "path", "--method", "HEAD2TOE", "-q"])
    assert result.exit_code == 0, result.output
    task = json.loads((tmp_path / "task" / "head2toe" / "task.json").read_text())
    report = json.loads((tmp_path / "task" / "report.json").read_text())
    assert task["config"]["grid"]["solver"] == "path"
    assert report["methods"]["HEAD2TOE"]["config"]["grid"]["solver"] == "path"
