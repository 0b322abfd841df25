import dataclasses
import subprocess
import sys

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
    from h2t_edge.cli import _grid
    from h2t_edge.select import SearchGrid

    assert _grid("paper") == SearchGrid.paper()
    assert _grid("quick", 0).max_candidates is None  # 0: exact group lasso
    assert _grid("paper", 4096) == SearchGrid(max_candidates=4096)
    assert _grid("quick", None, "bf16") == dataclasses.replace(SearchGrid.quick(), precision="bf16")
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
