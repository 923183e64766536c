"""The one error handler of the ``memstore`` command line, as a click group class.

Every group of the CLI (the top-level ``memstore`` and nested ones such as ``distill``) uses it, so
each memstore error reaches the user as one ``Error: ...`` line with exit code 1, never a traceback.
"""

from __future__ import annotations

import re

import click

from memstore.errors import InvalidInputError, MemstoreError

_RUNNING = "memstore.commands"  # ctx.meta key: the commands resolved so far, outermost first


class MemstoreGroup(click.Group):
    """A click group that reports memstore's own errors as one line and a non-zero exit code.

    An :class:`InvalidInputError` that names its ``parameter`` is re-spelled in the running
    command's terms (``batch_size`` -> ``--batch-size``), so the library speaks Python names and
    the user reads the flags they typed.
    """

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            ctx.meta.setdefault(_RUNNING, []).append(command)
        return name, command, rest

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MemstoreError as exc:
            raise click.ClickException(_as_flags(exc, ctx.meta.get(_RUNNING, []))) from None


def _as_flags(exc: MemstoreError, commands: list[click.Command]) -> str:
    """The error's message with its parameter spelled as the innermost command's option (the
    first whole-word mention of the parameter is replaced)."""
    message = str(exc)
    parameter = getattr(exc, "parameter", None)
    if not isinstance(exc, InvalidInputError) or not parameter or not commands:
        return message
    for param in commands[-1].params:
        if param.name == parameter:
            spelled = (
                param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
            )
            word = re.compile(rf"(?<![\w-]){re.escape(parameter)}(?![\w-])")
            return word.sub(spelled.replace("\\", r"\\"), message, count=1)
    return message
