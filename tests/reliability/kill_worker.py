"""Run one step (extract, fit or eval) in a subprocess and SIGKILL itself at a chosen point.

    python kill_worker.py STEP ARGS_JSON [KILL_AT]

KILL_AT is "FUNCTION:N:WHEN": the process kills itself with SIGKILL at the N-th call (1-based) of
FUNCTION (a module attribute path, e.g. "h2t_edge.steps.extract._save_npy"), WHEN "before" the call,
"after" it, or "during" it (an atomic write: a partial temporary file is written, then the kill).
"pause:N" instead blocks at the N-th batch written (for the lock test) after touching ARGS["ready"].
Without KILL_AT the step runs to the end. The worker prints "counts <json>" of the hooked calls.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def hook(target: str, n: int, when: str) -> None:
    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            if when == "before":
                _die()
            if when == "during":
                path = Path(args[0])
                (path.parent / f".{path.name}.killed.tmp").write_bytes(b"partial")
                _die()
        result = original(*args, **kwargs)
        if calls["n"] == n and when == "after":
            _die()
        return result

    setattr(module, attr, wrapper)


def pause_at_batch(n: int, ready: str) -> None:
    from h2t_edge.steps import extract as features

    original = features._CacheWriter.write

    def write(self, b, *args, **kwargs):
        original(self, b, *args, **kwargs)
        if b + 1 == n:
            Path(ready).touch()
            time.sleep(600)

    features._CacheWriter.write = write


def main() -> None:
    step, args = sys.argv[1], json.loads(sys.argv[2])
    if len(sys.argv) > 3:
        spec = sys.argv[3]
        if spec.startswith("pause:"):
            pause_at_batch(int(spec.split(":")[1]), args["ready"])
        else:
            target, n, when = spec.rsplit(":", 2)
            hook(target, int(n), when)
    if step == "extract":
        from h2t_edge.core.datasets import from_folder
        from h2t_edge.steps.extract import extract_features

        extract_features(args["onnx"], from_folder(args["images"]), args["cache"], batch_size=args["batch_size"],
                         dtype="float32", on_error="skip")
    elif step == "fit":
        from tiny_backbone import TINY_GRID

        from h2t_edge.pipeline import fit_step

        fit_step(args["cache"], args["out"], grid=TINY_GRID)
    elif step == "eval":
        from eval_fixture import run_tiny_eval

        run_tiny_eval(args)
    print("done")


if __name__ == "__main__":
    main()
