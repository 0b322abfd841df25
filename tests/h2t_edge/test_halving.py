"""Successive halving (issue 29): the rung per T and which T advance (`train.protocol.advance`),
the rung fit (`fit_head2toe_path(rung=True)`), and the stop of CV retraining along F
(`path.retrain_cv_along_f`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_select import INFORMATIVE, synthetic  # noqa: E402  (same folder, on sys.path)

from h2t_edge.selection import PathSettings, SearchGrid, fit_head2toe_path, stratified_folds
from h2t_edge.selection import path as path_mod
from h2t_edge.selection.grid import F_STOP_PATIENCE, RUNG_MAX_FRACTION
from h2t_edge.selection.path import retrain_cv_along_f, retrain_heads
from h2t_edge.train.protocol import advance


def rung(t, acc, se):
    return {"target_size": t, "cv_accuracy": acc, "cv_se": se}


def test_advance_keeps_the_best_and_those_within_the_margin():
    rows = [rung(512, 0.94, 0.01), rung(2048, 0.954, 0.01), rung(8192, 0.93, 0.02)]
    assert advance(rows, 2.0) == {512, 2048}  # 0.954 - 2 x 0.01 = 0.934: T8192 (0.93) drops, T512 (0.94) stays
    assert advance(rows, 0.0) == {2048}
    assert advance(rows, 10.0) == {512, 2048, 8192}
    # the margin is the best rung's SE, not the candidate's
    assert advance([rung(512, 0.95, 0.0), rung(2048, 0.90, 0.2)], 2.0) == {512}
    assert advance([rung(512, 0.9, 0.0), rung(2048, 0.9, 0.0)], 0.0) == {512, 2048}  # a tie advances both


def test_search_grid_checks_the_margins():
    with pytest.raises(Exception, match="halving"):
        SearchGrid(halving=-1.0)
    with pytest.raises(Exception, match="f_stop"):
        SearchGrid(f_stop=-0.5)
    grid = SearchGrid(tap_budgets=(1, 2), choice="cheapest").rung()
    assert max(grid.fractions) <= RUNG_MAX_FRACTION and grid.tap_budgets == () and grid.choice == "accuracy"
    assert SearchGrid(fractions=(0.05, 0.1)).rung().fractions == (0.05,)  # at least the smallest


def test_rung_cross_validates_one_point_at_small_fractions_without_a_refit():
    x, y = synthetic(150, dim=400, seed=2, signal=2.0)
    grid = SearchGrid(fractions=(0.005, 0.02, 0.1, 0.25), folds=3)
    stats: dict = {}
    results = fit_head2toe_path(x, y, 3, grid, keep=np.arange(5), rung=True, stats=stats)
    assert list(results) == ["HEAD2TOE"]  # HEAD2TOE only: the kept variant is not a rung's business
    result = results["HEAD2TOE"]
    assert result.head is None and result.scores is None and result.config["rung"] is True
    assert {row["fraction"] for row in result.cv_table} == {0.005, 0.02}
    last = fit_head2toe_path(x, y, 3, grid)["HEAD2TOE"].cv_table  # the full fit's rows at the last point
    assert {row["l21"] for row in result.cv_table} == {min(row["l21"] for row in last)}
    full = {(r["l21"], r["fraction"]): r["val_acc_mean"] for r in last}
    for row in result.cv_table:  # the full fit's heads at that point (the same path; up to float summation order)
        assert row["val_acc_mean"] == pytest.approx(full[(row["l21"], row["fraction"])], abs=0.02)
    assert result.config["fraction"] in (0.005, 0.02) and 0.0 < result.config["n_features"] <= 8


def test_a_rungs_cv_path_serves_the_full_fit_and_only_that_fit(monkeypatch):
    """The rung leaves its CV path in the memo; the full fit on the same matrix takes it (no second
    CV path) and gives the result it gives alone; other data or folds solve their own."""
    x, y = synthetic(150, dim=400, seed=2, signal=2.0)
    grid = SearchGrid(fractions=(0.005, 0.02, 0.1, 0.25), folds=3)
    stages = []
    real = path_mod.group_lasso_path
    monkeypatch.setattr(path_mod, "group_lasso_path", lambda *a, **k: stages.append(k["stage"]) or real(*a, **k))
    memo: dict = {}
    fit_head2toe_path(x, y, 3, grid, rung=True, memo=memo)
    reused = fit_head2toe_path(x, y, 3, grid, keep=np.arange(5), memo=memo)
    assert stages == ["path cv", "path refit"]
    alone = fit_head2toe_path(x, y, 3, grid, keep=np.arange(5))
    assert stages[2:] == ["path cv", "path refit"]
    for name, result in alone.items():
        assert reused[name].cv_table == result.cv_table
        np.testing.assert_array_equal(reused[name].head.features, result.head.features)
        np.testing.assert_allclose(reused[name].head.weight, result.head.weight, rtol=1e-5, atol=1e-6)
    stages.clear()
    fit_head2toe_path(x * 2.0, y, 3, grid, rung=True, memo=memo)  # other features
    fit_head2toe_path(x, y, 3, SearchGrid(fractions=grid.fractions, folds=3, seed=1), rung=True, memo=memo)  # folds
    assert stages == ["path cv", "path cv"]


def _cv_problem(n=90, dim=300):
    x, y = synthetic(n, dim=dim, seed=5, signal=2.5)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    onehot = torch.nn.functional.one_hot(yt, 3).float()
    folds = torch.from_numpy(stratified_folds(y, 3, seed=0))
    val = folds.unsqueeze(0) == torch.arange(3).unsqueeze(1)
    # the informative columns first, then noise: wide heads only add noise
    noise = np.setdiff1d(np.arange(dim), INFORMATIVE)
    order = torch.from_numpy(np.concatenate([INFORMATIVE[INFORMATIVE < dim], noise]))
    columns = order.expand(3, -1).contiguous()
    return xt, onehot, yt, (~val).float(), val, columns


def test_stopping_along_f_keeps_the_nested_heads_accuracy_on_the_sizes_it_ran():
    x, onehot, y, train, val, columns = _cv_problem()
    ks = [3, 6, 12, 50, 150, 300]
    settings = PathSettings(retrain_iters=60)
    _, full = retrain_heads(x, onehot, train, columns, ks, settings, val, y)
    stopped = retrain_cv_along_f(x, onehot, train, val, y, columns, ks, 3, 0.0, settings)
    f = stopped.shape[1]
    assert F_STOP_PATIENCE <= f < len(ks)  # the noise-only sizes turned accuracy down: the widest never ran
    torch.testing.assert_close(stopped, full[:, :f], atol=1.0 / 30, rtol=0)  # <= one val row in a fold
    assert torch.equal(retrain_cv_along_f(x, onehot, train, val, y, columns, ks, 3, None, settings), full)


@pytest.mark.parametrize("scores, margin, ran", [
    ([0.6, 0.8, 0.7, 0.7, 0.9], 0.0, 4),  # two sizes in a row below the best: stop
    ([0.6, 0.8, 0.7, 0.8, 0.7, 0.9], 0.0, 6),  # a size back at the best resets the count
    ([0.6, 0.8, 0.78, 0.78, 0.9], 1.0, 5),  # within the margin (SE 0.05): not "clearly" down
    ([0.6, 0.8, 0.6, 0.6, 0.9], 1.0, 4),
])
def test_stop_rule_needs_patience_sizes_clearly_below_the_best(monkeypatch, scores, margin, ran):
    """Scripted accuracies (3 folds, one point; fold spread +-0.05 around the score: SE 0.05)."""
    calls = []

    def scripted(x, onehot, mask, columns, ks, settings, val_mask, labels, *args, **kwargs):
        calls.append(list(ks))
        return None, torch.tensor([[scores[k - 1] + d for k in ks] for d in (-0.05 * 1.5 ** 0.5, 0.0,
                                                                              0.05 * 1.5 ** 0.5)], dtype=torch.float64)

    monkeypatch.setattr(path_mod, "retrain_heads", scripted)
    ks = list(range(1, len(scores) + 1))
    acc = retrain_cv_along_f(None, None, None, None, None, torch.zeros(3, len(ks), dtype=torch.int64), ks, 3,
                             margin)
    assert acc.shape == (3, ran)
    assert torch.allclose(acc[1], torch.tensor(scores[:ran], dtype=torch.float64))
    computed = [k for call in calls for k in call]
    assert computed == ks[:len(computed)] and ran <= len(computed) < ran + F_STOP_PATIENCE  # no later group ran


@pytest.mark.parametrize("n", range(1, 10))
def test_f_groups_cover_every_size_once_with_the_widest_together(n):
    groups = path_mod._f_groups(n, F_STOP_PATIENCE)
    assert [i for g in groups for i in g] == list(range(n))
    assert all(len(g) == F_STOP_PATIENCE for g in groups[1:]) and 1 <= len(groups[0]) <= F_STOP_PATIENCE
