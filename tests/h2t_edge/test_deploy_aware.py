"""Issue 22: selection that knows what a tap costs; new tasks that reuse a device's taps.

Tap costs (`core.costs`), tap budgets (`selection.taps`), the one-standard-error choice by cost
(`grid.choose_cheapest`), `--taps-from`, and `deploy`'s pruned device graph."""

from __future__ import annotations

import ast
import dataclasses

import numpy as np
import pytest

from h2t_edge.core.costs import ALL_TAPS, CostError, TapCosts, column_taps
from h2t_edge.core.errors import FitError
from h2t_edge.selection import SearchGrid
from h2t_edge.selection.estimators import fit_head2toe_variants
from h2t_edge.selection.grid import choose_best, choose_cheapest, standard_error
from h2t_edge.selection.taps import TapPlan

# six taps of 50 features: early maps are large (expensive), the last one is the pre-logits (free)
SHAPES = [(16, 64, 64), (24, 32, 32), (40, 16, 16), (80, 8, 8), (112, 8, 8), (320, 1, 1)]


def toy_layout(per_tap: int = 50) -> dict:
    taps = [{"name": f"t{i}", "output": f"t{i}", "kind": "conv", "shape": list(shape), "offset": i * per_tap,
             "features": per_tap} for i, shape in enumerate(SHAPES)]
    return {"taps": taps, "total_features": per_tap * len(SHAPES), "pre_logits": "t5", "target_size": 512}


