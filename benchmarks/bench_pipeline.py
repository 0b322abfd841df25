"""Benchmark a fitted task's graphs on every backend available here and keep the result.

    h2t-edge demo                                   # once, to have a fitted task
    python benchmarks/bench_pipeline.py --task-root h2t-demo/task

The measuring is `h2t_edge.serving.bench.run_bench` (the same as `h2t-edge bench`); this script only
files the JSON and markdown under benchmarks/results/ so they can be committed.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from h2t_edge.serving.bench import run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-root", default="h2t-demo/task", help="Output folder of `h2t-edge fit`.")
    parser.add_argument("--calib", default=None, help="Task images, to include ONNX Runtime int8 graphs.")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--work", default="bench-work", help="Scratch folder for the graphs.")
    parser.add_argument("--name", default="pipeline", help="Result file stem under benchmarks/results/.")
    args = parser.parse_args()
    run_bench(args.task_root, args.work, repeat=args.repeat, calib=args.calib)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    for suffix in ("json", "md"):
        shutil.copyfile(Path(args.work) / f"bench.{suffix}", results / f"{args.name}.{suffix}")
    print((results / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
