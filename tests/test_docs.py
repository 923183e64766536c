"""Every fenced code block in README.md and docs/*.md runs, and runs twice.

Rules (summarised for doc writers in docs/index.md):

* ```python blocks of one file run in document order in one namespace (a later block may use an
  earlier block's names), in a fresh temporary working directory;
* ```bash / ```sh / ```console blocks run in the same directory, in the same order: each command
  that starts with ``memstore`` runs through the CLI (Click's runner on ``memstore_gpt2.cli:main``)
  and must exit 0; install commands (``python3 -m venv ...``, ``... pip install ...``) are skipped
  by rule; any other command fails the test. In ```console blocks only ``$ `` lines are commands;
  the other lines are sample output and are not compared (they hold machine-specific paths);
* ```text blocks are output samples and are not run; ```json blocks must parse as JSON;
* a block right after ``<!-- doctest: skip (reason) -->`` is not run (the reason is required);
  used for commands that train a model for minutes or need a trained student;
* ``postgresql://...`` URLs in a runnable block stand for a server: they are replaced by a fresh
  test database (tests/pg_fixture.py; the file is skipped where no server can start, except in CI);
* the whole file then runs a second time in the same directory, with a fresh namespace, and must
  pass again: examples may not fail on what their first run left behind.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
SKIP_MARKER = re.compile(r"^<!--\s*doctest:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
PYTHON = {"python"}
SHELL = {"bash", "sh", "console"}
INERT = {"text", "json"}
PG_URL = re.compile(r"postgresql(\+psycopg)?://[^\s\"')`]+")
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "<<", "&"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason given in a skip marker

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """Fenced blocks of a Markdown file, with the skip marker (if any) right before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{start + 1}: unclosed code fence")
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = SKIP_MARKER.match(lines[before].strip()) if before >= 0 else None
        skip = marker.group("reason").strip() if marker else None
        blocks.append(Block(path, start + 1, lang, "\n".join(lines[start + 1 : j]) + "\n", skip))
        i = j + 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in parse_blocks(path)]


def shell_commands(block: Block) -> list[str]:
    """The commands of a shell block: ``$`` lines of a console block, else every logical line
    (backslash continuations joined)."""
    raw = block.code.splitlines()
    if block.lang == "console":
        return [line[2:] for line in raw if line.startswith("$ ")]
    commands, current = [], ""
    for line in raw:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        commands.append(current + line)
        current = ""
    if current:
        commands.append(current)
    return [c for c in commands if c.strip()]


def is_install(command: str) -> bool:
    """``python3 -m venv ...`` (and whatever it chains) or a ``pip install``."""
    words = command.split()
    venv = len(words) >= 3 and words[0] in ("python", "python3") and words[1:3] == ["-m", "venv"]
    pip = any(w == "pip" or w.endswith("/pip") for w in words[:2]) and "install" in words[1:3]
    return venv or pip


def test_every_block_is_classified_and_json_parses():
    """A block without a known language would silently escape this test."""
    problems = []
    for path in DOC_FILES:  # a marker must sit right before a block, or it guards nothing
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if "doctest" not in line or not line.lstrip().startswith("<!--"):
                continue
            after = next((x for x in lines[n + 1 :] if x.strip()), "")
            if not SKIP_MARKER.match(line.strip()) or not FENCE.match(after):
                problems.append(f"{path.relative_to(ROOT)}:{n + 1}: malformed or dangling marker")
    for block in ALL_BLOCKS:
        if block.lang not in PYTHON | SHELL | INERT:
            problems.append(f"{block.where}: fence language {block.lang!r} (use one of "
                            f"{sorted(PYTHON | SHELL | INERT)})")  # fmt: skip
        elif block.lang == "json":
            try:
                json.loads(block.code)
            except json.JSONDecodeError as exc:
                problems.append(f"{block.where}: not JSON ({exc})")
        elif block.lang in SHELL and not block.skip:
            for command in shell_commands(block):
                if is_install(command):
                    continue
                words = shlex.split(command, comments=True)
                if words and (words[0] != "memstore" or SHELL_OPERATORS & set(words)):
                    problems.append(
                        f"{block.where}: cannot run {command!r} (only `memstore ...` commands "
                        "run; mark the block <!-- doctest: skip (reason) --> if it must stay)"
                    )
    assert not problems, "\n".join(problems)


def _run_python(block: Block, namespace: dict) -> None:
    code = compile(block.code, block.where, "exec")
    exec(code, namespace)  # noqa: S102 - the docs' own examples


def _run_shell(block: Block) -> None:
    from click.testing import CliRunner

    from memstore_gpt2.cli import main

    for command in shell_commands(block):
        if is_install(command):
            continue
        words = shlex.split(command, comments=True)
        if not words:
            continue
        assert words[0] == "memstore" and not SHELL_OPERATORS & set(words), (
            f"{block.where}: only `memstore ...` commands run here, not {command!r}"
        )
        result = CliRunner().invoke(main, words[1:], prog_name="memstore")
        assert result.exit_code == 0, (
            f"{block.where}: `{command}` exited {result.exit_code}:\n{result.output}"
            + (f"\n{result.exception!r}" if result.exception else "")
        )


def _close_stores(namespace: dict) -> None:
    from memstore import Store

    for value in namespace.values():
        if isinstance(value, Store):
            value.close()


RUNNABLE_FILES = [
    path
    for path in DOC_FILES
    if any(b.lang in PYTHON | SHELL and not b.skip for b in parse_blocks(path))
]


@pytest.mark.parametrize("path", RUNNABLE_FILES, ids=[p.name for p in RUNNABLE_FILES])
def test_doc_blocks_run_twice(path, tmp_path, monkeypatch, request):
    blocks = [b for b in parse_blocks(path) if b.lang in PYTHON | SHELL and not b.skip]
    if any(PG_URL.search(b.code) for b in blocks):
        url = request.getfixturevalue("fresh_postgres_url")
        blocks = [
            Block(b.path, b.line, b.lang, PG_URL.sub(lambda _: url, b.code), b.skip) for b in blocks
        ]
    monkeypatch.chdir(tmp_path)
    for run in (1, 2):
        namespace: dict = {"__name__": f"docs_{path.stem}"}
        try:
            for block in blocks:
                try:
                    if block.lang in PYTHON:
                        _run_python(block, namespace)
                    else:
                        _run_shell(block)
                except Exception as exc:
                    raise AssertionError(f"run {run}, {block.where}: {exc!r}") from exc
        finally:
            _close_stores(namespace)
