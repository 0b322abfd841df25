"""int8 calibration recipe by measurement: method x image count -> fidelity of the features.

For each task (EfficientNet-Lite0, T = 512 extraction graph, all taps), the backbone trunk is
quantized (`exporters.quantize.quantize_int8_qdq`, ONNX Runtime, uint8 activations, per-channel
int8 weights) with each calibration method on N training images, and the pooled, normalized tap
features of 200 other training images are compared with fp32 through the runtime's own ONNX
Runtime session (`runtime.backends.onnxruntime.SessionLoader`, whose session options decide how
int8 products are computed on this CPU). Reported: the mean cosine of the concatenated features
per image, the median and worst relative L2 error over taps, and the calibration seconds. The
default of `exporters.quantize` (`DEFAULT_CALIBRATION`, `DEFAULT_CALIBRATION_IMAGES`) is the
recipe with the best mean cosine over the tasks: fidelity first, since calibration takes seconds
once per task while every prediction carries the error.

Writes benchmarks/results/calibration.{json,md}; run it alone on the machine.

    python benchmarks/bench_calibration.py [--tasks dspr_loc,digits] [--counts 32,64,128,256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h2t_edge.core.machine import measured_on  # noqa: E402
from runtime.io import atomic_write_json, atomic_write_text  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "calibration"
HELD_OUT = 200


def _features(path_or_bytes, x: np.ndarray) -> list[np.ndarray]:
    from runtime.backends.onnxruntime import SessionLoader

    session = SessionLoader(path_or_bytes, providers=["CPUExecutionProvider"])()
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i:i + 25]}) for i in range(0, len(x), 25)]
    return [np.concatenate(o) for o in zip(*outs)]


def run_task(task: str, methods, counts, work: Path) -> list[dict]:
    from exporters.quantize import quantize_int8_qdq
    from h2t_edge.steps.export import cached_export
    from h2t_edge.steps.extract import read_multi_layout
    from h2t_edge.suite.tasks.registry import build_task
    from runtime.preprocess import PreprocessConfig, load_image, preprocess_image

    onnx_path, _ = cached_export(work / "backbones", "efficientnet_lite0", "bundled", [512], multi=True)
    cfg = PreprocessConfig.from_dict(read_multi_layout(onnx_path)["layouts"]["512"]["preprocess"])
    paths = list(build_task(task, seed=0).train.paths)
    order = np.random.default_rng(0).permutation(len(paths))
    held = np.stack([preprocess_image(load_image(paths[i]), cfg) for i in order[:HELD_OUT]])
    pool = [paths[i] for i in order[HELD_OUT:]]
    reference = _features(str(onnx_path), held)
    rows = []
    for method in methods:
        for n in counts:
            x = np.stack([preprocess_image(load_image(p), cfg) for p in pool[:n]])
            start = time.perf_counter()
            out = work / f"{task}-{method}-{n}.onnx"
            quantize_int8_qdq(onnx_path, out, [x[i:i + 8] for i in range(0, n, 8)], method=method)
            seconds = time.perf_counter() - start
            got = _features(str(out), held)
            a, q = np.concatenate(reference, 1), np.concatenate(got, 1)
            cosine = (a * q).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(q, axis=1), 1e-12)
            rel = [float(np.linalg.norm(r - g) / max(np.linalg.norm(r), 1e-12)) for r, g in zip(reference, got)]
            rows.append({"task": task, "method": method, "images": n, "cosine": float(cosine.mean()),
                         "rel_error_median": float(np.median(rel)), "rel_error_max": float(max(rel)),
                         "calibration_seconds": seconds})
            print(rows[-1], flush=True)
            out.unlink()
    return rows


def choose(rows: list[dict]) -> dict:
    """The recipe with the best mean cosine over tasks."""
    recipes = {}
    for r in rows:
        recipes.setdefault((r["method"], r["images"]), []).append(r)
    means = {k: (float(np.mean([r["cosine"] for r in v])), float(np.mean([r["calibration_seconds"] for r in v])))
             for k, v in recipes.items()}
    method, images = max(means, key=lambda k: means[k][0])
    return {"method": method, "images": images, "cosine": means[(method, images)][0],
            "seconds": means[(method, images)][1]}


def markdown(result: dict) -> str:
    lines = [f"# int8 calibration: fidelity of the features to fp32 ({HELD_OUT} held-out images per task)", "",
             f"Measured {result['date']} on {result['machine']}. EfficientNet-Lite0, T = 512, every tap; the trunk "
             "quantized by ONNX Runtime (uint8 activations, per-channel int8 weights), run through the runtime's "
             "session.", "",
             "| task | method | images | mean cosine | median rel. error | worst rel. error | calibration s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['method']} | {r['images']} | {r['cosine']:.4f} | {r['rel_error_median']:.3f} "
                     f"| {r['rel_error_max']:.3f} | {r['calibration_seconds']:.1f} |")
    c = result["choice"]
    lines += ["", f"Chosen (the best mean cosine over the tasks): **{c['method']}, {c['images']} images** "
              f"(mean cosine {c['cosine']:.4f}, {c['seconds']:.0f} s to calibrate)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="dspr_loc,digits")
    parser.add_argument("--methods", default="minmax,percentile,entropy")
    parser.add_argument("--counts", default="32,64,128,256")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work"))
    parser.add_argument("--report", action="store_true", help="Rewrite the markdown from the JSON only.")
    args = parser.parse_args()
    if args.report:
        from runtime.io import read_json

        result = read_json(OUT.with_suffix(".json"), "calibration results")
        result["choice"] = choose(result["rows"])
        atomic_write_json(OUT.with_suffix(".json"), result)
        atomic_write_text(OUT.with_suffix(".md"), markdown(result))
        print(markdown(result))
        return
    work = Path(args.work)
    rows = []
    for task in args.tasks.split(","):
        rows += run_task(task, args.methods.split(","), [int(c) for c in args.counts.split(",")], work)
    result = {"format": "h2t-edge/bench-calibration", "version": 1, **measured_on(), "rows": rows,
              "choice": choose(rows)}
    atomic_write_json(OUT.with_suffix(".json"), result)
    atomic_write_text(OUT.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
