"""Head2Toe selection: the batched trainers against references, selection quality, CV, errors."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from h2t_edge.core.errors import FitError
from h2t_edge.selection import (
    LinearHead,
    SearchGrid,
    fit_head2toe,
    fit_linear,
    fit_regularized,
    predict_logits,
    stratified_folds,
)
from h2t_edge.selection.grid import CVData, batch_schedule
from h2t_edge.selection.kernels import (
    Matmul,
    run_wide,
    train_heads,
    train_nested_group,
    train_screened_group,
    train_wide_group,
)
from h2t_edge.selection.screening import screen_candidates, strong_rule_scores

INFORMATIVE = np.array([3, 97, 180, 251, 330, 399])  # spread over the index range


def synthetic(n: int, dim: int = 400, n_classes: int = 3, seed: int = 0, signal: float = 1.5):
    """Only INFORMATIVE columns depend on the label (column j shifts class j % C); rest is noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    rng.shuffle(y)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    for j, col in enumerate(INFORMATIVE[INFORMATIVE < dim]):
        x[:, col] += signal * (y == j % n_classes)
    return (x / np.sqrt(dim)).astype(np.float32), y.astype(np.int64)


def small_grid(**kw) -> SearchGrid:
    base = dict(lrs=(0.1,), steps=(200,), l21s=(1e-3,), penalties=(1e-4,),
                fractions=(0.005, 0.015, 0.05, 0.25), folds=3, batch_size=32, seed=0, solver="paper",
                f_stop=None)  # every F retrained: the tables' shapes are checked (test_halving: the stop)
    return SearchGrid(**{**base, **kw})


# ----------------------------------------------------------------------------- trainers


