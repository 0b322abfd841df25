"""Soak test: one Predictor under minutes of mixed concurrent requests; no errors, bounded memory.

    flock /work/coord/heavy.lock python benchmarks/soak.py            # 2 minutes, 4 threads
    python benchmarks/soak.py --graph task.onnx --seconds 600         # any compiled task graph
    python benchmarks/soak.py --rate 1.5                               # paced, ~1/4 core, no lock needed

Without --graph, a real-size task graph is compiled once (EfficientNet-Lite0 at T=512, a seeded
random head over 1% of its features; the weights do not matter to a soak). Each of --threads
threads then sends requests drawn at random until --seconds or --max-requests:
- predict_paths over 1-16 files of a pool that mixes sizes and kinds (RGB, L, RGBA, palette with
  transparency, CMYK JPEG, 16-bit PNG, EXIF-rotated JPEG) and two broken files, on_error='skip';
- the same with on_error='raise' on a broken file (an ImageError is the expected answer);
- predict_arrays on 1-8 preprocessed images.
Every answer is checked against the serial answer for the same input: bit-exact for the same
batch; within 1e-5 (counted as "inexact") where a file's batch differs, so a race shows as a
mismatch. The process's resident memory (RSS) is sampled every second; after a warm-up it may
grow by at most --rss-bound-mib. Writes benchmarks/results/soak.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from h2t_edge.core.machine import measured_on
from runtime.errors import ImageError
from runtime.predictor import Predictor

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mib() -> float:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def compile_default_graph(out: Path) -> Path:
    """EfficientNet-Lite0 at T=512 with a seeded random head on 1% of the features."""
    from exporters.backbones import load_backbone
    from exporters.compile import OUTPUT_NAMES, compile_task_graph
    from exporters.export import feature_layout
    from runtime.io import atomic_write_bytes, atomic_write_json, file_sha256

    bb = load_backbone("efficientnet_lite0", weights="bundled")
    layout = feature_layout(bb, bb.taps, 512)
    rng = np.random.default_rng(0)
    k, classes = layout["total_features"] // 100, [f"class{i}" for i in range(10)]
    features = np.sort(rng.choice(layout["total_features"], k, replace=False)).astype(np.int64)
    weight = rng.normal(scale=0.05, size=(k, len(classes))).astype(np.float32)
    model, _ = compile_task_graph(bb, layout, features, weight, np.zeros(len(classes), np.float32))
    path = out / "soak_task.onnx"
    atomic_write_bytes(path, model.SerializeToString())
    atomic_write_json(path.with_suffix(".json"), {
        "format": "h2t-edge/task-graph", "version": 1, "task": "soak", "classes": classes,
        "preprocess": layout["preprocess"], "input": "images",
        "outputs": {"probabilities": OUTPUT_NAMES[0], "logits": OUTPUT_NAMES[1]},
        "backbone": {"name": layout["backbone"]}, "graph_sha256": file_sha256(path)})
    return path


def image_pool(folder: Path, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """(good files of many kinds and sizes, broken files)."""
    rng = np.random.default_rng(seed)
    good = []
    for i in range(24):
        h, w = (int(x) for x in rng.integers(40, 700, size=2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        kind = i % 7
        path = folder / f"img{i:02d}.{'jpg' if kind in (4, 6) else 'png'}"
        img = Image.fromarray(pixels)
        if kind == 1:
            img = img.convert("L")
        elif kind == 2:
            img = Image.fromarray(np.dstack([pixels, pixels[..., 0]]), mode="RGBA")
        elif kind == 3:
            img = img.convert("P")
            img.info["transparency"] = 0
        elif kind == 4:
            img = img.convert("CMYK")
        elif kind == 5:
            img = Image.fromarray((pixels[..., 0].astype(np.uint16) * 257))
        if kind == 6:
            exif = Image.Exif()
            exif[0x0112] = 6
            img.save(path, exif=exif.tobytes())
        else:
            img.save(path)
        good.append(path)
    broken = [folder / "truncated.png", folder / "empty.jpg"]
    broken[0].write_bytes(good[0].read_bytes()[:200])
    broken[1].write_bytes(b"")
    return good, broken


def soak(graph: Path, seconds: float, threads: int, max_requests: int, warmup: float, seed: int,
         rate: float | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="h2t-soak-"))
    good, broken = image_pool(work, seed)
    rng = random.Random(seed)
    predictor = Predictor.load(graph, intra_op_threads=1)
    cfg = predictor.preprocess
    arrays = np.random.default_rng(seed).normal(size=(8, *cfg.input_size)).astype(np.float32)
    # Serial answers, the reference for every concurrent one.
    reference = {p: r for p, r in zip(good + broken, predictor.predict_paths(good + broken, on_error="skip"))}
    ref_arrays = {(lo, hi): predictor.predict_arrays(arrays[lo:hi])[0] for lo in range(8) for hi in range(lo + 1, 9)}

    counts = {"requests": 0, "images": 0, "skipped_as_expected": 0, "raised_as_expected": 0, "inexact": 0}
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    start = time.perf_counter()
    schedule = {"next": start}  # with --rate, request k may start at start + k / rate

    def request(r: random.Random) -> tuple[int, int, int]:
        kind = r.random()
        if kind < 0.6:
            chunk = r.sample(good + broken, r.randint(1, 16))
            out = predictor.predict_paths(chunk, batch_size=r.randint(1, 8), on_error="skip")
            for path, p in zip(chunk, out):
                ref = reference[path]
                if p.error is not None:
                    if ref.error is None:
                        raise AssertionError(f"{path}: error {p.error} where the serial run gave {ref.label}")
                elif not np.array_equal(p.probabilities, ref.probabilities):
                    # Another batch composition may round differently; more than that is a failure.
                    np.testing.assert_allclose(p.probabilities, ref.probabilities, rtol=0, atol=1e-5, err_msg=str(path))
                    with lock:
                        counts["inexact"] += 1
            return len(chunk), sum(p.error is not None for p in out), 0
        if kind < 0.7:
            try:
                predictor.predict_paths([rng_choice(r, good), rng_choice(r, broken)], on_error="raise")
            except ImageError:
                return 2, 0, 1
            raise AssertionError("a broken file did not raise ImageError")
        lo = r.randint(0, 7)
        hi = r.randint(lo + 1, 8)
        probabilities, _ = predictor.predict_arrays(arrays[lo:hi])
        if not np.array_equal(probabilities, ref_arrays[lo, hi]):  # the same batch: bit-exact
            raise AssertionError(f"predict_arrays on rows {lo}:{hi} differs from the serial run")
        return hi - lo, 0, 0

    def worker(k: int) -> None:
        r = random.Random(seed * 1000 + k)
        while not stop.is_set():
            with lock:
                if counts["requests"] >= max_requests:
                    return
                counts["requests"] += 1
                at = max(schedule["next"], time.perf_counter())
                schedule["next"] = at + (1 / rate if rate else 0)
            if stop.wait(max(0.0, at - time.perf_counter())):
                with lock:
                    counts["requests"] -= 1  # never sent
                return
            try:
                images, skipped, raised = request(r)
            except Exception as exc:  # noqa: BLE001 - every unexpected failure is recorded
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                counts["images"] += images
                counts["skipped_as_expected"] += skipped
                counts["raised_as_expected"] += raised

    samples = [(0.0, rss_mib())]
    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    while time.perf_counter() - start < seconds and any(t.is_alive() for t in pool):
        time.sleep(1.0)
        samples.append((time.perf_counter() - start, rss_mib()))
    stop.set()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    samples.append((elapsed, rss_mib()))
    predictor.close()

    t, rss = np.asarray(samples).T
    after = t >= warmup
    slope = float(np.polyfit(t[after], rss[after], 1)[0] * 60) if after.sum() >= 3 else float("nan")
    return {
        "graph": str(graph), "graph_bytes": graph.stat().st_size, "threads": threads, "seconds": round(elapsed, 1),
        "rate_limit_per_second": rate,
        "warmup_seconds": warmup, **counts, "failures": len(failures), "failure_examples": failures[:10],
        "requests_per_second": round(counts["requests"] / elapsed, 2),
        "rss_mib": {"start": round(float(rss[0]), 1), "after_warmup": round(float(rss[after][0]), 1),
                    "end": round(float(rss[-1]), 1), "max": round(float(rss.max()), 1),
                    "growth_after_warmup": round(float(rss[after][-1] - rss[after][0]), 1),
                    "slope_after_warmup_mib_per_min": round(slope, 2)},
        "rss_samples": [[round(float(a), 1), round(float(b), 1)] for a, b in samples],
        "python": platform.python_version(), **measured_on(),
    }


def rng_choice(r: random.Random, items):
    return items[r.randrange(len(items))]


def write_results(result: dict, bound: float) -> None:
    growth = result["rss_mib"]["growth_after_warmup"]
    result["rss_bound_mib"] = bound
    result["passed"] = result["failures"] == 0 and growth <= bound and result["requests"] > 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["rss_mib"]
    (RESULTS / "soak.md").write_text(
        "# Soak: one Predictor, mixed concurrent requests\n\n"
        f"{result['threads']} threads for {result['seconds']} s"
        + (f" (paced: at most {result['rate_limit_per_second']} requests/s)" if result["rate_limit_per_second"] else "")
        + f" on {Path(result['graph']).name} "
        f"({result['graph_bytes'] / 1e6:.1f} MB, onnxruntime CPU, 1 intra-op thread), {result['machine']}.\n\n"
        "| requests | images | req/s | unexpected errors | expected skips | expected raises | inexact | RSS start | "
        "RSS after warm-up | RSS end | RSS max | growth after warm-up (bound) | slope |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {result['requests']} | {result['images']} | {result['requests_per_second']} | {result['failures']} | "
        f"{result['skipped_as_expected']} | {result['raised_as_expected']} | {result['inexact']} | {m['start']} MiB | {m['after_warmup']} MiB | "
        f"{m['end']} MiB | {m['max']} MiB | {growth} MiB (<= {bound} MiB) | {m['slope_after_warmup_mib_per_min']} MiB/min |\n\n"
        f"Warm-up: the first {result['warmup_seconds']} s (allocator and ONNX Runtime arenas). Every answer is compared "
        "with the serial answer for the same input. Result: **" + ("pass" if result["passed"] else "FAIL") + "**.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graph", help="A compiled task graph (.onnx with its sidecar); default: compile one.")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--rss-bound-mib", type=float, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=None,
                        help="Cap on requests per second over all threads (a paced soak on a shared machine).")
    parser.add_argument("--compile-to", help=argparse.SUPPRESS)  # internal: compile the default graph, exit
    args = parser.parse_args()
    if args.compile_to:
        compile_default_graph(Path(args.compile_to))
        return
    graph = Path(args.graph) if args.graph else None
    if graph is None:
        # In a child process, so torch (the compiler) is not in the memory this soak measures.
        out = Path(tempfile.mkdtemp(prefix="h2t-soak-graph-"))
        subprocess.run([sys.executable, __file__, "--compile-to", str(out)], check=True)
        graph = out / "soak_task.onnx"
    result = soak(graph, args.seconds, args.threads, args.max_requests, args.warmup, args.seed, args.rate)
    write_results(result, args.rss_bound_mib)
    print((RESULTS / "soak.md").read_text())
    if not result["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
