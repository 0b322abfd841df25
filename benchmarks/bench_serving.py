"""Serving and distributed extraction, measured in one run:

    flock /work/coord/heavy.lock python benchmarks/bench_serving.py

1. Served vs in-process: an EfficientNet-Lite0 task graph (a LINEAR head fitted on a small
   dSprites task) and a tiny task graph (whose compute is near zero, so its numbers are the serving
   overhead) behind `h2t-edge serve` (Triton, dynamic batching), queried over loopback with
   tritonclient gRPC at concurrency 1, 8 and 32 (one batch-1 request per call), against
   `runtime.Predictor.predict_arrays` called from the same number of threads in this process.
   Throughput is requests (= images) per second; latency percentiles are per request.
2. Ray vs local extraction of the task's training images with the exported backbone: local
   `extract_features`, then `--ray` on a local Ray instance with 1 worker (same compute as local,
   so the difference is Ray's overhead: start-up and per shard) and with 2 workers.

Clients, server and Ray share this machine's CPUs, so the numbers are for one box over loopback.
Results: benchmarks/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from h2t_edge.steps.extract_ray import RayBatches
from h2t_edge.core.machine import measured_on
from h2t_edge.steps.extract import FeatureCache, extract_features
from h2t_edge.pipeline import compile_step, export_step, fit_step
from h2t_edge.selection import SearchGrid
from h2t_edge.serving.serve import serve
from h2t_edge.suite.tasks.dsprites import build_dsprites_task
from runtime.io import atomic_write_json, atomic_write_text
from runtime.predictor import Predictor
from runtime.preprocess import load_image, preprocess_image

CONCURRENCY = (1, 8, 32)


def build_graphs(work: Path, n_train: int) -> tuple[dict, Path, Path]:
    """(dataset splits, backbone.onnx, lite0 task graph); tiny graph beside it."""
    data = build_dsprites_task(work / "data", n_train=n_train, n_test=64, bins=4, seed=0)
    exported = export_step("efficientnet_lite0", work / "backbone.onnx", 512, "bundled")
    extract_features(exported.path, data["train"], work / "features_fit", batch_size=32)
    fit_step(work / "features_fit", work / "task", task="dsprites_x", methods=("LINEAR",), grid=SearchGrid.quick())
    graph = compile_step(work / "task" / "linear", work / "dsprites_x.onnx").path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runtime"))
    from tiny_task import TASK_PREPROCESS, build_task_graph, task_sidecar_dict

    rng = np.random.default_rng(0)
    tiny = build_task_graph(rng.normal(size=(3, 4)).astype(np.float32), np.zeros(4, np.float32),
                            TASK_PREPROCESS.height, TASK_PREPROCESS.width)
    (work / "tiny.onnx").write_bytes(tiny.SerializeToString())
    atomic_write_json(work / "tiny.json", task_sidecar_dict("tiny"))
    return data, exported.path, graph


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def drive(call, images: np.ndarray, concurrency: int, requests: int) -> dict:
    """Run `call(image_batch_of_1)` `requests` times from `concurrency` threads; throughput + latency."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        local = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            x = images[i % len(images)][None]
            t0 = time.perf_counter()
            call(x)
            local.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(local)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "seconds": wall,
            "throughput_per_s": requests / wall, **percentiles(latencies)}


