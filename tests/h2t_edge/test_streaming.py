"""The fit bounded in memory (issue 29): a `ColumnSource` over a float16 memmap is screened in
streamed column blocks (`stream_screen`), the fit holds only the screened pool, and the result is
the in-memory fit's."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
import torch

from h2t_edge.core.errors import FitError
from h2t_edge.selection import SearchGrid, fit_head2toe_variants, stratified_folds
from h2t_edge.selection.grid import cv_plan, prepare_cv
from h2t_edge.selection.screening import ColumnSource, screen_candidates, stream_screen

from test_select import synthetic  # noqa: E402  (same folder, on sys.path)


def memmapped(tmp_path, x: np.ndarray) -> np.ndarray:
    """x as a feature cache holds it: float16 on disk, memory-mapped read-only."""
    np.save(tmp_path / "features.npy", x.astype(np.float16))
    return np.load(tmp_path / "features.npy", mmap_mode="r")


def test_column_source_reads_the_valid_rows_in_blocks(tmp_path):
    x = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    source = ColumnSource(memmapped(tmp_path, x), np.array([0, 2, 3, 6]), row_chunk=3)
    rows = x[[0, 2, 3, 6]]
    assert source.shape == (4, 5)
    np.testing.assert_array_equal(source.block(1, 4), rows[:, 1:4])
    np.testing.assert_array_equal(source.gather([4, 0]), rows[:, [4, 0]])
    np.testing.assert_array_equal(source[:, np.array([3])], rows[:, [3]])
    np.testing.assert_array_equal(np.asarray(source), rows)
    sub = source.restrict(np.array([1, 3, 4]))
    np.testing.assert_array_equal(sub.block(0, 3), rows[:, [1, 3, 4]])
    np.testing.assert_array_equal(sub.gather([2]), rows[:, [4]])


def test_streamed_screen_finds_each_subsets_candidates(tmp_path):
    x, y = synthetic(150, dim=900, seed=1)
    x16 = x.astype(np.float16).astype(np.float32)
    grid = SearchGrid(folds=3, max_candidates=40)
    data = prepare_cv(x16, y, 3, grid)
    fold = data.fold.numpy()
    subsets = torch.from_numpy(np.stack([fold != f for f in range(3)]))
    ticks = []
    top = stream_screen(ColumnSource(memmapped(tmp_path, x), np.arange(150)), data.onehot, subsets, 40,
                        block_bytes=150 * 4 * 25, progress=lambda stage, done, total: ticks.append((done, total)))
    assert ticks[-1] == (36, 36)  # 900 columns in blocks of 25: progress per block
    screen = screen_candidates(data, subsets.float(), 40)
    for g in range(3):
        assert set(top[g].tolist()) == set(screen.pool[screen.col_mask[:, g] != 0].tolist())


def test_streamed_fit_equals_the_in_memory_fit(tmp_path):
    x, y = synthetic(180, dim=1500, seed=3, signal=2.5)
    x16 = x.astype(np.float16).astype(np.float32)  # what the memmap holds
    grid = SearchGrid(folds=3, max_candidates=96, fractions=(0.002, 0.01, 0.05))
    keep = np.arange(1490, 1500)
    source = ColumnSource(memmapped(tmp_path, x), np.arange(180))
    streamed = fit_head2toe_variants(source, y, 3, grid, keep=keep)
    memory = fit_head2toe_variants(x16, y, 3, grid, keep=keep)
    for name in memory:
        a, b = streamed[name], memory[name]
        assert a.config["fraction"] == b.config["fraction"] and a.config["n_features"] == b.config["n_features"]
        np.testing.assert_array_equal(a.head.features, b.head.features)
        np.testing.assert_allclose(a.head.weight, b.head.weight, rtol=1e-3, atol=1e-4)
        assert [r["val_acc_mean"] for r in a.cv_table] == pytest.approx([r["val_acc_mean"] for r in b.cv_table],
                                                                        abs=0.01)
        assert a.scores.shape == (1500,)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-3, atol=1e-5)


def test_streamed_fit_holds_the_pool_not_the_matrix(tmp_path):
    """numpy's allocations (tracemalloc sees them; every read of the source is one) stay near
    n x pool floats; materializing the matrix would take n x D."""
    n, dim, budget = 240, 24000, 64
    x, y = synthetic(n, dim=dim, seed=2)
    source = ColumnSource(memmapped(tmp_path, x), np.arange(n))
    grid = SearchGrid(folds=3, max_candidates=budget, fractions=(0.0005, 0.001))
    tracemalloc.start()
    try:
        fit_head2toe_variants(source, y, 3, grid)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole = n * dim * 4
    pool_bound = n * (3 + 1) * budget * 4
    assert peak < 4 * pool_bound < whole / 10, (peak, pool_bound, whole)


def test_streamed_fit_names_the_bad_row(tmp_path):
    x, y = synthetic(90, dim=300)
    x[7, 250] = np.nan
    with pytest.raises(FitError, match=r"row 7, columns"):
        fit_head2toe_variants(ColumnSource(memmapped(tmp_path, x), np.arange(90)), y, 3,
                              SearchGrid(folds=3, max_candidates=32))


# ----------------------------------------------------------------------------- the large-data plan


def test_cv_plan_subsamples_every_class_in_proportion_above_cv_rows():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    rows, fold = cv_plan(labels, SearchGrid(folds=5, cv_rows=200))
    assert rows is not None and len(rows) == 200 and np.all(np.diff(rows) > 0)
    assert np.bincount(labels[rows]).tolist() == [120, 60, 20]
    assert np.bincount(fold).tolist() == [40] * 5
    rows, fold = cv_plan(labels, SearchGrid(folds=5, cv_rows=1000))  # not above: every row
    assert rows is None and len(fold) == 1000
    assert cv_plan(labels, SearchGrid(folds=5, cv_rows=None))[0] is None


def test_screening_budget_shrinks_with_n_to_bound_the_pool():
    grid = SearchGrid(folds=5, max_candidates=32768, pool_bytes=3 << 30)
    assert grid.for_rows(1000).max_candidates == 32768
    for n in (20_000, 50_000, 100_000):
        budget = grid.for_rows(n).max_candidates
        assert budget < 32768 and n * (5 + 1) * budget * 4 <= 3 << 30
    assert SearchGrid(max_candidates=None).for_rows(10**6).max_candidates is None
    assert SearchGrid(pool_bytes=None).for_rows(10**6).max_candidates == 32768


def test_large_data_cross_validates_a_subsample_and_refits_on_every_row(tmp_path):
    x, y = synthetic(600, dim=800, seed=4, signal=2.5)
    x16 = x.astype(np.float16).astype(np.float32)
    grid = SearchGrid(folds=3, cv_rows=150, max_candidates=64, fractions=(0.002, 0.01))
    memory = fit_head2toe_variants(x16, y, 3, grid)["HEAD2TOE"]
    assert memory.config["cv_rows"] == 150
    streamed = fit_head2toe_variants(ColumnSource(memmapped(tmp_path, x), np.arange(600)), y, 3, grid)["HEAD2TOE"]
    np.testing.assert_array_equal(streamed.head.features, memory.head.features)
    # CV scored the 150 rows only (50 per fold): every mean is a multiple of 1/150
    assert all(abs(r["val_acc_mean"] * 150 - round(r["val_acc_mean"] * 150)) < 1e-6 for r in memory.cv_table)
    # ... and the refit saw every row: the subsample alone gives another head
    rows, _ = cv_plan(y, grid)
    small = fit_head2toe_variants(x16[rows], y[rows], 3, grid)["HEAD2TOE"]
    assert small.head.weight.shape != memory.head.weight.shape or not np.allclose(small.head.weight,
                                                                                  memory.head.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the streamed fit on --device cuda "
                                                          "runs the same code and is compared with the CPU's")
def test_streamed_fit_on_cuda_matches_the_cpu(tmp_path):
    x, y = synthetic(180, dim=1500, seed=3, signal=2.5)
    source = ColumnSource(memmapped(tmp_path, x), np.arange(180))
    grid = SearchGrid(folds=3, max_candidates=96, fractions=(0.002, 0.01, 0.05))
    cpu = fit_head2toe_variants(source, y, 3, grid)["HEAD2TOE"]
    gpu = fit_head2toe_variants(source, y, 3, dataclasses.replace(grid, device="cuda"))["HEAD2TOE"]
    np.testing.assert_array_equal(gpu.head.features, cpu.head.features)
    np.testing.assert_allclose(gpu.head.weight, cpu.head.weight, rtol=1e-3, atol=1e-4)
