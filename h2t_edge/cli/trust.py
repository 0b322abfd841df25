"""`h2t-edge keys`: the signing keys behind `--sign-key` and `--trusted-key`."""

from __future__ import annotations

import click

from h2t_edge.cli import cli
from h2t_edge.cli.options import output_option


@cli.group()
def keys() -> None:
    """Signing keys: sign artifacts on the build machine (--sign-key), trust them on the device.

    \b
      h2t-edge keys generate -o keys/                       # keys/signing.key (0600) + keys/signing.pub
      h2t-edge compile task/head2toe -o task.onnx --sign-key keys/signing.key
      h2t-edge predict task.onnx images/ --trusted-key keys/signing.pub   # on the device
    """


@keys.command()
@output_option(file_okay=False, required=True, help="Key folder: signing.key (private, mode 0600) and signing.pub.")
def generate(output) -> None:
    """Write a new ed25519 key pair. Keep signing.key on the build machine; copy signing.pub to devices."""
    from runtime.trust import SigningKey

    key = SigningKey.generate()
    private, public = key.save(output)
    click.echo(f"wrote {private} (private, mode 0600) and {public}; key id {key.key_id}")
