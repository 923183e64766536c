"""A ``memstore serve`` process on a free port for the tests: started, its URL read from the
first line it prints, terminated (and required to exit cleanly) afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

API_KEY = "test-key"
STARTUP_S = 180


@contextmanager
def serve_process(student_dir, log_dir: Path, *options) -> Iterator[str]:
    """The server's base URL (``.../v1``) while it runs. ``--port 0``: it prints the port it got;
    its log (one access line per request) goes to a file, so no pipe can fill up and block it."""
    code = "from memstore_gpt2.cli import main; main()"
    args = [sys.executable, "-c", code, "serve", str(student_dir), "--port", "0", "--device",
            "cpu", "--api-key", API_KEY, *map(str, options)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = Path(log_dir) / "stderr.log"
    stderr = open(log, "w")  # noqa: SIM115 - open for the server's whole life
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")),
                              daemon=True)  # fmt: skip
    reader.start()
    deadline = time.monotonic() + STARTUP_S
    while not lines and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not lines:
        process.kill()
        pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
    url = lines[0].split()[2]  # "memstore serve: http://127.0.0.1:PORT/v1 (...)"
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), lines[0]
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
            stderr.close()
    assert process.returncode == 0, log.read_text()[-2000:]
