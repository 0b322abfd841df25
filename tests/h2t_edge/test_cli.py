import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from h2t_edge.cli import cli

COMMANDS = ["backbones", "taps", "export", "extract", "fit", "compile", "predict", "demo", "check", "build-engine",
            "bench", "tasks", "eval", "search", "deploy"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 4


def test_backbones_lists_the_default():
    result = CliRunner().invoke(cli, ["backbones"])
    assert result.exit_code == 0 and "efficientnet_lite0" in result.output


def test_taps_table_counts_candidates():
    result = CliRunner().invoke(cli, ["taps", "efficientnet_lite0", "-T", "512"])
    assert result.exit_code == 0, result.output
    assert "51 taps, 28296 candidate features at T=512" in result.output


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "h2t_edge.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_user_errors_are_one_line_and_nonzero(tmp_path):
    bogus = tmp_path / "data.txt"
    bogus.write_text("nothing")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not onnx")
    result = _run("extract", str(onnx), str(bogus), "--cache", str(tmp_path / "c"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = _run("fit", str(tmp_path), "--out", str(tmp_path / "t"))
    assert result.returncode == 1 and "manifest.json" in result.stderr and "Traceback" not in result.stderr




def test_max_candidates_option_sets_the_screening_budget():
    from h2t_edge.cli.options import make_grid
    from h2t_edge.selection import SearchGrid

    assert make_grid("paper") == SearchGrid.paper()
    assert make_grid("quick", 0).max_candidates is None  # 0: exact group lasso
    assert make_grid("paper", 4096) == SearchGrid(max_candidates=4096)
    assert make_grid("quick", None, "bf16", "paper") == dataclasses.replace(SearchGrid.quick(), precision="bf16",
                                                                           solver="paper")
    for command in ("fit", "eval"):
        assert "--max-candidates" in CliRunner().invoke(cli, [command, "--help"]).output
    result = CliRunner().invoke(cli, ["fit", ".", "--out", "x", "--max-candidates", "-1"])
    assert result.exit_code == 2 and "max-candidates" in result.output


def test_cli_prints_own_warnings_as_one_plain_line(capsys):
    """Our warnings read as one 'warning: ...' line; other packages' keep Python's format (with
    their source location, which is what one needs to chase them)."""
    import warnings
    from pathlib import Path

    import h2t_edge
    from h2t_edge.cli import _show_warning

    own = str(Path(h2t_edge.__file__).parent / "select.py")
    _show_warning(RuntimeWarning("bf16 is emulated here"), RuntimeWarning, own, 12)
    assert capsys.readouterr().err == "warning: bf16 is emulated here\n"
    _show_warning(UserWarning("old API"), UserWarning, "/usr/lib/python3/site-packages/other/mod.py", 7)
    err = capsys.readouterr().err
    assert err == warnings.formatwarning(UserWarning("old API"), UserWarning, "/usr/lib/python3/site-packages/other/mod.py", 7)
    assert "mod.py:7: UserWarning: old API" in err


# --- the shape of the command line: -o/--output everywhere, no defaults inside the repository ---

# every command that writes files, and so takes -o/--output
WRITERS = {"export", "fit", "train", "compile", "predict", "deploy", "bench", "eval", "build-engine",
           "export-triton", "diagnose", "finetune", "search"}
REPO = Path(__file__).resolve().parents[2]


def _options(command):
    return [p for p in command.params if isinstance(p, click.Option)]


def test_every_writing_command_takes_output_with_out_as_hidden_alias():
    assert WRITERS <= set(cli.commands)
    for name, command in cli.commands.items():
        outputs = [p for p in _options(command) if {"-o", "--out", "--output"} & set(p.opts)]
        if name not in WRITERS:
            assert not outputs, f"{name} writes files: add it to WRITERS"
            continue
        assert len(outputs) == 1, f"{name} has no -o/--output option"
        assert sorted(outputs[0].opts) == ["--out", "--output", "-o"], (name, outputs[0].opts)
        shown = outputs[0].get_help_record(click.Context(command, info_name=name))[0]
        assert shown.startswith("-o, --output"), (name, shown)
        text = CliRunner().invoke(cli, [name, "--help"]).output
        assert "-o, --output" in text and not re.search(r"--out\b", text), name


def test_out_alias_reaches_the_same_parameter(tmp_path, monkeypatch):
    """`--out X` (the old spelling of fit, eval, bench, finetune, search) still works, and the
    --output spelling does the same; neither --help nor a missing-option error shows --out."""
    import h2t_edge.suite.evaluate as evaluate
    import h2t_edge.train as train_api

    seen = []

    def fake_fit(caches, out, **kwargs):
        seen.append(("fit", out))
        return SimpleNamespace(heads={}, cv={}, seconds={}, out=Path(out))

    def fake_report(out):
        seen.append(("eval", out))
        return {"json": Path(f"{out}.json")}

    monkeypatch.setattr(train_api, "fit_task", fake_fit)
    monkeypatch.setattr(evaluate, "write_report", fake_report)
    for flag in ("--out", "--output", "-o"):
        result = CliRunner().invoke(cli, ["fit", str(tmp_path), flag, str(tmp_path / "t"), "-q"])
        assert result.exit_code == 0, result.output
        assert f"wrote {tmp_path / 't'}" in result.output
        result = CliRunner().invoke(cli, ["eval", "--report-only", flag, str(tmp_path / "r")])
        assert result.exit_code == 0, result.output
        assert f"wrote json: {tmp_path / 'r'}.json" in result.output
    assert seen == [("fit", str(tmp_path / "t")), ("eval", str(tmp_path / "r"))] * 3
    missing = CliRunner().invoke(cli, ["fit", str(tmp_path)])
    assert missing.exit_code == 2 and "--output" in missing.output and "'--out'" not in missing.output


def _path_defaults(command, name):
    ctx = click.Context(command, info_name=name)
    for param in command.params:
        default = param.get_default(ctx)
        for value in default if isinstance(default, (list, tuple)) else [default]:
            if isinstance(value, (str, Path)) and str(value):
                yield param.name, Path(value)


def test_no_default_points_inside_the_repository():
    """Defaults are relative to the user's folder (or absolute elsewhere), never into this source
    tree (eval once wrote to benchmarks/results/ by default)."""
    source_dirs = {p.name for p in REPO.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and any(p.rglob("*.py"))}
    assert {"benchmarks", "h2t_edge", "tests"} <= source_dirs
    for name, command in cli.commands.items():
        for param, path in _path_defaults(command, name):
            where = f"{name} {param}={path}"
            assert not str(path).replace("\\", "/").startswith("benchmarks/"), where
            if path.is_absolute():
                assert not path.resolve().is_relative_to(REPO), where
            else:
                assert path.parts[0] not in source_dirs, where
    defaults = dict(_path_defaults(cli.commands["eval"], "eval"))
    assert defaults["out"] == Path("h2t-eval/results")


def test_diagnose_without_matplotlib_writes_the_tables_and_names_the_extra(tmp_path, monkeypatch):
    from test_diagnose import _synthetic_cache

    _synthetic_cache(tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = CliRunner().invoke(cli, ["diagnose", str(tmp_path / "cache"), "-o", str(tmp_path / "d"), "-q"])
    assert result.exit_code == 0, result.output
    assert "pre_logits" in result.output
    assert (tmp_path / "d.json").exists() and not (tmp_path / "d.png").exists()
    assert f"wrote {tmp_path / 'd.json'}\n" in result.output
    assert "figures skipped: matplotlib is not installed (pip install 'h2t-edge[train]')" in result.output


def test_help_and_the_pipeline_facade_do_not_import_torch():
    """torch is imported when something is exported or fitted, not to print --help or to import the
    API (`h2t_edge.selection` resolves its names on first use)."""
    code = ("import sys, contextlib, io, h2t_edge.pipeline\n"
            "from h2t_edge.cli import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['fit', '--help'], standalone_mode=False)\n"
            "import h2t_edge.selection.names\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
