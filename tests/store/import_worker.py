"""A process of tests/store/test_import.py: ``python import_worker.py MODE URL KEYS.npy [DIR N]``.

race: ``memstore import URL c --keys KEYS.npy --json``, held at a barrier (N processes, files in
      DIR) just before its first write transaction begins: every process has already seen that
      ``c`` is missing, so all of them go on to create it at the same moment;
kill: ``memstore import URL c --keys KEYS.npy`` that SIGKILLs its own process the moment the rows
      are being written - after the collection was created in the same transaction, before
      anything commits.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from memstore.backends import backend_class
from memstore.store import Store
from memstore_gpt2.cli import main


def hold_first_write_at_barrier(directory: Path, parties: int) -> None:
    """The first write transaction of this process waits, before it begins (takes the write lock),
    until ``parties`` processes have arrived; prints BARRIER when it passes."""
    begin = Store._transaction
    passed = []

    def _transaction(self, write, *args, **kwargs):
        if write and not passed:
            passed.append(True)
            (directory / f"arrived-{os.getpid()}").touch()
            deadline = time.monotonic() + 120
            while len(list(directory.glob("arrived-*"))) < parties:
                if time.monotonic() > deadline:
                    raise SystemExit("the other importer never reached its write transaction")
                time.sleep(0.01)
            print("BARRIER", flush=True)
        return begin(self, write, *args, **kwargs)

    Store._transaction = _transaction


def die_when_rows_are_written(url: str) -> None:
    def insert_rows(*args, **kwargs):
        print("KILLING", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    backend_class(sa.make_url(url)).insert_rows = insert_rows


if __name__ == "__main__":
    mode, url, keys = sys.argv[1:4]
    if mode == "race":
        hold_first_write_at_barrier(Path(sys.argv[4]), int(sys.argv[5]))
    else:
        die_when_rows_are_written(url)
    main(["import", url, "c", "--keys", keys, "--json"], standalone_mode=False)
