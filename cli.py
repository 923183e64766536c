"""The ``memstore`` command line.

Store commands (``init``, ``import``, ``query``, ``inspect``, ``prune``, ``upgrade``) live in
:mod:`memstore.cli_store` and never import torch, so they start fast and work without the ``torch``
extra. Model commands (``teacher``, ``distill``, ``generate``, ``demo``) live in
:mod:`memstore_torch.cli_train` and import torch only when they run.
"""

from __future__ import annotations

import click

from memstore.cli_store import add_store_commands
from memstore.errors import MemstoreError
from memstore_torch.cli_train import add_train_commands


class MemstoreGroup(click.Group):
    """A click group that reports memstore's own errors as one line and a non-zero exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MemstoreError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=MemstoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memstore")
def main() -> None:
    """memstore: an external, editable, SQL-backed memory for language models."""


add_store_commands(main)
add_train_commands(main)


if __name__ == "__main__":
    main()
