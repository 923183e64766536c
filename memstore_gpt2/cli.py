"""The ``memstore`` command line: the store's commands and the GPT-2 application's, in one group.

Store commands (``init``, ``import``, ``query``, ``inspect``, ``prune``, ``upgrade``) live in
:mod:`memstore.cli_store` and never import torch, so they start fast and work without the ``torch``
extra. Model commands (``teacher``, ``distill``, ``generate``, ``evaluate``, ``demo``) live in
:mod:`memstore_gpt2.commands`, Mindset's (``trace``, ``explain``, ``rows``, ``edit``, ``mindset``)
in :mod:`memstore_gpt2.mindset.commands`; both import torch only when they run.

This module is the console script's entry point (``memstore_gpt2.cli:main``). It lives in a package
rather than in a top-level ``cli`` module so that a user's own ``cli.py`` on ``sys.path`` can never
shadow it; the repository's ``cli.py`` only forwards here.
"""

from __future__ import annotations

import click

from memstore.cli_group import MemstoreGroup
from memstore.cli_store import add_store_commands
from memstore_gpt2.commands import add_train_commands
from memstore_gpt2.mindset.commands import add_mindset_commands
from memstore_gpt2.packs.cli import packs_group
from memstore_gpt2.packs.commands import add_pack_commands
from memstore_gpt2.serve.commands import add_serve_commands


@click.group(cls=MemstoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memstore")
def main() -> None:
    """memstore: an external, editable, SQL-backed memory for language models."""


add_store_commands(main)
add_train_commands(main)
add_mindset_commands(main)
add_pack_commands(main)
main.add_command(packs_group)
add_serve_commands(main)
