"""What checking an artifact costs at load: `Predictor.load` of a demo-sized task graph with its
checks (seal, graph sha256, ed25519 signature by a trusted key, version record) against the same
load without them, in one run. Writes benchmarks/results/trust.{json,md}.

    python benchmarks/bench_trust.py --work /tmp/trust-bench [--repeat 15]

The graph: EfficientNet-Lite0 (bundled weights) at T = 512 with a HEAD2TOE head of F = 0.2 (5,659
features spread over every tap, as the demo's CV pick), random weights: what is loaded and hashed
does not depend on how the head was fitted. "unchecked" builds the same Predictor from the same
files without any check (runner + parsed sidecar + the probe inference every load runs). The two
loads alternate, `repeat` times each, after one warm-up of each; the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from h2t_edge.core.machine import measured_on
from runtime.io import atomic_write_json, atomic_write_text, read_json


def prepare(work: Path) -> tuple[Path, Path]:
    """The signed task graph and the trusted public key, built once in `work`."""
    from exporters.backbones import load_backbone
    from exporters.export import export_backbone
    from h2t_edge.core.artifacts import TaskHead
    from h2t_edge.steps.compile import compile_step
    from runtime.io import atomic_write_bytes, file_sha256
    from runtime.trust import SigningKey

    graph, pub = work / "demo_task.onnx", work / "keys" / "signing.pub"
    if graph.is_file() and pub.is_file():
        return graph, pub
    work.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate()
    key.save(work / "keys")
    bb = load_backbone("efficientnet_lite0", weights="bundled")
    model, layout = export_backbone(bb, 512, None)
    backbone = work / "backbone.onnx"
    atomic_write_bytes(backbone, model.SerializeToString())
    rng = np.random.default_rng(0)
    total = layout["total_features"]
    features = np.sort(rng.choice(total, int(0.2 * total), replace=False))
    head = TaskHead(task="demo", method="HEAD2TOE", classes=[f"c{i}" for i in range(16)], features=features,
                    weight=rng.normal(size=(len(features), 16)).astype(np.float32),
                    bias=np.zeros(16, np.float32), layout=layout,
                    backbone={"name": layout["backbone"], "weights": layout["weights"],
                              "onnx_sha256": file_sha256(backbone)})
    head.save(work / "task")
    compile_step(work / "task", graph, signing_key=key)
    return graph, pub


def load_checked(graph: Path, pub: Path, record: Path):
    from runtime.predictor import Predictor

    return Predictor.load(graph, providers=["CPUExecutionProvider"], trusted_keys=[pub], version_record=record)


def load_unchecked(graph: Path):
    from runtime.backends import create_runner
    from runtime.predictor import Predictor, TaskSidecar

    sidecar = TaskSidecar.from_dict(read_json(graph.with_suffix(".json"), "task sidecar"), source=str(graph))
    runner = create_runner(graph, "onnxruntime", providers=["CPUExecutionProvider"])
    return Predictor(runner, sidecar, graph)


def timed(load) -> float:
    start = time.perf_counter()
    predictor = load()
    seconds = time.perf_counter() - start
    predictor.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("bench-work/trust"))
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "trust")
    args = parser.parse_args()
    graph, pub = prepare(args.work)
    record = args.work / "versions.json"
    from runtime.predictor import read_task_sidecar

    checked, unchecked, checks_only = [], [], []
    timed(lambda: load_checked(graph, pub, record))
    timed(lambda: load_unchecked(graph))
    for _ in range(args.repeat):
        checked.append(timed(lambda: load_checked(graph, pub, record)))
        unchecked.append(timed(lambda: load_unchecked(graph)))
        start = time.perf_counter()
        read_task_sidecar(graph, trusted_keys=[pub], version_record=record)
        checks_only.append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(v) for name, v in
          (("checked", checked), ("unchecked", unchecked), ("checks_only", checks_only))}
    result = {
        "graph": str(graph), "graph_bytes": graph.stat().st_size, "repeat": args.repeat,
        "median_ms": ms, "ratio_checked_to_unchecked": ms["checked"] / ms["unchecked"],
        "checks_share_of_load": ms["checks_only"] / ms["checked"],
        **measured_on(),
        "samples_ms": {"checked": [1000 * s for s in checked], "unchecked": [1000 * s for s in unchecked]},
    }
    atomic_write_json(args.out.with_suffix(".json"), result)
    md = (f"# Cost of the load-time checks (`{Path(__file__).name}`)\n\n"
          f"Demo-sized task graph ({result['graph_bytes'] / 1e6:.1f} MB, EfficientNet-Lite0, F = 0.2), "
          f"ONNX Runtime CPU, {args.repeat} alternating loads each, {result['date']}, "
          f"{result['machine']}.\n\n"
          "| load | median ms |\n|---|---:|\n"
          f"| `Predictor.load` with every check (seal, graph sha256, signature, version record) | "
          f"{ms['checked']:.1f} |\n"
          f"| the same Predictor without checks | {ms['unchecked']:.1f} |\n"
          f"| the checks alone (`read_task_sidecar`) | {ms['checks_only']:.1f} |\n\n"
          f"Checked / unchecked: **{result['ratio_checked_to_unchecked']:.3f}x**; the checks are "
          f"{100 * result['checks_share_of_load']:.1f}% of a checked load (target: at most 5%).\n")
    atomic_write_text(args.out.with_suffix(".md"), md)
    print(md)
    print(json.dumps(ms))


if __name__ == "__main__":
    main()