@pytest.mark.parametrize("penalty", [None, "l21", "l2", "l1"])
def test_batched_heads_equal_separate_training(penalty):
    x, y = synthetic(90, dim=40)
    folds = stratified_folds(y, 3, seed=1)
    mask = np.stack([folds != f for f in range(3)] + [np.ones(90, bool)])
    lrs, coefs = [0.1, 0.01, 0.1, 0.01], [1e-2, 1e-3, 1e-4, 1e-2]
    w_all, b_all = train_heads(x, y, 3, mask, lrs, 40, penalty=penalty, coefs=coefs,
                               batch_size=16, seed=3)
    assert w_all.shape == (4, 40, 3) and b_all.shape == (4, 3)
    for m in range(4):
        w, b = train_heads(x, y, 3, mask[m:m + 1], lrs[m:m + 1], 40, penalty=penalty,
                           coefs=coefs[m:m + 1], batch_size=16, seed=3)
        torch.testing.assert_close(w_all[m], w[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b_all[m], b[0], atol=1e-5, rtol=1e-4)
    assert w_all.abs().sum() > 0


@pytest.mark.parametrize("penalty", [None, "l21", "l2", "l1"])
def test_trainer_matches_torch_adam_with_cosine_schedule(penalty):
    x, y = synthetic(64, dim=12, n_classes=3, seed=2)
    steps, lr, coef, batch = 30, 0.05, 1e-2, 16
    weight, bias = train_heads(x, y, 3, np.ones((1, 64), bool), [lr], steps, penalty=penalty,
                               coefs=[coef], batch_size=batch, seed=5)

    head = torch.nn.Linear(12, 3)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for idx in batch_schedule(64, batch, steps, seed=5):
        loss = torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx])
        w = head.weight  # [C, D]: the rows of our W: [D, C] are its columns
        if penalty == "l21":
            loss = loss + coef * torch.linalg.vector_norm(w, dim=0).sum()
        elif penalty == "l2":
            loss = loss + coef * (w ** 2).sum()
        elif penalty == "l1":
            loss = loss + coef * w.abs().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(weight[0], head.weight.detach().t(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(bias[0], head.bias.detach(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shared", [0, 5])
def test_nested_retraining_equals_training_each_subset_alone(shared):
    """shared > 0: the models' first columns are common (HEAD2TOE+LINEAR's kept columns) and take
    the one-GEMM path; every head must still equal its own training."""
    x, y = synthetic(90, dim=50)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    onehot = torch.nn.functional.one_hot(yt, 3).float()
    folds = stratified_folds(y, 3, seed=0)
    mask = np.stack([folds != 0, folds != 2])
    columns = torch.stack([torch.randperm(50, generator=torch.Generator().manual_seed(s))[:20]
                           for s in range(2)])
    if shared:
        kept = torch.arange(40, 40 + shared)
        columns = torch.stack([torch.cat([kept, c[~torch.isin(c, kept)][:20 - shared]]) for c in columns])
    ks = [7, 12, 20] if shared else [2, 7, 20]
    batches = batch_schedule(90, 16, 30, seed=4)
    weights, biases, logits = train_nested_group(xt, onehot, torch.from_numpy(mask).float(), 0.05,
                                                  columns, ks, batches, None, "", 0, 1, shared=shared)
    for m in range(2):
        for f, k in enumerate(ks):  # the returned logits are each head on every row
            expected = x[:, columns[m, :k].numpy()] @ weights[f][m].numpy() + biases[f][m].numpy()
            np.testing.assert_allclose(logits[m, :, f].numpy(), expected, atol=1e-5)
    for m in range(2):
        for f, k in enumerate(ks):
            w, b = train_heads(x[:, columns[m, :k].numpy()], y, 3, mask[m:m + 1], [0.05], 30,
                               batch_size=16, seed=4)
            torch.testing.assert_close(weights[f][m], w[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(biases[f][m], b[0], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- bf16 GEMMs


def _bf16(a: torch.Tensor) -> np.ndarray:
    return a.to(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("op", ["mm", "bmm"])
def test_bf16_matmul_is_the_product_of_the_rounded_inputs(op):
    gen = torch.Generator().manual_seed(0)
    shape_a, shape_b = ((37, 300), (300, 11)) if op == "mm" else ((3, 37, 300), (3, 300, 11))
    a, b = torch.randn(shape_a, generator=gen), torch.randn(shape_b, generator=gen)
    out = torch.empty(*shape_a[:-1], shape_b[-1])
    matmul = Matmul(torch.bfloat16)
    for _ in range(2):  # the second call reuses the buffers
        matmul(getattr(torch, op), a.to(torch.bfloat16), b, out, "k")
    assert out.dtype == torch.float32
    reference = _bf16(a) @ _bf16(b)  # float64 product of the bf16-rounded inputs
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-2, atol=2e-2 * np.abs(reference).max())
    exact = a.double().numpy() @ b.double().numpy()
    assert np.abs(out.numpy() - exact).max() > 1e-4  # it really ran in bf16 (fp32 would be ~1e-5)


def test_bf16_nested_retraining_tracks_fp32_and_returns_its_own_logits():
    x, y = synthetic(120, dim=60)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    onehot = torch.nn.functional.one_hot(yt, 3).float()
    mask = torch.ones(2, 120)
    columns = torch.stack([torch.randperm(60, generator=torch.Generator().manual_seed(s))[:30] for s in range(2)])
    ks, batches = [3, 10, 30], batch_schedule(120, 16, 60, seed=1)
    runs = {dtype: train_nested_group(xt, onehot, mask, 0.05, columns, ks, batches, None, "", 0, 1, dtype)
            for dtype in (torch.float32, torch.bfloat16)}
    (w32, b32, _), (w16, b16, logits16) = runs[torch.float32], runs[torch.bfloat16]
    for f, k in enumerate(ks):
        scale = w32[f].abs().max()
        assert (w16[f] - w32[f]).abs().max() < 0.05 * scale  # same optimisation, bf16 rounding only
        for m in range(2):  # the returned logits are the heads applied to the bf16-rounded columns
            expected = _bf16(xt[:, columns[m, :k]]) @ w16[f][m].double().numpy() + b16[f][m].double().numpy()
            np.testing.assert_allclose(logits16[m, :, f].numpy(), expected, atol=2e-2 * np.abs(expected).max())


def test_bf16_fit_selects_like_fp32(head2toe_fit):
    x, y = synthetic(300)
    result = fit_head2toe(x, y, 3, small_grid(l21s=(1e-3, 1e-5), precision="bf16"))
    np.testing.assert_array_equal(result.head.features, head2toe_fit.head.features)
    cv = {(r["l21"], r["fraction"]): r["val_acc_mean"] for r in result.cv_table}
    for row in head2toe_fit.cv_table:
        assert abs(cv[(row["l21"], row["fraction"])] - row["val_acc_mean"]) <= 0.05


def test_bf16_without_native_support_warns(monkeypatch):
    from h2t_edge.selection import grid as select

    x, y = synthetic(60, dim=20)
    grid = small_grid(precision="bf16", steps=(5,), fractions=(0.25,))
    monkeypatch.setattr(select, "native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="without native bfloat16"):
        fit_linear(x, y, 3, grid)
    monkeypatch.setattr(select, "native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit_linear(x, y, 3, grid)


def test_unknown_precision_is_refused():
    with pytest.raises(FitError, match="precision"):
        SearchGrid(precision="fp16")


def test_nested_retraining_refuses_a_prefix_that_is_not_shared():
    x, y = synthetic(40, dim=20)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    columns = torch.stack([torch.arange(10), torch.arange(10, 20)])
    with pytest.raises(FitError, match="not common"):
        train_nested_group(xt, torch.nn.functional.one_hot(yt, 3).float(), torch.ones(2, 40), 0.05, columns,
                            [5, 10], batch_schedule(40, 8, 2, seed=0), None, "", 0, 1, shared=3)


def test_batch_schedule_is_shuffled_epochs():
    batches = batch_schedule(50, 16, 7, seed=0).numpy()
    assert batches.shape == (7, 16)
    epoch = batches[:3].ravel()  # 3 full batches per epoch, remainder dropped
    assert len(np.unique(epoch)) == 48
    assert not np.array_equal(batches[:3], batches[3:6])


def test_stratified_folds_balance_every_class():
    y = np.repeat(np.arange(4), [10, 11, 12, 30])
    folds = stratified_folds(y, 5, seed=0)
    for c in range(4):
        counts = np.bincount(folds[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 1


# ----------------------------------------------------------------------------- selection


def test_group_lasso_ranks_informative_features_first():
    x, y = synthetic(300)
    weight, _ = train_heads(x, y, 3, np.ones((1, 300), bool), [0.1], 300, penalty="l21",
                            coefs=[1e-3], batch_size=32, seed=0)
    scores = torch.linalg.vector_norm(weight[0], dim=1).numpy()
    top = np.sort(np.argsort(-scores)[:len(INFORMATIVE)])
    np.testing.assert_array_equal(top, INFORMATIVE)


@pytest.fixture(scope="module")
def head2toe_fit():
    x, y = synthetic(300)
    return fit_head2toe(x, y, 3, small_grid(l21s=(1e-3, 1e-5)))


def test_head2toe_recovers_informative_features_and_beats_linear_on_noise(head2toe_fit):
    result = head2toe_fit
    assert result.method == "HEAD2TOE"
    # F = 0.015 keeps 6 of 400 columns: exactly the informative ones
    assert result.config["fraction"] == 0.015
    np.testing.assert_array_equal(result.head.features, INFORMATIVE)
    np.testing.assert_array_equal(np.sort(np.argsort(-result.scores)[:6]), INFORMATIVE)

    x_test, y_test = synthetic(600, seed=7)
    h2t_acc = (predict_logits(result.head, x_test).argmax(1) == y_test).mean()
    noise = np.setdiff1d(np.arange(400), INFORMATIVE)[:200]
    x, y = synthetic(300)
    linear = fit_linear(x[:, noise], y, 3, small_grid())
    lin_acc = (predict_logits(linear.head, x_test[:, noise]).argmax(1) == y_test).mean()
    assert h2t_acc > 0.85
    assert lin_acc < 0.5 < h2t_acc - 0.3  # noise-only LINEAR stays near chance (1/3)


def test_cv_table_has_one_row_per_grid_point(head2toe_fit):
    result, grid = head2toe_fit, small_grid(l21s=(1e-3, 1e-5))
    table = result.cv_table
    assert len(table) == len(grid.l21s) * len(grid.lrs) * len(grid.steps) * len(grid.fractions)
    keys = {(r["l21"], r["lr"], r["steps"], r["fraction"]) for r in table}
    assert len(keys) == len(table)
    for row in table:
        assert {"method", "l21", "lr", "steps", "fraction", "n_features", "val_acc_mean",
                "val_acc_std"} <= row.keys()
        assert row["n_features"] == max(1, int(400 * row["fraction"]))
        assert 0.0 <= row["val_acc_mean"] <= 1.0
    best = max(r["val_acc_mean"] for r in table)
    assert any(r["val_acc_mean"] == best and r["fraction"] == result.config["fraction"]
               for r in table)


def test_refit_head_shapes_and_dtypes(head2toe_fit):
    head = head2toe_fit.head
    k = head2toe_fit.config["n_features"]
    assert head.weight.shape == (k, 3) and head.weight.dtype == np.float32
    assert head.bias.shape == (3,) and head.bias.dtype == np.float32
    assert head.features.dtype == np.int64
    assert np.all(np.diff(head.features) > 0)  # sorted and unique
    assert head2toe_fit.scores.shape == (400,) and head2toe_fit.scores.dtype == np.float32
    assert head2toe_fit.fit_seconds > 0


def test_predict_logits_uses_selected_columns():
    head = LinearHead(np.eye(2, dtype=np.float32), np.array([0.5, 0], np.float32),
                      np.array([1, 3]))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(predict_logits(head, x), [[1.5, 3], [5.5, 7]])


@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_regularized_baselines_fit_all_features(penalty):
    x, y = synthetic(150, dim=60)
    result = fit_regularized(x, y, 3, penalty, small_grid(penalties=(1e-4, 1e-3)))
    assert result.method == f"ALL-{penalty.upper()}"
    assert len(result.cv_table) == 2
    assert result.head.weight.shape == (60, 3)
    np.testing.assert_array_equal(result.head.features, np.arange(60))
    assert result.config["penalty"] in (1e-4, 1e-3)


def test_progress_reports_every_stage():
    x, y = synthetic(60, dim=40)
    seen = []
    fit_head2toe(x, y, 3, small_grid(steps=(30,)), progress=lambda *a: seen.append(a))
    stages = {s for s, _, _ in seen}
    assert any(s.startswith("cv") and "select" in s for s in stages)
    assert any("retrain" in s for s in stages) and any(s.startswith("refit") for s in stages)
    assert all(0 < done <= total for _, done, total in seen)


def test_grid_presets():
    paper = SearchGrid.paper()
    assert paper.folds == 5 and paper.steps == (500, 5000) and paper.lrs == (0.1, 0.01)
    assert paper.l21s == (1e-3, 1e-5) and len(paper.fractions) == 9
    assert SearchGrid.quick().steps == (500,) and SearchGrid.quick().folds == 3
    assert paper.to_dict()["fractions"] == list(paper.fractions)


# ----------------------------------------------------------------------------- errors


def test_float16_memmap_features(tmp_path):
    x, y = synthetic(60, dim=40)
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    ro = np.load(tmp_path / "f.npy", mmap_mode="r")
    result = fit_linear(ro, y, 3, small_grid(steps=(20,)))
    assert result.head.weight.shape == (40, 3)


@pytest.mark.parametrize("corrupt, match", [
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), y), "NaN"),
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 7, np.inf, x), y), "inf"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 0, 3, y)), "label 3"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 0, -1, y)), "label -1"),
    (lambda x, y: (x, y[:-1]), "does not match"),
    (lambda x, y: (x[0], y), "2-D"),
    (lambda x, y: (x, y.astype(np.float32)), "integer"),
    (lambda x, y: (x[:14], np.r_[np.zeros(12, int), 1, 2]), "fewer than the 3"),
])
def test_bad_input_raises_fit_error(corrupt, match):
    x, y = synthetic(30, dim=20)
    x, y = corrupt(x, y)
    with pytest.raises(FitError, match=match):
        fit_head2toe(x, y, 3, small_grid())


def test_bad_grid_raises_fit_error():
    with pytest.raises(FitError, match="folds"):
        SearchGrid(folds=1)
    with pytest.raises(FitError, match="fractions"):
        SearchGrid(fractions=(0.0, 0.1))
    with pytest.raises(FitError, match="max_candidates"):
        SearchGrid(max_candidates=0)
    x, y = synthetic(30, dim=20)
    with pytest.raises(FitError, match="penalty"):
        fit_regularized(x, y, 3, "l3", small_grid())


def test_rows_outside_a_models_mask_do_not_touch_it():
    x, y = synthetic(90, dim=30)
    mask = np.stack([np.arange(90) % 3 != 0, np.ones(90, bool)])
    w1, _ = train_heads(x, y, 3, mask, [0.1, 0.1], 30, penalty="l21", coefs=[1e-3, 1e-3],
                        batch_size=16, seed=0)
    x2, y2 = x.copy(), y.copy()
    x2[::3] = 5.0  # rows masked out of model 0 only
    y2[::3] = (y2[::3] + 1) % 3
    w2, _ = train_heads(x2, y2, 3, mask, [0.1, 0.1], 30, penalty="l21", coefs=[1e-3, 1e-3],
                        batch_size=16, seed=0)
    torch.testing.assert_close(w1[0], w2[0])
    assert not torch.allclose(w1[1], w2[1])


# ----------------------------------------------------------------------------- screening


def _data(x, y, n_classes):
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    return CVData(xt, yt, n_classes, torch.nn.functional.one_hot(yt, n_classes).float(),
                 torch.zeros(len(y), dtype=torch.int64), torch.float32)


@pytest.mark.parametrize("penalty", ["l21", None])
def test_screened_training_on_candidates_equals_the_masked_pool(penalty):
    """Per-subset training on each fold's candidates is the masked pool training, rearranged."""
    x, y = synthetic(60, dim=40)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    onehot = torch.nn.functional.one_hot(yt, 3).float()
    folds = torch.from_numpy(stratified_folds(y, 3, seed=0))
    fold_of = torch.tensor([0, 1, 2, 0, 1, 2])  # 3 subsets x 2 coefficients, interleaved
    mask = (folds.unsqueeze(0) != fold_of.unsqueeze(1)).float()
    coef = torch.tensor([1e-3, 1e-3, 1e-3, 1e-2, 1e-2, 1e-2])
    gen = torch.Generator().manual_seed(1)
    cand = torch.stack([torch.randperm(40, generator=gen)[:15] for _ in range(3)])
    col_mask = torch.zeros(40, 6)
    for m in range(6):
        col_mask[cand[fold_of[m]], m] = 1.0
    batches = batch_schedule(60, 16, 25, seed=2)
    args = (xt, onehot, mask, 0.05, coef, penalty, batches, None, "", 0, 1)
    w_masked, b_masked = train_wide_group(*args, col_mask)
    w_blocked, b_blocked = train_screened_group(*args, col_mask)
    torch.testing.assert_close(w_blocked, w_masked, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b_blocked, b_masked, atol=1e-5, rtol=1e-4)
    assert (w_blocked[col_mask == 0] == 0).all() and (w_blocked[col_mask == 1] != 0).any()
    uneven = col_mask.clone()
    uneven[cand[0][0], 0] = 0.0  # model 0 now has other candidates than its fold's second model
    assert train_screened_group(*args, uneven) is None  # the caller then trains the masked pool


def test_strong_rule_scores_are_the_gradient_norm_at_zero():
    x, y = synthetic(60, dim=25, n_classes=4, seed=3)
    rows = [np.arange(60) % 3 != 0, np.arange(60) < 45]
    scores = strong_rule_scores(torch.from_numpy(x), torch.nn.functional.one_hot(
        torch.from_numpy(y), 4).float(), torch.from_numpy(np.stack(rows)))
    for g, sub in enumerate(rows):
        xs, ys = torch.from_numpy(x[sub]), torch.from_numpy(y[sub])
        prior = torch.bincount(ys, minlength=4).float() / len(ys)
        w = torch.zeros(25, 4, requires_grad=True)
        loss = torch.nn.functional.cross_entropy(xs @ w + prior.log(), ys)
        loss.backward()
        torch.testing.assert_close(scores[g], torch.linalg.vector_norm(w.grad, dim=1))


def test_masked_columns_train_exactly_like_the_submatrix_alone():
    x, y = synthetic(90, dim=30, seed=4)
    allowed = np.zeros((30, 2), bool)
    allowed[[0, 3, 5, 8, 13, 21, 29], 0] = True
    allowed[:, 1] = True
    mask = torch.ones(2, 90)
    (_, w, _), = run_wide(torch.from_numpy(x), torch.nn.functional.one_hot(
        torch.from_numpy(y), 3).float(), mask, [0.1, 0.1], [1e-3, 1e-3], "l21", 30, 16, 0, None,
        "", torch.from_numpy(allowed).float())
    assert torch.all(w[~torch.from_numpy(allowed[:, 0]), 0] == 0)
    alone, _ = train_heads(x[:, allowed[:, 0]], y, 3, np.ones((1, 90), bool), [0.1], 30,
                           penalty="l21", coefs=[1e-3], batch_size=16, seed=0)
    torch.testing.assert_close(w[torch.from_numpy(allowed[:, 0]), 0], alone[0], atol=1e-5, rtol=1e-4)


def test_screen_uses_only_each_models_training_rows():
    x, y = synthetic(90, dim=200, seed=5)
    folds = stratified_folds(y, 3, seed=0)
    train = torch.from_numpy(np.stack([folds != f for f in (0, 0, 1, 2)])).float()
    screen = screen_candidates(_data(x, y, 3), train, 20)
    assert screen.col_mask.shape == (len(screen.pool), 4)
    assert torch.all(screen.col_mask.sum(0) == 20)
    torch.testing.assert_close(screen.col_mask[:, 0], screen.col_mask[:, 1])  # same rows, same pool
    x2 = x.copy()
    x2[folds == 0] = np.random.default_rng(0).standard_normal(x2[folds == 0].shape)
    screen2 = screen_candidates(_data(x2, y, 3), train, 20)

    def candidates(s, m):
        return set(s.pool[s.col_mask[:, m] > 0].tolist())

    assert candidates(screen2, 0) == candidates(screen, 0)  # fold 0's validation rows changed
    assert candidates(screen2, 2) != candidates(screen, 2)
    assert screen_candidates(_data(x, y, 3), train, 200) is None  # D <= budget: exact method


def test_screened_head2toe_selects_informative_features_from_a_large_pool():
    x, y = synthetic(240, dim=3000, seed=6, signal=2.5)
    grid = small_grid(fractions=(0.001, 0.002, 0.05), max_candidates=64)
    result = fit_head2toe(x, y, 3, grid)
    assert result.config["screened_to"] == 64
    assert {row["fraction"] for row in result.cv_table} == {0.001, 0.002}  # 0.05 keeps 150 > 64
    assert set(result.head.features) <= set(INFORMATIVE)
    assert len(result.head.features) >= 3
    assert np.count_nonzero(result.scores) <= 64
    exact = fit_head2toe(x, y, 3, small_grid(fractions=(0.001, 0.002), max_candidates=None))
    assert exact.config["screened_to"] is None and np.count_nonzero(exact.scores) > 64


def test_training_threads_follow_omp_num_threads(monkeypatch):
    from h2t_edge.selection.grid import training_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert training_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert training_threads() == (os.cpu_count() or 1)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert training_threads() == (os.cpu_count() or 1)
