"""The task suite: list it (`tasks`) and run the paper's protocol over it (`eval`)."""

from __future__ import annotations

import click

from h2t_edge.cli import cli, options, render
from h2t_edge.cli.options import (
    DATA_DIR_OPTION,
    DEFAULT_BACKBONE,
    DEVICE_OPTION,
    FIT_PRECISION_OPTION,
    GRID_OPTION,
    MAX_CANDIDATES_OPTION,
    SOLVER_OPTION,
    output_option,
)
from h2t_edge.selection.names import TABLE1_METHODS


@cli.command(name="tasks")
@DATA_DIR_OPTION
def tasks_(data_dir) -> None:
    """List the task suite: group, classes, sizes, source, and whether the source is installed."""
    from h2t_edge.suite.tasks.registry import N_TEST, N_TRAIN, N_VAL, default_data_dir, list_tasks

    click.echo(render.tasks_table(list_tasks(), N_TRAIN, N_VAL, N_TEST, data_dir or default_data_dir()))


@cli.command(name="eval")
@click.option("--task", "task_names", multiple=True, help="Task (repeatable). Default: every default task.")
@click.option("--method", "methods", multiple=True,
              type=click.Choice(list(TABLE1_METHODS)),
              help="Method (repeatable). Default: all five.")
@click.option("--backbone", "-b", "backbones", multiple=True, default=(DEFAULT_BACKBONE,), show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated run seeds.")
@click.option("--target-size", "-T", "target_sizes", multiple=True, type=int, default=(512,), show_default=True,
              help="HEAD2TOE target sizes per layer (repeatable); CV picks one. Baselines use the smallest.")
@GRID_OPTION
@MAX_CANDIDATES_OPTION
@FIT_PRECISION_OPTION
@SOLVER_OPTION
@DEVICE_OPTION
@output_option("out", default="h2t-eval/results", show_default=True,
               help="Results prefix, relative to the current folder: writes OUTPUT.json (resumable), OUTPUT.md "
                    "and OUTPUT.png.")
@click.option("--work-dir", default="h2t-eval", show_default=True, type=click.Path(file_okay=False),
              help="Exported backbones and feature caches (reused on rerun).")
@DATA_DIR_OPTION
@click.option("--n-test", default=1000, show_default=True, help="Test examples per task (fewer where the source has fewer).")
@click.option("--report-only", is_flag=True, help="Only rewrite OUTPUT.md and OUTPUT.png from OUTPUT.json.")
def eval_(task_names, methods, backbones, seeds, target_sizes, grid, max_candidates, fit_precision, solver, device,
          out, work_dir, data_dir, n_test, report_only) -> None:
    """Evaluate methods x tasks x backbones x seeds (paper Table 1 protocol); skips finished cells."""
    from h2t_edge.suite.evaluate import METHODS, run_eval, write_report
    from h2t_edge.suite.tasks.registry import list_tasks

    if not report_only:
        run_eval(task_names or [s.name for s in list_tasks(include_optional=False)], out,
                 methods=methods or METHODS, backbones=backbones,
                 seeds=[int(s) for s in seeds.split(",") if s.strip()], protocol=grid,
                 target_sizes=target_sizes, work_dir=work_dir, data_dir=data_dir, n_test=n_test,
                 grid=options.make_grid(grid, max_candidates, fit_precision, solver, device),
                 log=lambda message: click.echo(message, err=True))
    for kind, path in write_report(out).items():
        click.echo(f"wrote {kind}: {path}")
