"""The ``memstore`` CLI run in-process by tests, and what it printed read back."""

from __future__ import annotations

import json

from click.testing import CliRunner, Result

from memstore_gpt2.cli import main


def run_cli(args) -> Result:
    """``memstore ARGS`` in this process (arguments may be paths or numbers)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def last_json(result: Result) -> dict:
    """The JSON object a successful ``--json`` run printed as its last line."""
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def error_line(result: Result, *, exit_code: int | None = 1) -> str:
    """The one-line error a failed run ended with (``exit_code`` None: any non-zero code)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    if exit_code is None:
        assert result.exit_code != 0, result.output
    else:
        assert result.exit_code == exit_code, result.output
    assert lines and lines[-1].startswith("Error: "), result.output
    return lines[-1]


def only_error_line(result: Result) -> str:
    """As :func:`error_line`, and nothing else was printed."""
    line = error_line(result)
    assert len([x for x in result.output.splitlines() if x.strip()]) == 1, result.output
    return line
