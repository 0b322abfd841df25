"""`run_eval` on a small bundled task (digits) with the tiny backbone in place of the exported
one, at two target sizes: a whole suite evaluation in a few seconds, for the kill/resume test."""

from __future__ import annotations

from pathlib import Path

from tiny_backbone import TINY_GRID
from tiny_backbone import write_backbone

from h2t_edge.suite import evaluate


def _tiny_onnx(work: Path, backbone: str, target_size: int, weights: str, log) -> Path:
    path = work / "backbones" / f"tiny-T{target_size}.onnx"
    if not path.exists():
        write_backbone(path, target_size)
    return path


def run_tiny_eval(args: dict) -> list[dict]:
    evaluate._backbone_onnx = _tiny_onnx
    return evaluate.run_eval(["digits"], args["out"], methods=("LINEAR", "HEAD2TOE"), seeds=(0,),
                             target_sizes=(12, 48), work_dir=args["work"], data_dir=args["data"],
                             n_train=60, n_val=10, n_test=30, grid=TINY_GRID, batch_size=8)
