"""Options shared by several commands, each defined once, and the values they stand for.

Only click is imported here (the commands import the heavy modules lazily, in their bodies), so
`h2t-edge --help` stays fast.
"""

from __future__ import annotations

import click

from exporters import DEFAULT_BACKBONE  # torch-free: `h2t-edge --help` does not wait for torch

__all__ = [
    "BACKEND_OPTION", "DATA_DIR_OPTION", "DEFAULT_BACKBONE", "FIT_PRECISION_OPTION", "FULL_SEARCH_OPTION", "GRID_OPTION",
    "MAX_CANDIDATES_OPTION", "OUTPUT_ALIASES", "OutputOption", "PRECISION_OPTION", "QUIET_OPTION", "backend_option",
    "backend_options", "grid_option", "make_grid", "output_option", "precision_option", "quiet_option",
]


def make_grid(name: str, max_candidates: int | None = None, precision: str = "fp32", solver: str = "path",
              device: str = "auto", max_accuracy: bool = False, latency_budget: float | None = None,
              full_search: bool = False):
    """The named grid; max_candidates (0 = exact) replaces its screening budget when given; solver and
    device pick HEAD2TOE's engine and where it runs ("auto": the GPU where torch sees one, for the
    path solver; the paper solver runs on the CPU); max_accuracy and latency_budget set the choice
    (`SearchGrid.choice`, `SearchGrid.latency_budget`); full_search turns off successive halving over
    T and the stop along F (`SearchGrid.halving`, `SearchGrid.f_stop`)."""
    import dataclasses

    from h2t_edge.core.errors import FitError
    from h2t_edge.selection import SearchGrid
    from h2t_edge.selection.grid import resolve_device

    grid = {"paper": SearchGrid.paper, "quick": SearchGrid.quick}[name]()
    if max_candidates is not None:
        grid = dataclasses.replace(grid, max_candidates=max_candidates or None)
    if full_search:
        grid = dataclasses.replace(grid, halving=None, f_stop=None)
    if precision != "fp32" and solver != "paper":
        raise click.UsageError(f"--fit-precision {precision} applies to --solver paper (its Adam GEMMs); the "
                               f"{solver} solver computes in fp32")
    try:
        device = "cpu" if solver == "paper" and device == "auto" else resolve_device(device)
        return dataclasses.replace(grid, precision=precision, solver=solver, device=device,
                                   choice="accuracy" if max_accuracy else "cheapest", latency_budget=latency_budget)
    except FitError as err:
        raise click.UsageError(str(err)) from None


def backend_options(backend: str, precision: str) -> dict:
    """The loader options that --backend / --precision stand for."""
    if backend == "onnxruntime":
        if precision != "fp32":
            raise click.UsageError("--precision applies to openvino and tensorrt; onnxruntime runs the graph "
                                   "as built (make an int8 graph with `h2t-edge build-engine`)")
        return {}
    return {"precision": precision}


# --- where a command writes: -o/--output (and the old --out, hidden) ---------------------------

OUTPUT_ALIASES = ("--out",)  # older spellings: still accepted, not shown in --help


class OutputOption(click.Option):
    """An option whose hidden aliases parse like its other names but appear neither in --help nor
    in error messages."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = OUTPUT_ALIASES, **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden_aliases = tuple(hidden_aliases)

    def _shown(self, method, ctx):
        opts = self.opts
        self.opts = [o for o in opts if o not in self.hidden_aliases] or opts
        try:
            return method(ctx)
        finally:
            self.opts = opts

    def get_help_record(self, ctx):
        return self._shown(super().get_help_record, ctx)

    def get_error_hint(self, ctx):
        return self._shown(super().get_error_hint, ctx)


def output_option(name: str = "output", *, file_okay: bool = True, dir_okay: bool = True, **kwargs):
    """`-o/--output` (also `--out`, hidden) storing into the parameter `name`; every command that
    writes files takes its destination this way. kwargs go to click.option (required, default,
    show_default, help)."""
    return click.option("--output", "-o", *OUTPUT_ALIASES, name, cls=OutputOption,
                        type=click.Path(file_okay=file_okay, dir_okay=dir_okay), **kwargs)


# --- fitting -----------------------------------------------------------------------------------

GRID_HELP = ("Hyperparameter search: 'paper' is the paper's 5-fold grid (lr x steps x lambda x F); "
             "'quick' is a 3-fold, 500-step subset for demos.")


def grid_option(default: str = "paper", help: str = GRID_HELP):
    """--grid: the named CV grid (`make_grid`)."""
    return click.option("--grid", type=click.Choice(["paper", "quick"]), default=default, show_default=True,
                        help=help)


GRID_OPTION = grid_option()

MAX_CANDIDATES_OPTION = click.option(
    "--max-candidates", type=click.IntRange(min=0), default=None,
    help="HEAD2TOE on pools larger than this: each CV fold runs the group lasso on its top N "
         "features by the strong-rule statistic (fractions F whose k exceeds N are skipped). "
         "0 runs the exact method on every feature. [default: 32768]",
)

FIT_PRECISION_OPTION = click.option(
    "--fit-precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
    help="Precision of the paper solver's training GEMMs (--solver paper; the path solver is fp32). bf16 casts features and weights to bfloat16 for the "
         "matrix products only (weights, optimiser and loss stay fp32): about 2x faster fitting on "
         "CPUs with AVX512-BF16 or AMX, slower elsewhere. Recorded in the task's config.",
)

SOLVER_OPTION = click.option(
    "--solver", type=click.Choice(["path", "paper"]), default="path", show_default=True,
    help="HEAD2TOE's selection engine. 'path': a group-lasso regularization path per fold with warm "
         "starts (full-batch FISTA), every F ranked from one path, full-batch retraining; a fraction of "
         "'paper''s fitting time (benchmarks/results/fit_speed.md). 'paper': "
         "the paper's recipe, to reproduce it (minibatch Adam heads per fold, lr, lambda and steps). "
         "Recorded in the task's config.")
DEVICE_OPTION = click.option(
    "--device", default="auto", show_default=True,
    help="Where the path solver fits: 'auto' (the GPU where torch sees one, else the CPU), 'cpu', 'cuda' "
         "or 'cuda:N' (refused where torch sees no GPU). The paper solver runs on the CPU.")

MAX_ACCURACY_OPTION = click.option(
    "--max-accuracy", is_flag=True,
    help="Keep the candidate with the best CV accuracy. By default the cheapest deployed graph (estimated "
         "latency, `h2t-edge taps`) among those within one standard error of the best CV accuracy wins.")
FULL_SEARCH_OPTION = click.option(
    "--full-search", is_flag=True,
    help="Fit every target size in full and retrain every F in CV. By default each T first gets a cheap rung and "
         "only the best (and any within 2 standard errors of it) gets the full fit, and CV retraining along F "
         "stops once accuracy has clearly turned down (the report's rung table).")
LATENCY_BUDGET_OPTION = click.option(
    "--latency-budget", type=click.FloatRange(min=1.0), default=None, metavar="R",
    help="Only candidates whose deployed graph is estimated at most R x the plain backbone's batch-1 latency "
         "(e.g. 1.02); an error names the cheapest when none fits.")
TAPS_FROM_OPTION = click.option(
    "--taps-from", type=click.Path(exists=True), default=None, metavar="DEPLOYED",
    help="Select only among the taps a device already computes (and the pre-logits): a `deploy` folder "
         "(backbone.json), a compiled graph (.onnx with its .json sidecar) or a `train` task folder. The task "
         "then ships as a head only.")

# --- inference backends ------------------------------------------------------------------------

BACKEND_HELP = "Inference backend (openvino and tensorrt are optional extras)."
PRECISION_HELP = ("Inference precision: openvino takes fp32/bf16, tensorrt fp32/fp16/int8; onnxruntime runs the "
                  "graph as it is (use `build-engine --precision int8` to make an int8 graph).")


def backend_option(help: str | None = BACKEND_HELP):
    """--backend: onnxruntime, openvino or tensorrt."""
    return click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]),
                        default="onnxruntime", show_default=True, help=help)


def precision_option(default: str = "fp32", help: str | None = PRECISION_HELP):
    """--precision of a backend (see `backend_options`)."""
    return click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default=default,
                        show_default=True, help=help)


BACKEND_OPTION = backend_option()
PRECISION_OPTION = precision_option()

DEPLOY_PRECISION_HELP = (
    "Precision the task will run at on --backend. Other than fp32, the extraction graph is built at it (int8: "
    "calibrated on training images, the backbone trunk only; pooling, normalization and head stay fp32), the "
    "features are extracted through it, and selection, CV and the head are fitted on them; the compiled graph is "
    "cut from that graph, so the device runs what was fitted. onnxruntime: fp32/fp16/int8; openvino: "
    "fp32/fp16/bf16/int8 (int8 by NNCF); tensorrt: fp32/fp16/int8.")
DEPLOY_BACKEND_HELP = "Backend the task will run on (and that extracts its features at --precision)."
CALIBRATION_OPTION = click.option(
    "--calibration", type=click.Choice(["minmax", "percentile", "entropy"]), default=None,
    help="int8 calibration method of ONNX Runtime's quantizer (default: percentile, chosen by measurement: "
         "benchmarks/results/calibration.md). OpenVINO int8 uses NNCF's own.")
CALIBRATION_IMAGES_OPTION = click.option(
    "--calibration-images", type=click.IntRange(min=8), default=None,
    help="Training images int8 is calibrated on (default 64); 32 others are held out to measure its fidelity.")


def deploy_precision_options(f):
    """--precision, --backend, --calibration, --calibration-images of `train` and `extract`."""
    for option in reversed([
        precision_option(help=DEPLOY_PRECISION_HELP), backend_option(help=DEPLOY_BACKEND_HELP),
        CALIBRATION_OPTION, CALIBRATION_IMAGES_OPTION,
    ]):
        f = option(f)
    return f

# --- misc --------------------------------------------------------------------------------------

DATA_DIR_OPTION = click.option(
    "--data-dir", type=click.Path(file_okay=False), default=None,
    help="Where task images are cached (default: $H2T_EDGE_DATA or ~/.cache/h2t-edge/tasks).")


def quiet_option(help: str = "No progress bars."):
    """-q/--quiet: no progress bars."""
    return click.option("--quiet", "-q", is_flag=True, help=help)


QUIET_OPTION = quiet_option()


# --- trust: signing on the build machine, trusted keys on the device -----------------------------

SIGN_KEY_OPTION = click.option(
    "--sign-key", "sign_key", type=click.Path(exists=True, dir_okay=False), default=None,
    help="Sign what this writes with this ed25519 private key (KEYDIR/signing.key from `h2t-edge keys "
         "generate`); a device that trusts KEYDIR/signing.pub then accepts it.")
TRUSTED_KEY_OPTION = click.option(
    "--trusted-key", "trusted_keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
    help="Accept only artifacts signed by this public key (a signing.pub; repeatable; added to "
         "$H2T_EDGE_TRUSTED_KEYS). Without any, artifacts are checked for integrity only.")


def signing_key(path: str | None):
    """The SigningKey at PATH (None: do not sign)."""
    if path is None:
        return None
    from runtime.trust import SigningKey

    return SigningKey.load(path)