def toy_task(n: int = 360, seed: int = 0, per_tap: int = 50):
    """Labels show in tap 0 (the most expensive) and, as a near copy, in tap 3 (cheap): reading t0 buys
    nothing that t3 lacks."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.standard_normal((n, per_tap * len(SHAPES))).astype(np.float32)
    for c in range(3):
        x[:, c] += 1.5 * (y == c)  # tap t0
        x[:, 3 * per_tap + c] = 0.98 * x[:, c] + 0.05 * rng.standard_normal(n)  # tap t3
    return x, y.astype(np.int64)


GRID = SearchGrid(fractions=(0.01, 0.02, 0.05, 0.1), folds=3, seed=0)


# ----------------------------------------------------------------------------- tap costs


def test_bytes_model_spreads_the_all_taps_cost_and_the_pre_logits_is_free():
    layout = toy_layout()
    costs = TapCosts.bytes_model(layout)
    assert costs.names == tuple(f"t{i}" for i in range(6))
    assert costs.fractions[5] == 0.0  # the pre-logits
    np.testing.assert_allclose(costs.fractions.sum(), ALL_TAPS)
    nbytes = np.asarray([np.prod(s) for s in SHAPES[:5]], dtype=float)
    # more bytes, more cost; equal bytes (t3: 80x8x8 vs t4: 112x8x8) ordered by bytes too
    assert list(np.argsort(-costs.fractions[:5])) == list(np.argsort(-nbytes))
    assert costs.latency(["t0", "t5"]) == pytest.approx(1.0 + costs.fractions[0])
    again = TapCosts.from_dict(costs.to_dict())
    np.testing.assert_array_equal(again.fractions, costs.fractions)
    other = toy_layout()
    other["taps"] = other["taps"][:5]
    with pytest.raises(CostError, match="do not match"):
        TapCosts.of(other, costs.to_dict())
    with pytest.raises(CostError, match=">= 0"):
        TapCosts.from_dict({**costs.to_dict(), "taps": {"t0": -1.0}})


def test_column_taps_and_taps_read_follow_the_layout():
    layout = toy_layout(per_tap=7)
    owner = column_taps(layout)
    assert owner.shape == (42,) and list(owner[::7]) == [0, 1, 2, 3, 4, 5] and owner[13] == 1
    assert TapPlan.of(layout).taps_read([0, 8, 41]) == ["t0", "t1", "t5"]


# ----------------------------------------------------------------------------- the choice rule


def test_choose_cheapest_is_the_one_standard_error_rule_on_cost():
    rows = [{"acc": 0.90, "se": 0.02, "cost": 1.5, "k": 10},
            {"acc": 0.885, "se": 0.02, "cost": 1.1, "k": 20},  # within 1 SE, cheaper: chosen
            {"acc": 0.85, "se": 0.02, "cost": 1.0, "k": 5}]   # cheapest but 2.5 SE below
    pick = choose_cheapest(rows, lambda r: r["acc"], lambda r: r["se"], lambda r: r["cost"], lambda r: r["k"])
    assert pick is rows[1]
    # equal costs: the same pick as choose_best
    flat = [{**r, "cost": 1.0} for r in rows]
    assert choose_cheapest(flat, lambda r: r["acc"], lambda r: r["se"], lambda r: r["cost"]) is \
        choose_best(flat, lambda r: r["acc"])
    # no spread: only rows as accurate as the best compete
    assert choose_cheapest(rows, lambda r: r["acc"], lambda r: 0.0, lambda r: r["cost"]) is rows[0]
    # the standard error of a CV row from its population std over K folds
    assert standard_error({"val_acc_std": 0.03}, 4) == pytest.approx(0.03 / np.sqrt(3))


# ----------------------------------------------------------------------------- tap budgets


def _reference_within_budget(ranked, relevance, column_tap, cost, budget):
    """numpy: per model, the `budget` taps of highest summed relevance / (cost + mean paid cost) with relevance
    > 0, and the ranked columns inside them first (stable)."""
    out, counts = [], []
    for r_row, rel in zip(ranked, relevance):
        score = np.bincount(column_tap, weights=rel, minlength=len(cost)) / (cost + cost[cost > 0].mean())
        top = [t for t in np.argsort(-score, kind="stable")[:budget] if score[t] > 0]
        inside = np.isin(column_tap[r_row], top)
        out.append(np.concatenate([r_row[inside], r_row[~inside]]))
        counts.append(int(inside.sum()))
    return np.stack(out), np.asarray(counts)


def test_within_budget_matches_a_numpy_reference():
    import torch

    layout = toy_layout(per_tap=10)
    plan = TapPlan.of(layout)
    rng = np.random.default_rng(3)
    relevance = np.where(rng.random((4, 60)) < 0.3, rng.random((4, 60)), 0.0)
    ranked = np.argsort(-relevance, axis=1, kind="stable")
    for budget in (1, 2, 4):
        got, counts = plan.within_budget(torch.from_numpy(ranked), torch.from_numpy(relevance), budget)
        want, want_counts = _reference_within_budget(ranked, relevance, plan.column_tap, plan.cost, budget)
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_array_equal(counts.numpy(), want_counts)


def test_latencies_match_the_taps_each_head_reads():
    import torch

    plan = TapPlan.of(toy_layout(per_tap=10))
    columns = torch.tensor([[0, 11, 12, 59, 30], [55, 56, 1, 2, 3]])
    got = plan.latencies(columns, [1, 3, 5]).numpy()
    for r, row in enumerate(columns.numpy()):
        for i, k in enumerate((1, 3, 5)):
            assert got[r, i] == pytest.approx(plan.latency(row[:k]))
    assert plan.latency([55, 56]) == 1.0  # the pre-logits alone costs nothing


# ----------------------------------------------------------------------------- the engine


def test_cheapest_choice_trades_an_expensive_tap_for_a_cheap_one():
    x, y = toy_task()
    plan = TapPlan.of(toy_layout())
    best = fit_head2toe_variants(x, y, 3, dataclasses.replace(GRID, choice="accuracy"), taps=plan)["HEAD2TOE"]
    cheap = fit_head2toe_variants(x, y, 3, GRID, taps=plan)["HEAD2TOE"]
    rows = best.cv_table
    assert {r["taps"] for r in rows} == {None, 1, 2, 4, 8} and all("latency" in r for r in rows)
    top = max(rows, key=lambda r: r["val_acc_mean"])
    chosen = next(r for r in cheap.cv_table if r["taps"] == cheap.config["tap_budget"]
                  and r["l21"] == cheap.config["l21"] and r["fraction"] == cheap.config["fraction"])
    # within one standard error of the best, and no dearer than the most accurate head
    assert chosen["val_acc_mean"] >= top["val_acc_mean"] - standard_error(top, GRID.folds) - 1e-9
    assert cheap.config["latency_estimate"] <= best.config["latency_estimate"] + 1e-9
    assert cheap.config["latency_estimate"] == pytest.approx(plan.latency(cheap.head.features))
    assert cheap.config["taps_read"] == plan.taps_read(cheap.head.features)
    # the expensive tap t0 costs more than everything else together: the cheap head does without it
    assert "t0" not in cheap.config["taps_read"], cheap.config
    assert cheap.config["choice"] == "cheapest" and best.config["choice"] == "accuracy"


def test_latency_budget_is_a_hard_bound_in_the_engine():
    x, y = toy_task()
    plan = TapPlan.of(toy_layout())
    bound = 1.0 + float(plan.cost[3]) + float(plan.cost[4]) + 1e-6  # t3 and t4 at most
    fit = fit_head2toe_variants(x, y, 3, dataclasses.replace(GRID, latency_budget=bound, choice="accuracy"),
                                taps=plan)["HEAD2TOE"]
    assert fit.config["latency_estimate"] <= bound
    with pytest.raises(FitError, match="latency_budget"):
        SearchGrid(latency_budget=0.9)


def test_taps_from_keeps_every_head_inside_the_allowed_taps():
    x, y = toy_task()
    layout = toy_layout()
    plan = TapPlan.of(layout, allowed_taps=["t2", "t3"])
    assert list(plan.allowed) == [False, False, True, True, False, True]  # the pre-logits is always allowed
    fits = fit_head2toe_variants(x, y, 3, GRID, taps=plan, keep=np.arange(250, 300))
    for fit in fits.values():
        assert set(TapPlan.of(layout).taps_read(fit.head.features)) <= {"t2", "t3", "t5"}
        assert fit.scores.shape == (300,) and not fit.scores[:100].any()
    assert set(fits["HEAD2TOE+LINEAR"].head.features) >= set(range(250, 300))
    # the head's logits are those of its columns in the full feature matrix
    head = fits["HEAD2TOE"].head
    np.testing.assert_allclose(x[:, head.features] @ head.weight + head.bias,
                               np.asarray(x)[:, head.features] @ head.weight + head.bias)
    with pytest.raises(FitError, match="not in this export"):
        TapPlan.of(layout, allowed_taps=["blocks.9"])


def test_paper_solver_choice_is_unchanged_by_the_plan():
    """The paper solver ranks features alone: with or without a plan, the same head."""
    from test_select import small_grid

    x, y = toy_task(n=240)
    plan = TapPlan.of(toy_layout())
    grid = small_grid(fractions=(0.01, 0.05))
    a = fit_head2toe_variants(x, y, 3, grid)["HEAD2TOE"]
    b = fit_head2toe_variants(x, y, 3, grid, taps=plan)["HEAD2TOE"]
    np.testing.assert_array_equal(a.head.features, b.head.features)


# ----------------------------------------------------------------------------- CLI


def test_cli_grid_options_refuse_what_the_solver_cannot_do():
    import click
    import torch

    from h2t_edge.cli.options import make_grid

    grid = make_grid("paper")
    assert (grid.solver, grid.choice, grid.latency_budget) == ("path", "cheapest", None)
    assert grid.device == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert make_grid("quick", solver="paper", precision="bf16").precision == "bf16"
    assert make_grid("paper", max_accuracy=True, latency_budget=1.05).choice == "accuracy"
    with pytest.raises(click.UsageError, match="--fit-precision bf16 applies to --solver paper"):
        make_grid("paper", precision="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(click.UsageError, match="torch sees no GPU"):
            make_grid("paper", device="cuda")
    with pytest.raises(click.UsageError, match="only the 'path' solver runs off the CPU"):
        make_grid("paper", solver="paper", device="cpu:0")


def test_cli_taps_shows_each_taps_cost():
    from click.testing import CliRunner

    from h2t_edge.cli import cli

    result = CliRunner().invoke(cli, ["taps", "efficientnet_lite0", "-T", "512"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[-1] == "cost"
    costs = {line.split()[0]: float(line.split()[-1].rstrip("%")) for line in lines[1:-1]}
    shapes = {line.split()[0]: ast.literal_eval(line[line.index("("):line.index(")") + 1]) for line in lines[1:-1]}
    assert len(costs) == 51 and costs["pre_logits"] == 0.0  # the pre-logits: free
    assert sum(costs.values()) == pytest.approx(100 * ALL_TAPS, abs=0.05)
    largest = max(shapes, key=lambda name: np.prod(shapes[name]))
    assert costs[largest] == max(costs.values())  # the largest map costs most
    assert "Reading these taps: 55.0%" in lines[-1]
