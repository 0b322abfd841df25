"""The paper's analyses: neural-collapse diagnostics (`diagnose`), one-layer fine-tuning
(`finetune`) and backbone selection under a latency budget (`search`)."""

from __future__ import annotations

from pathlib import Path

import click

from h2t_edge.cli import cli, options, render
from h2t_edge.cli.options import BACKEND_OPTION, PRECISION_OPTION, grid_option, output_option, quiet_option
from h2t_edge.core.progress import StageBars


@cli.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--task", "task_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A fitted task (e.g. OUTPUT/head2toe from `h2t-edge fit` on this cache): show its selected "
                   "share per tap and the rank correlation with NC1.")
@output_option(dir_okay=False, default=None,
               help="Writes OUTPUT.json and, with matplotlib, OUTPUT.png. [default: CACHE/nc1]")
@quiet_option("No progress bar.")
def diagnose(cache, task_dir, output, quiet) -> None:
    """NC1 (within-class variability collapse) of every tap on the cache's training features."""
    from h2t_edge.core.plots import MATPLOTLIB_MISSING
    from h2t_edge.research.diagnose import diagnose as run_diagnose
    from h2t_edge.research.diagnose import write_diagnosis

    bars = StageBars(not quiet)
    result = run_diagnose(cache, task_dir, progress=bars.stage("NC1 per tap"))
    bars.close()
    paths = write_diagnosis(result, output or Path(cache) / "nc1")
    click.echo(render.diagnosis_table(result))
    if "png" in paths:
        click.echo(f"wrote {paths['json']} and {paths['png']}")
    else:
        click.echo(f"wrote {paths['json']}")
        click.echo(f"figures skipped: {MATPLOTLIB_MISSING}")


@cli.command()
@click.argument("source", type=click.Path(exists=True))
@output_option("out", file_okay=False, required=True, help="Fine-tuned task directory.")
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
@quiet_option()
def finetune(source, out, method, layer, backbone, weights, epochs, batch_size, lr, seed, test_set, graph,
             quiet) -> None:
    """Fine-tune one backbone block plus a linear head (Layer-FT / SCL-FT), everything else frozen.

    SOURCE is a feature cache (its images, labels and backbone are used) or an image dataset. The
    frozen prefix runs once; each epoch trains only the tuned block and what follows it.
    """
    from h2t_edge.research.finetune import FineTuneConfig, finetune_step

    bars = StageBars(not quiet)
    config = FineTuneConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    report = finetune_step(source, out, method=method, layer=layer, backbone=backbone, weights=weights,
                           config=config, test=test_set, progress=bars)
    bars.close()
    click.echo(render.finetune_summary(report, method))
    if graph:
        from h2t_edge.steps.compile import compile_any

        compiled = compile_any([report.out], graph)
        path = Path(compiled.path)
        click.echo(f"wrote {path} ({compiled.bytes / 1e6:.2f} MB) and {path.with_suffix('.json').name}")


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
@grid_option("quick", help="CV grid of the --fit HEAD2TOE fits.")
@click.option("--latency-repeat", default=30, show_default=True, help="Timed batch-1 runs per backbone.")
@output_option("out", file_okay=False, default="h2t-search", show_default=True,
               help="Writes OUTPUT/search.json and OUTPUT/search.png; exports and feature caches are kept here.")
@quiet_option()
def search(dataset, pool, weight_items, budget_ms, backend, precision, fit_k, test_data, target_size, grid,
           latency_repeat, out, quiet) -> None:
    """Rank the backbone pool for DATASET: ImageNet top-1, kNN and linear-probe proxies on the
    pre-logits and on all layers, NC1 of the pre-logits, the paper's hybrid; latency on BACKEND;
    optional HEAD2TOE fits.

    DATASET is a folder with one subfolder per class, or a .csv/.jsonl manifest.
    """
    from h2t_edge.research.model_search import search_models

    weights = {}
    for item in weight_items:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise click.BadParameter(f"{item!r}: use NAME=SOURCE", param_hint="--weights")
        weights[name] = source
    options.backend_options(backend, precision)  # rejects --precision with onnxruntime
    bars = StageBars(not quiet)
    report = search_models(dataset, out, pool=[p.strip() for p in pool.split(",") if p.strip()] if pool else None,
                           weights=weights, budget_ms=budget_ms, backend=backend, precision=precision, fit_k=fit_k,
                           test=test_data, target_size=target_size, grid=options.make_grid(grid),
                           latency_repeat=latency_repeat, progress=bars)
    bars.close()
    click.echo(report.table())
    click.echo(f"\nwrote {report.paths['json']}" + (f" and {report.paths['png']}" if report.paths.get("png") else ""))
