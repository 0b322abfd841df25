"""One-command training on your images (`train`) and on generated data (`demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from h2t_edge.cli import cli, options
from h2t_edge.cli.options import (
    DEFAULT_BACKBONE,
    DEVICE_OPTION,
    FIT_PRECISION_OPTION,
    GRID_OPTION,
    LATENCY_BUDGET_OPTION,
    MAX_ACCURACY_OPTION,
    MAX_CANDIDATES_OPTION,
    SOLVER_OPTION,
    TAPS_FROM_OPTION,
    deploy_precision_options,
    grid_option,
    output_option,
    quiet_option,
)
from h2t_edge.core.progress import StageBars


@cli.command()
@click.argument("dataset", type=click.Path(exists=True))
@output_option("task_dir", file_okay=False, required=True,
               help="Task folder: model/, model.onnx + model.json, candidates/, report.json, report.html.")
@click.option("--test", "test", type=click.Path(exists=True), default=None,
              help="Test set (class folders or .csv/.jsonl manifest): report test accuracy and a confusion matrix.")
@click.option("--backbone", "-b", default=DEFAULT_BACKBONE, show_default=True)
@click.option("--weights", default="bundled", show_default=True,
              help="'bundled', 'random', 'hub' or a .pth/.safetensors file.")
@click.option("--target-size", "-T", "target_sizes", multiple=True, type=int,
              help="Target sizes searched by CV (repeatable). Default: the backbone's small, medium and large "
                   "sizes (512, 2048, 8192 for CNNs; the paper's for resnet50 and ViT-B/16).")
@click.option("--tap", "taps", multiple=True, help="Only taps matching this name or pattern (repeatable).")
@GRID_OPTION
@MAX_CANDIDATES_OPTION
@FIT_PRECISION_OPTION
@SOLVER_OPTION
@DEVICE_OPTION
@MAX_ACCURACY_OPTION
@LATENCY_BUDGET_OPTION
@options.FULL_SEARCH_OPTION
@TAPS_FROM_OPTION
@click.option("--no-guard", is_flag=True,
              help="Choose among HEAD2TOE fits only (the paper), not the best of HEAD2TOE, LINEAR and HEAD2TOE+LINEAR.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Exports and feature caches (default: TASK_DIR/work); share one between tasks.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True)
@deploy_precision_options
@click.option("--compare-fp32/--no-compare-fp32", default=True, show_default=True,
              help="With --precision other than fp32: also fit the chosen T on fp32 features and show both side by "
                   "side in the report (CV and test accuracy, measured latency).")
@quiet_option()
def train(dataset, task_dir, test, backbone, weights, target_sizes, taps, grid, max_candidates, fit_precision,
          solver, device, max_accuracy, latency_budget, full_search, taps_from, no_guard, cache_dir, batch_size, on_error,
          precision, backend, calibration, calibration_images, compare_fp32, quiet) -> None:
    """Train a task on your images in one command: export, extract (one pass for every T), fit with CV
    over T (HEAD2TOE, LINEAR, HEAD2TOE+LINEAR), compile the best, test, and write report.html.

    DATASET is a folder of class subfolders or a .csv/.jsonl manifest. Rerun the same command to
    resume: finished steps are not redone."""
    from h2t_edge.train.protocol import summary_table
    from h2t_edge.train.protocol import train as run_train

    bars = StageBars(not quiet)
    result = run_train(dataset, task_dir, test=test, backbone=backbone, weights=weights,
                       target_sizes=target_sizes or None,
                       grid=options.make_grid(grid, max_candidates, fit_precision, solver, device, max_accuracy,
                                              latency_budget, full_search),
                       taps=taps or None, taps_from=taps_from,
                       guard=not no_guard, cache_dir=cache_dir, batch_size=batch_size, on_error=on_error,
                       precision=precision, backend=backend, calibration=calibration,
                       calibration_images=calibration_images, compare_fp32=compare_fp32,
                       progress=bars, log=lambda message: click.echo(message, err=True))
    bars.close()
    click.echo(summary_table(result))
    click.echo("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items())
               + (f" (kept: {', '.join(result.skipped)})" if result.skipped else ""))
    click.echo(f"wrote {result.graph} and {result.task_dir / 'report.html'}")


@cli.command()
@click.option("--workdir", default="h2t-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where data, features, task and graphs go (reused on rerun).")
@click.option("--target-size", "-T", default=512, show_default=True)
@grid_option("quick", help="CV grid; 'paper' is the full protocol and takes much longer.")
@quiet_option()
def demo(workdir, target_size, grid, quiet) -> None:
    """Run the whole path on a generated dSprites-style location task with the bundled backbone."""
    from h2t_edge.train.demo import run_demo

    report = run_demo(workdir, target_size=target_size, grid=options.make_grid(grid), show_progress=not quiet)
    click.echo(report.table())
    click.echo(f"\nreport: {Path(workdir) / 'demo_report.json'}")
