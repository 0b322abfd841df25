"""The `h2t-edge` command line: argument parsing and printing over the h2t_edge API.

The group is defined here; each verb module (flow, train, suite, serving, research) registers its
commands on it when imported below, parses its arguments, calls the API and prints through
`render`. Shared options live in `options`. Every user-facing error is a typed exception; `main`
prints it as one line and exits with 1.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click

from exporters.errors import ExportError
from h2t_edge.core.errors import H2TEdgeError
from runtime.errors import H2TRuntimeError
from runtime.preprocess import MAX_IMAGE_PIXELS_ENV

USER_ERRORS = (H2TEdgeError, ExportError, H2TRuntimeError)


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
      h2t-edge fit     feats/train -o task/             # HEAD2TOE + LINEAR, with CV
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


# this file is h2t_edge/cli/__init__.py: the repository (or site-packages) root is two levels up
_OWN_PACKAGES = tuple(str(Path(__file__).resolve().parents[2] / name) for name in ("h2t_edge", "runtime", "exporters"))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings (bf16 emulated, a precision OpenVINO does not run...) as one plain line on
    stderr; other packages' warnings as Python prints them, with their source location."""
    if str(filename).startswith(_OWN_PACKAGES) or str(filename).startswith("<"):
        click.echo(f"warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


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


# the verbs: importing a module registers its commands on `cli` (in this order in --help's list,
# which click sorts by name anyway)
from h2t_edge.cli import flow, research, serving, suite, train, trust  # noqa: E402,F401
