"""The layering of h2t_edge/ (pyproject [tool.importlinter]) holds, and the check catches a break."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed: pip install -e '.[test]'")


def _lint(root: Path) -> subprocess.CompletedProcess:
    # grimp reads the source files; PYTHONPATH makes the packages under `root` the ones it finds
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_every_layer_contract_is_kept():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("h2t_edge/core/errors.py", "import h2t_edge.steps.fit"),  # core importing a step
    ("h2t_edge/steps/extract.py", "from h2t_edge.train import protocol"),  # a step importing the protocol
    ("runtime/io.py", "import h2t_edge.core.errors"),  # the device side importing h2t_edge
    ("h2t_edge/serving/bench.py", "from h2t_edge import pipeline"),  # a layer using the facade
])
def test_an_upward_import_breaks_the_check(tmp_path, module, upward):
    for name in ("h2t_edge", "exporters", "runtime"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{upward}  # an upward import\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr
