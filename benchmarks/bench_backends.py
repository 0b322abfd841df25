"""Compare backends and precisions for one backbone, end to end, with a small task fitted on the way.

    python benchmarks/bench_backends.py --backbone efficientnet_lite0
    python benchmarks/bench_backends.py --backbone resnet50 --weights random

Builds a small dSprites-style task, exports the backbone, extracts features, fits HEAD2TOE and
LINEAR (quick grid), then runs `h2t_edge.serving.bench.run_bench` (plain backbone, both task graphs and the
backbone with all taps on every backend available, plus ONNX Runtime int8 calibrated on the task's
images and torch eager). Speed does not depend on what the weights learned, so random weights are
fine for backbones without bundled ones; the task's accuracy then means nothing and is not reported.
Results: benchmarks/results/backends_<backbone>.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from h2t_edge.serving.bench import run_bench
from h2t_edge.steps.extract import extract_features
from h2t_edge.pipeline import export_step, fit_step
from h2t_edge.selection import SearchGrid
from h2t_edge.suite.tasks.dsprites import build_dsprites_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--images", type=int, default=200, help="Training images of the small task.")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--work", default="bench-work")
    args = parser.parse_args()

    work = Path(args.work) / args.backbone
    data = build_dsprites_task(work / "data", n_train=args.images, n_test=16, bins=16, seed=0)
    exported = export_step(args.backbone, work / "backbone.onnx", 512, args.weights)
    extract_features(exported.path, data["train"], work / "features", batch_size=32)
    fit_step(work / "features", work / "task", grid=SearchGrid.quick())
    train_dir = Path(data["train"].paths[0]).parents[1]  # train/<class>/<image>
    run_bench(work / "task", work / "bench", repeat=args.repeat, calib=str(train_dir))
    results = Path(__file__).parent / "results"
    for suffix in ("json", "md"):
        shutil.copyfile(work / "bench" / f"bench.{suffix}", results / f"backends_{args.backbone}.{suffix}")
    print((results / f"backends_{args.backbone}.md").read_text())


if __name__ == "__main__":
    main()
