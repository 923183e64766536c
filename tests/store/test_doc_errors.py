"""Every error text docs/store.md quotes is the real one: each quoted ``Error: ...`` /
``<Name>Error: ...`` code span must match, word for word, what a matching trigger below raises
(``URL``, ``PATH``, ``'R'`` and ``'L'`` in the docs stand for the URL, the file and revisions),
and every trigger's message must be quoted. A reworded error fails here until the docs follow."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from memstore import Store, errors, migrate

DOC = Path(__file__).resolve().parents[2] / "docs" / "store.md"
PLACEHOLDERS = {"URL": r"\S+", "PATH": r"\S+", "'R'": r"'[^']*'", "'L'": r"'[^']*'"}


def quoted_errors() -> list[str]:
    """The code spans of docs/store.md that quote an error (single or double backticks); the
    bare form ``Error: ...`` (how a CLI error looks) quotes nothing."""
    text = DOC.read_text()
    spans = re.findall(r"``(.+?)``|`([^`\n]+)`", text)
    out = [a or b for a, b in spans]
    return [
        s.strip()
        for s in out
        if re.match(r"(Error|[A-Z][A-Za-z]*Error): ", s.strip()) and not s.endswith(": ...")
    ]


def as_pattern(quoted: str) -> re.Pattern:
    parts = re.split(r"(URL|PATH|'R'|'L')", quoted)
    return re.compile("".join(PLACEHOLDERS.get(p, re.escape(p)) for p in parts))


def raised(call) -> str:
    with pytest.raises(errors.MemstoreError) as info:
        call()
    return f"{type(info.value).__name__}: {info.value}"


def cli_line(args: list[str]) -> str:
    from memstore_gpt2.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    return result.output.strip().splitlines()[-1]


def real_messages(tmp_path: Path, monkeypatch) -> list[str]:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"this is not a database, just some text\n" * 200)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
    good = tmp_path / "good.db"
    with Store(f"sqlite:///{good}") as store:
        store.create_collection("c", key_dim=4).insert(np.ones((2, 4), np.float32))
    unstamped = tmp_path / "unstamped.db"
    with Store(f"sqlite:///{unstamped}"):
        pass
    with sqlite3.connect(unstamped) as conn:
        conn.execute("DELETE FROM alembic_version")
    newer = tmp_path / "newer.db"
    with Store(f"sqlite:///{newer}"):
        pass
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")

    messages = [
        cli_line(["inspect", str(tmp_path / "absent.db")]),
        raised(lambda: Store(f"sqlite:///{notes}")),
        raised(lambda: Store(f"sqlite:///{other}")),
        raised(lambda: Store(f"sqlite:///{unstamped}")),
        raised(lambda: Store(f"sqlite:///{newer}")),
    ]
    with Store(f"sqlite:///{good}") as store:
        coll = store.collection("c")
        messages.append(raised(lambda: coll.search(np.full((1, 4), 3e38, np.float32), 1)))
        messages.append(
            raised(lambda: coll.search(np.ones((1, 4), np.float32), 1, recombine=np.nan))
        )
        messages.append(raised(lambda: store.create_collection("w", key_dim=9000)))
    # An older revision: only one revision exists yet, so report the head as a known older one.
    with monkeypatch.context() as patch:
        patch.setattr(migrate, "schema_status", lambda conn: "outdated")
        messages.append(raised(lambda: Store(f"sqlite:///{good}")))
    return messages


def test_every_quoted_error_is_the_real_text(tmp_path, monkeypatch):
    quoted = quoted_errors()
    assert len(quoted) >= 9, quoted
    real = real_messages(tmp_path, monkeypatch)
    for text in quoted:
        pattern = as_pattern(text)
        assert any(pattern.fullmatch(m) for m in real), (text, real)
    for message in real:
        assert any(as_pattern(t).fullmatch(message) for t in quoted), message
