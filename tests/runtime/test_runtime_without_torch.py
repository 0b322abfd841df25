"""The on-device runtime must import and run with numpy, Pillow and onnxruntime only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "timm", "torchvision", "onnx")  # onnx: the device has onnxruntime only


def test_runtime_sources_never_import_training_stack():
    for source in sorted((REPO_ROOT / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in FORBIDDEN, f"{source}:{node.lineno} imports {module}"


def test_predictor_runs_where_torch_cannot_be_imported(tmp_path, tiny_task, photo_files):
    blocker = tmp_path / "blocker"
    for name in FORBIDDEN:
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(blocker)!r})
        for name in {FORBIDDEN!r}:
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(name + " was not blocked")
        from runtime.predictor import Predictor
        import runtime.backends, runtime.io, runtime.preprocess
        with Predictor.load({str(tiny_task.path)!r}) as predictor:
            predictions = predictor.predict_paths({[str(p) for p in photo_files.values()]!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
        print(json.dumps({{"labels": [p.label for p in predictions], "loaded": loaded}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loaded"] == []
    assert len(report["labels"]) == len(photo_files) and all(report["labels"])


def test_backends_import_without_onnxruntime(tmp_path):
    """onnxruntime is imported lazily: the package imports, and using it says what to install."""
    blocker = tmp_path / "blocker" / "onnxruntime"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('onnxruntime is blocked in this test')\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(blocker.parent)!r})
        import runtime.backends, runtime.predictor
        from runtime.errors import BackendUnavailable
        try:
            runtime.backends.SessionLoader(b"")()
        except BackendUnavailable as exc:
            print(exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "install onnxruntime" in result.stdout
