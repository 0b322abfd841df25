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


@cli.group()
def versions() -> None:
    """This device's version record: the newest version loaded per task, so rollbacks are refused.

    \b
      h2t-edge versions init /var/lib/h2t/versions.json      # once, when the device is set up
      h2t-edge predict task.onnx images/ --version-record /var/lib/h2t/versions.json
    """


@versions.command()
@click.argument("record", type=click.Path(dir_okay=False))
def init(record) -> None:
    """Create an empty version record at RECORD (refused where one exists: a reset would accept rollbacks)."""
    from runtime.trust import VersionRecord

    VersionRecord.create(record)
    click.echo(f"wrote {record}: an empty version record; pass it to predict with --version-record")