def bench_serving(graphs: dict[str, Path], images: dict[str, np.ndarray], requests: int,
                  warmup: int) -> tuple[list[dict], dict]:
    import tritonclient.grpc as grpc

    rows = []
    with serve(list(graphs.values()), http_port=0, grpc_port=0, max_queue_delay_us=500) as server:
        for name, graph in graphs.items():
            predictor = Predictor.load(graph)
            local = threading.local()

            def served(x, name=name):
                if not hasattr(local, "client"):
                    local.client = grpc.InferenceServerClient(server.endpoints.grpc)
                inputs = [grpc.InferInput("images", list(x.shape), "FP32")]
                inputs[0].set_data_from_numpy(x)
                return local.client.infer(name, inputs).as_numpy("probabilities")

            # Same answers from both paths before timing anything.
            x = images[name][:1]
            np.testing.assert_array_equal(served(x), predictor.predict_arrays(x)[0])
            for c in CONCURRENCY:
                drive(served, images[name], c, warmup)
                rows.append({"model": name, "path": "triton-grpc", **drive(served, images[name], c, requests)})
                drive(lambda x: predictor.predict_arrays(x), images[name], c, warmup)
                rows.append({"model": name, "path": "in-process", **drive(
                    lambda x: predictor.predict_arrays(x), images[name], c, requests)})
                print(rows[-2]["model"], c, f"served {rows[-2]['throughput_per_s']:.0f}/s "
                      f"in-process {rows[-1]['throughput_per_s']:.0f}/s", flush=True)
            predictor.close()
        stats = server_stats(server)
    return rows, stats


