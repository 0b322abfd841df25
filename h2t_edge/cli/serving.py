"""Deployment targets: TensorRT checks and engines (`check`, `build-engine`), benchmarks (`bench`),
Triton model repositories (`export-triton`) and a Triton server (`serve`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from h2t_edge.cli import cli, options
from h2t_edge.cli.options import (
    SIGN_KEY_OPTION,
    TRUSTED_KEY_OPTION,
    backend_option,
    output_option,
    precision_option,
    quiet_option,
)
from h2t_edge.core.progress import StageBars


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--tensorrt", "tensorrt", is_flag=True, required=True,
              help="Check that TensorRT's ONNX parser accepts the graph (no GPU or TensorRT needed).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(model, tensorrt, as_json) -> None:
    """Check statically that MODEL.onnx builds with TensorRT: opset, operators, data types,
    dynamic dimensions (batch only) and control flow. Lists each offending node by name;
    exits 1 when there is any."""
    from exporters.trt_check import check_tensorrt

    report = check_tensorrt(model)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())
    if not report.ok:
        sys.exit(1)


@cli.command(name="build-engine")
@click.argument("graph", type=click.Path(exists=True, dir_okay=False))
@backend_option(help=None)
@precision_option("int8", help=None)
@click.option("--calib", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of task images to calibrate int8 on (searched recursively).")
@click.option("--calib-limit", default=64, show_default=True, help="Use at most this many calibration images.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1),
              help="Largest batch of the TensorRT optimization profile (min 1, opt about half).")
@output_option(dir_okay=False, default=None,
               help="Default: next to GRAPH as STEM.BACKEND.PRECISION.{onnx,xml,engine}.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="TensorRT engine and timing cache folder (keyed by ONNX hash, TensorRT, GPU, precision, profile).")
@click.option("--check", "check", type=click.Path(exists=True, file_okay=False), default=None,
              help="Held-out task images (class subfolders named as the task's classes give accuracy) to check a "
                   "fp16/bf16/int8 build of a task graph on. Default: the --calib images not drawn for calibration.")
@click.option("--accept-drop", is_flag=True,
              help="Keep a build that fails the check (top-1 agreement below 99% or accuracy down more than 1 "
                   "point); the sidecar records it.")
@SIGN_KEY_OPTION
def build_engine_(graph, backend, precision, calib, calib_limit, max_batch, output, cache_dir, check, accept_drop,
                  sign_key) -> None:
    """Build an engine or optimized model from GRAPH.onnx, with a JSON sidecar saying how.

    A fp16, bf16 or int8 build of a task graph is checked against GRAPH on held-out images and refused
    (non-zero exit, nothing kept) when its predictions drift; a head fitted on fp32 features usually does
    at int8: fit at int8 instead (`train --precision int8`)."""
    from h2t_edge.serving.engines import build_engine

    report = build_engine(graph, backend, precision, output, calib, calib_limit, max_batch, cache_dir,
                          options.signing_key(sign_key), check=check, accept_drop=accept_drop)
    calibration = report.build.get("calibration")
    click.echo(f"wrote {report.path} ({report.bytes / 1e6:.2f} MB) and {report.sidecar.name} in "
               f"{report.build['seconds']:.1f} s: {report.build['method']}"
               + (f"; calibrated on {calibration['images']} images" if calibration else ""))
    checked = report.build.get("check")
    if checked and "agreement" in checked:
        click.echo(f"check on {checked['images']} held-out images: top-1 agreement {100 * checked['agreement']:.1f}%"
                   + (f", accuracy {100 * checked['source_accuracy']:.1f}% -> {100 * checked['accuracy']:.1f}%"
                      if "accuracy" in checked else "")
                   + (" (below the bar; kept with --accept-drop)" if checked.get("accepted_drop") else ""))


@cli.command()
@click.argument("task_root", type=click.Path(exists=True, file_okay=False))
@output_option("out", file_okay=False, default="bench", show_default=True,
               help="Where graphs, bench.json and bench.md go.")
@click.option("--batch", default=32, show_default=True, help="Batch size for the throughput runs.")
@click.option("--warmup", default=10, show_default=True)
@click.option("--repeat", default=50, show_default=True, help="Timed batch-1 runs per case.")
@click.option("--calib", type=click.Path(exists=True, file_okay=False), default=None,
              help="Task images: also build and measure ONNX Runtime int8 (QDQ) graphs.")
@quiet_option("No progress bar.")
def bench(task_root, out, batch, warmup, repeat, calib, quiet) -> None:
    """Measure the plain backbone, the LINEAR and HEAD2TOE task graphs and the backbone with all taps
    on every backend available here (latency p50/p90/p99, throughput, peak memory, bytes).

    TASK_ROOT is the output folder of `h2t-edge fit` (with head2toe/ and linear/).
    """
    from h2t_edge.serving.bench import run_bench

    bars = StageBars(not quiet)
    run_bench(task_root, out, batch=batch, warmup=warmup, repeat=repeat, calib=calib, progress=bars)
    bars.close()
    click.echo((Path(out) / "bench.md").read_text().rstrip("\n"))  # the table, with the machine it ran on
    click.echo(f"\nwrote {Path(out) / 'bench.json'} and {Path(out) / 'bench.md'}")


@cli.command("export-triton")
@click.argument("task_graphs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@output_option(file_okay=False, required=True, help="Model repository folder.")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--max-queue-delay-us", default=100, show_default=True, type=click.IntRange(0),
              help="How long Triton's dynamic batcher waits to fill a batch.")
@click.option("--tensorrt", type=click.Choice(["FP16", "FP32", "off"]), default="FP16", show_default=True,
              help="ONNX Runtime's TensorRT accelerator on GPU servers ('off' leaves it out).")
@click.option("--version", "model_version", default=1, show_default=True, type=click.IntRange(1),
              help="Version folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace model folders that exist.")
@TRUSTED_KEY_OPTION
@SIGN_KEY_OPTION
def export_triton(task_graphs, output, max_batch_size, max_queue_delay_us, tensorrt, model_version, overwrite,
                  trusted_keys, sign_key) -> None:
    """Write a Triton model repository: one onnxruntime model per TASK_GRAPH (with its sidecar).
    Each graph is verified first (seal, sha256; a trusted signature with --trusted-key)."""
    from h2t_edge.serving.triton_repo import export_repository

    dirs = export_repository(task_graphs, output, overwrite=overwrite, version=model_version,
                             max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                             tensorrt=None if tensorrt == "off" else tensorrt, trusted_keys=trusted_keys,
                             signing_key=options.signing_key(sign_key))
    for model_dir in dirs:
        click.echo(f"{model_dir.name}: {model_dir}/config.pbtxt, {model_dir}/{model_version}/model.onnx")


@cli.command()
@click.argument("task_graphs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="HTTP port (0: a free one).")
@click.option("--grpc-port", default=None, type=click.IntRange(0, 65535), help="gRPC port  [default: PORT + 1]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--max-queue-delay-us", default=500, show_default=True, type=click.IntRange(0))
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Model instances per task.")
@click.option("--threads", default=None, type=click.IntRange(1), help="ONNX Runtime threads per instance.")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="Keep the served repository and the server log here (default: a temporary folder).")
@TRUSTED_KEY_OPTION
def serve(task_graphs, port, grpc_port, host, max_batch_size, max_queue_delay_us, instances, threads, workdir,
          trusted_keys) -> None:
    """Serve TASK_GRAPHs on Triton Inference Server (HTTP and gRPC), one model per task, until Ctrl-C."""
    import signal as signals
    import threading

    from h2t_edge.serving.serve import serve as start_server

    server = start_server(task_graphs, host=host, http_port=port, grpc_port=grpc_port, workdir=workdir,
                          max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                          instances=instances, threads=threads, trusted_keys=trusted_keys)
    stopped = threading.Event()
    # Both stop the server, also where the parent started us with SIGINT ignored (a shell's `&`, some
    # test runners): an inherited SIG_IGN would otherwise never raise KeyboardInterrupt.
    for signum in (signals.SIGTERM, signals.SIGINT):
        signals.signal(signum, lambda *_: stopped.set())
    try:
        click.echo(f"serving on http://{server.endpoints.http} and grpc {server.endpoints.grpc} "
                   f"(log: {server.log_path}); Ctrl-C stops")
        while not stopped.wait(0.5) and server.running:
            pass
    except KeyboardInterrupt:
        pass
    finally:
        died = not server.running
        server.stop()
    if died:
        raise click.ClickException(f"tritonserver stopped unexpectedly: {server.log_tail()}")
