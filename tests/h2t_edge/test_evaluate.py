"""`h2t-edge eval` on a tiny task: results JSON, Table-1 markdown, gain plot, and resuming."""

import json
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

import h2t_edge.selection.methods as methods
import h2t_edge.suite.evaluate as evaluate
from h2t_edge.cli import cli
from h2t_edge.suite.evaluate import METHODS, EvalError, report_markdown, run_eval, write_report
from h2t_edge.selection import SearchGrid

TINY_GRID = SearchGrid(lrs=(0.1,), steps=(40,), l21s=(1e-3,), penalties=(1e-4,), fractions=(0.01, 0.1),
                       folds=2, batch_size=32)
TINY = dict(n_train=48, n_val=8, n_test=24)


@pytest.fixture(scope="module")
def evaluated(lite0_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    path, _ = lite0_onnx
    (root / "work" / "backbones").mkdir(parents=True)
    shutil.copy(path, root / "work" / "backbones" / "efficientnet_lite0-T512.onnx")  # skip the export
    lines = []
    records = run_eval(["distance2d"], root / "res", seeds=(0,), protocol="tiny", grid=TINY_GRID,
                       work_dir=root / "work", data_dir=root / "data", log=lines.append, **TINY)
    return root, records, lines


def test_eval_writes_one_record_per_cell_and_the_report(evaluated):
    root, records, lines = evaluated
    assert sorted(r["method"] for r in records) == sorted(METHODS) and {r["seed"] for r in records} == {0}
    saved = json.loads((root / "res.json").read_text())["results"]
    assert saved == json.loads(json.dumps(records))
    by = {(r["method"], r["seed"]): r for r in records}
    assert by[("LINEAR", 0)]["candidates"] == 1280  # pre-logits only
    assert by[("ALL-L2", 0)]["n_features"] == by[("ALL-L2", 0)]["candidates"] == 28296
    h2t = by[("HEAD2TOE", 0)]
    assert h2t["n_features"] in (282, 2829) and h2t["config"]["seed"] == 0 and h2t["per_target_size"][0]["target_size"] == 512
    assert all(0 <= r["test_accuracy"] <= 1 and r["fit_seconds"] > 0 and r["n_test"] == 24 for r in records)
    paths = write_report(root / "res", "tiny")
    md = paths["md"].read_text()
    assert "| method | distance2d | **Structured mean** | **Overall mean** |" in md
    assert md.count("†") >= len(METHODS) and "fit + CV seconds" in md
    assert Image.open(paths["png"]).size[0] > 100


def test_rerun_skips_finished_cells(evaluated, monkeypatch):
    root, records, _ = evaluated

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr(evaluate, "fit_head2toe", refuse)  # evaluate looks HEAD2TOE's fit up itself,
    for name in ("fit_linear", "fit_regularized"):  # the other methods' through the method registry
        monkeypatch.setattr(methods, name, refuse)
    again = run_eval(["distance2d"], root / "res", seeds=(0,), protocol="tiny", grid=TINY_GRID,
                     work_dir=root / "work", data_dir=root / "data", **TINY)
    assert again == json.loads((root / "res.json").read_text())["results"]


def test_interrupted_eval_keeps_finished_cells(evaluated, monkeypatch):
    root, _, _ = evaluated
    calls = []
    real = methods.fit_regularized

    def stop_at_l1(x, y, n, penalty, grid, progress=None):
        calls.append(penalty)
        if penalty == "l1":
            raise KeyboardInterrupt
        return real(x, y, n, penalty, grid, progress)

    monkeypatch.setattr(methods, "fit_regularized", stop_at_l1)
    args = dict(seeds=(0,), protocol="tiny", grid=TINY_GRID, work_dir=root / "work", data_dir=root / "data", **TINY)
    with pytest.raises(KeyboardInterrupt):
        run_eval(["distance2d"], root / "part", **args)
    kept = json.loads((root / "part.json").read_text())["results"]
    assert [r["method"] for r in kept] == ["LINEAR", "ALL-L2"]
    monkeypatch.setattr(methods, "fit_regularized", real)
    done = run_eval(["distance2d"], root / "part", **args)
    assert [r["method"] for r in done] == list(METHODS) and done[:2] == kept


def test_markdown_group_means_and_missing_cells():
    def rec(task, group, method, seed, acc, protocol="paper"):
        return {"task": task, "group": group, "method": method, "backbone": "b", "seed": seed, "protocol": protocol,
                "test_accuracy": acc, "fit_seconds": 1.0, "target_size": 512, "n_train": 1000, "n_test": 1000,
                "candidates": 10, "n_features": 5, "config": {"fraction": 0.5, "l21": 1e-3, "lr": 0.1, "steps": 500}}

    records = [rec("digits", "natural", "LINEAR", s, a) for s, a in enumerate((0.8, 0.9, 1.0))]
    records += [rec("dspr_loc", "structured", "LINEAR", 0, 0.4), rec("dspr_loc", "structured", "LINEAR", 0, 0.1, "quick"),
                {**rec("dspr_loc", "structured", "HEAD2TOE", 0, 0.6), "solver": "path"},
                rec("dspr_loc", "structured", "HEAD2TOE", 0, 0.55)]  # a record from before the path solver
    md = report_markdown(records)
    assert "| LINEAR | 90.0 ± 10.0 | **90.0** | 40.0 ± 0.0 (n=1) | **40.0** | **65.0** |" in md  # paper beats quick
    assert "| HEAD2TOE | – | – | 60.0 ± 0.0 (n=1) | **60.0** | – |" in md
    assert "| HEAD2TOE (paper solver) | – | – | 55.0 ± 0.0 (n=1) | **55.0** | – |" in md
    # the solver is part of a HEAD2TOE cell's key (a path-solver run does not take a paper-solver record as done)
    assert evaluate.record_key(records[-1]) != evaluate.record_key(records[-2])
    assert evaluate.record_key(records[0])[-1] is None  # other methods serve either solver


def test_bad_requests_and_cli(tmp_path):
    with pytest.raises(EvalError, match="unknown method"):
        run_eval(["digits"], tmp_path / "r", methods=["LINEAR", "ALL"])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(EvalError, match="not an h2t-edge evaluation results file"):
        run_eval(["digits"], tmp_path / "other")
    result = CliRunner().invoke(cli, ["eval", "--task", "nope", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "unknown task 'nope'" in str(result.exception)


def test_head2toe_takes_the_target_size_with_the_best_cv(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import numpy as np

    from h2t_edge.selection import FitResult, LinearHead
    from h2t_edge.steps.fit import FitKey

    dims = {512: 10, 2048: 20, 8192: 30}
    cv = {10: 0.5, 20: 0.7, 30: 0.7}  # a tie between 2048 and 8192 goes to the smaller T

    def features(t):
        x = np.zeros((4, dims[t]), np.float32)
        return SimpleNamespace(target_size=t, arrays=lambda: (x, np.array([0, 1, 0, 1]), x[:2], np.array([0, 1])),
                               run_path=lambda method, grid: tmp_path / f"{method}-T{t}.json",
                               fit_key=lambda method, grid: FitKey(f"{t:064x}", (method,), grid.to_dict()))

    def fake_fit(x, y, n_classes, grid):
        head = LinearHead(np.zeros((1, 2), np.float32), np.zeros(2, np.float32), np.array([0]))
        return FitResult("HEAD2TOE", head, {"fraction": 0.1, "l21": 1e-3, "lr": 0.1, "steps": 500},
                         [{"val_acc_mean": cv[x.shape[1]]}], None, 1.5)

    monkeypatch.setattr(evaluate, "fit_head2toe", fake_fit)
    data = SimpleNamespace(train=SimpleNamespace(classes=("a", "b")))
    record = evaluate._evaluate("HEAD2TOE", data, {t: features(t) for t in dims}, TINY_GRID)
    assert record["target_size"] == 2048 and record["candidates"] == 20 and record["cv_accuracy"] == 0.7
    assert record["fit_seconds"] == 4.5  # every T's fit counts
    assert [r["target_size"] for r in record["per_target_size"]] == [512, 2048, 8192]
    record.update(task="digits", group="natural", method="HEAD2TOE", backbone="b", seed=0, protocol="paper",
                  n_train=4, n_test=2)
    md = report_markdown([record])
    assert "| digits | paper | paper | 0 | 2048* | 20 | – | 70.0 |" in md  # protocol, solver (a record without one)
    assert "| digits | paper | paper | 0 | 8192 | 30 |" in md
    # every T's fit was kept; a rerun (or one interrupted after T=2048) refits only what is missing
    (tmp_path / "HEAD2TOE-T8192.json").unlink()
    fitted = []
    monkeypatch.setattr(evaluate, "fit_head2toe", lambda x, *a: fitted.append(x.shape[1]) or fake_fit(x, *a))
    again = evaluate._evaluate("HEAD2TOE", data, {t: features(t) for t in dims}, TINY_GRID)
    assert fitted == [30] and again["per_target_size"] == record["per_target_size"]


def test_cli_report_only_rewrites_the_report(evaluated):
    root, _, _ = evaluated
    (root / "res.md").unlink(missing_ok=True)
    result = CliRunner().invoke(cli, ["eval", "--report-only", "--out", str(root / "res")])
    assert result.exit_code == 0, result.output
    assert "wrote md" in result.output and "| HEAD2TOE |" in (root / "res.md").read_text()


def test_report_shows_each_protocol_alone_when_mixed(tmp_path):
    def rec(method, seed, acc, protocol):
        return {"task": "digits", "group": "natural", "method": method, "backbone": "b", "seed": seed,
                "protocol": protocol, "test_accuracy": acc, "fit_seconds": 1.0, "target_size": 512, "n_train": 1000,
                "n_test": 797, "candidates": 10, "n_features": 5,
                "config": {"fraction": 0.5, "l21": 1e-3, "lr": 0.1, "steps": 500}}

    records = [rec("LINEAR", 0, 0.9, "paper"), rec("LINEAR", 0, 0.7, "quick"), rec("LINEAR", 1, 0.8, "quick")]
    evaluate._save(tmp_path / "r.json", records)
    md = write_report(tmp_path / "r")["md"].read_text()
    assert "## paper protocol only" in md and "## quick protocol only" in md
    assert md.count("| LINEAR | 90.0 ± 0.0 |") == 2  # the merged table (paper wins) and the paper-only one
    assert "| LINEAR | 75.0 ± 5.0† |" in md  # quick alone: median of its two seeds