def server_stats(server) -> dict:
    """Triton's own counts: how many inferences ran in how many batched executions, per model."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(server.endpoints.grpc)
    out = {}
    for model in client.get_inference_statistics(as_json=True)["model_stats"]:
        out[model["name"]] = {"inferences": int(model["inference_count"]), "executions": int(model["execution_count"])}
    return out


def bench_extraction(backbone: Path, dataset, work: Path, shard_batches: int, batch_size: int) -> dict:
    import ray

    def timed(name: str, source=None) -> tuple[float, FeatureCache]:
        start = time.perf_counter()
        cache = extract_features(backbone, dataset, work / name, batch_size=batch_size, dtype="float32",
                                 overwrite=True, batch_source=source)
        return time.perf_counter() - start, cache

    local_s, local = timed("local")
    n_batches = -(-len(dataset) // batch_size)
    out = {"images": len(dataset), "batch_size": batch_size, "batches": n_batches,
           "local_seconds": local_s, "local_images_per_s": len(dataset) / local_s, "ray": []}
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    out["ray_init_seconds"] = time.perf_counter() - start
    try:
        # One worker does the same compute as local extraction: what it adds is Ray's overhead, a
        # fixed part (actor start, backbone load) and a per-shard part (scheduling, result transfer),
        # told apart by running the same batches as one shard and as one shard per batch.
        for workers, shard in ((1, n_batches), (1, 1), (2, shard_batches)):
            source = RayBatches(shard_batches=shard, workers=workers)
            seconds, cache = timed(f"ray_{workers}_{shard}", source)
            out["ray"].append({
                "workers": workers, "shard_batches": shard, "shards": source.stats["shards"], "seconds": seconds,
                "images_per_s": len(dataset) / seconds, "seconds_to_first_shard": source.stats["seconds_to_first_shard"],
                "bit_identical_to_local": bool(np.array_equal(np.asarray(cache.features), np.asarray(local.features))),
            })
    finally:
        ray.shutdown()
    return derive_overheads(out)


def derive_overheads(out: dict) -> dict:
    """Ray's overheads from one run's timings, against local extraction's time per batch: the start
    (first shard's result later than its compute: actor start, backbone load, scheduling) and, with
    one worker, the steady per-shard cost (later shards' spacing minus their compute)."""
    per_batch = out["local_seconds"] / out["batches"]
    for r in out["ray"]:
        r["start_overhead_seconds"] = r["seconds_to_first_shard"] - r["shard_batches"] * per_batch
        if r["workers"] == 1 and r["shards"] > 1:
            spacing = (r["seconds"] - r["seconds_to_first_shard"]) / (r["shards"] - 1)
            r["overhead_per_shard_ms"] = 1e3 * (spacing - r["shard_batches"] * per_batch)
    out.pop("fixed_overhead_seconds", None)
    out["overhead_per_shard_ms"] = next(r["overhead_per_shard_ms"] for r in out["ray"] if "overhead_per_shard_ms" in r)
    two = next(r for r in out["ray"] if r["workers"] == 2)
    out["ray_2_workers_speedup_vs_local"] = out["local_seconds"] / two["seconds"]
    return out


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# Serving (Triton via h2t-edge serve) and Ray extraction", "",
             f"Machine: {result['machine']}. One run; clients, server and Ray on the same CPUs, loopback.", "",
             "## Served (Triton gRPC, dynamic batching) vs in-process Predictor, batch-1 requests", "",
             "| model | concurrency | path | throughput (req/s) | p50 (ms) | p99 (ms) |", "|---|---|---|---|---|---|"]
    for r in result["serving"]:
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['path']} | {r['throughput_per_s']:.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    lines += ["", "Triton's own counts (inferences / batched executions): " + ", ".join(
        f"{m}: {s['inferences']} / {s['executions']}" for m, s in result["triton_stats"].items()), ""]
    e = result["extraction"]
    lines += ["## Feature extraction: Ray (local instance, 2 CPUs) vs local", "",
              f"{e['images']} images in {e['batches']} batches of {e['batch_size']}; Ray started once "
              f"({e['ray_init_seconds']:.1f} s, not counted below).", "",
              "| run | shards | seconds | images/s | first shard after (s) | bit-identical |", "|---|---|---|---|---|---|",
              f"| local | - | {e['local_seconds']:.2f} | {e['local_images_per_s']:.1f} | - | - |"]
    for r in e["ray"]:
        lines.append(f"| Ray, {r['workers']} worker(s), {r['shard_batches']} batch(es) per shard | {r['shards']} | "
                     f"{r['seconds']:.2f} | {r['images_per_s']:.1f} | {r['seconds_to_first_shard']:.2f} | "
                     f"{r['bit_identical_to_local']} |")
    lines += ["", "Start overhead per run (first shard later than its compute): " + ", ".join(
        f"{r['workers']} worker(s) / {r['shard_batches']} per shard: {r['start_overhead_seconds']:.2f} s" for r in e["ray"])
        + f". Steady overhead per shard (1 worker, later shards' spacing minus local compute): "
        f"{e['overhead_per_shard_ms']:.0f} ms. 2 workers vs local: {e['ray_2_workers_speedup_vs_local']:.2f}x "
        "(local ONNX Runtime already uses both CPUs).", ""]
    atomic_write_text(path, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="bench-work/serving")
    parser.add_argument("--images", type=int, default=256, help="Training images of the task (and extracted).")
    parser.add_argument("--requests", type=int, default=300, help="Timed requests per case.")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--shard-batches", type=int, default=2)
    parser.add_argument("--report-only", action="store_true",
                        help="Rewrite serving.md (and derived fields) from serving.json without measuring.")
    args = parser.parse_args()

    results = Path(__file__).parent / "results"
    if args.report_only:
        result = json.loads((results / "serving.json").read_text())
        derive_overheads(result["extraction"])
        atomic_write_json(results / "serving.json", result)
        write_markdown(result, results / "serving.md")
        print((results / "serving.md").read_text())
        return
    work = Path(args.work)
    data, backbone, graph = build_graphs(work, args.images)
    sidecar = Predictor.load(graph).preprocess
    lite0_images = np.stack([preprocess_image(load_image(p), sidecar) for p in data["test"].paths[:32]])
    tiny_images = np.random.default_rng(0).normal(size=(32, 3, 32, 32)).astype(np.float32)
    serving, stats = bench_serving({"dsprites_x": graph, "tiny": work / "tiny.onnx"},
                                   {"dsprites_x": lite0_images, "tiny": tiny_images}, args.requests, args.warmup)
    extraction = bench_extraction(backbone, data["train"], work / "extract", args.shard_batches, batch_size=32)
    result = {**measured_on(),
              "serving": serving, "triton_stats": stats, "extraction": extraction}
    atomic_write_json(results / "serving.json", result)
    write_markdown(result, results / "serving.md")
    print((results / "serving.md").read_text())


if __name__ == "__main__":
    main()
