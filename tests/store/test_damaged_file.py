"""A damaged database file: every read that meets it is one line (a ``DatabaseError``), never
the driver's own exception (issue 18 item 5: a corrupted file under a memory budget tracebacked,
because paged reads go through the driver's raw cursor, which SQLAlchemy does not wrap)."""

from __future__ import annotations

import numpy as np
import pytest

from memstore import Store
from memstore.errors import CorruptDataError, DatabaseError


def _damage_page_holding(path, needle: bytes) -> None:
    """Overwrite the whole database page that holds ``needle`` (a row's value blob)."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at > 0, "the row's value is not stored in the file"
    page = 4096
    with Store(f"sqlite:///{path}") as store:
        with store.read() as conn:
            page = int(conn.exec_driver_sql("PRAGMA page_size").scalar_one())
    start = at // page * page
    data[start : start + page] = b"\xa5" * page
    path.write_bytes(bytes(data))


def test_reading_rows_from_a_damaged_page_is_one_line(tmp_path):
    path = tmp_path / "damaged.db"
    values = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    with Store(f"sqlite:///{path}") as store:
        coll = store.create_collection("rows", key_dim=2, value_dim=32, index="none")
        coll.insert(np.zeros((3000, 2), np.float32) + np.arange(3000)[:, None], values)
    _damage_page_holding(path, values[1500].tobytes())
    with Store(f"sqlite:///{path}", create=False) as store:
        coll = store.collection("rows")
        with pytest.raises(DatabaseError, match="malformed"):
            coll.get([1501])  # the paged read of one row
        with pytest.raises(DatabaseError, match="malformed"):
            coll.export_rows()  # the resident load


def test_value_blobs_of_the_wrong_length_are_corrupt_data(tmp_path):
    import sqlite3

    from memstore.naming import rows_table

    path = tmp_path / "short.db"
    with Store(f"sqlite:///{path}") as store:
        coll = store.create_collection("rows", key_dim=2, value_dim=8, index="none")
        coll.insert(np.ones((4, 2), np.float32), np.ones((4, 8), np.float32))
        table = rows_table(coll.spec)
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE {table} SET value = ? WHERE id = 2", (b"\0\0\0\0",))
    with Store(f"sqlite:///{path}", create=False) as store:
        coll = store.collection("rows")
        with pytest.raises(CorruptDataError, match=r"'rows'.*4 bytes where 8 float32 \(32 bytes\)"):
            coll.get([2])
        with pytest.raises(CorruptDataError, match="4 bytes"):
            coll.export_rows()
        assert coll.get([1]).values.shape == (1, 8)  # the rows around it still read


def test_nan_values_in_the_file_are_refused_naming_the_rows(tmp_path):
    import sqlite3

    from memstore.naming import rows_table

    path = tmp_path / "nan.db"
    with Store(f"sqlite:///{path}") as store:
        coll = store.create_collection("rows", key_dim=2, value_dim=4, index="none")
        coll.insert(np.ones((5, 2), np.float32), np.ones((5, 4), np.float32))
        table = rows_table(coll.spec)
    bad = np.asarray([1, np.nan, 1, np.inf], np.float32).tobytes()
    with sqlite3.connect(path) as conn:
        conn.executemany(f"UPDATE {table} SET value = ? WHERE id = ?", [(bad, 2), (bad, 4)])
    with Store(f"sqlite:///{path}", create=False) as store:
        coll = store.collection("rows")
        with pytest.raises(
            CorruptDataError, match=r"'rows' holds NaN or infinite values in 2 row\(s\) \(id 2, 4\)"
        ):
            coll.export_rows()
        with pytest.raises(CorruptDataError, match=r"id 4\)"):
            coll.get([1, 4])
        coll.delete([2, 4])  # such rows can still be deleted, and the rest reads
        assert len(coll.export_rows()) == 3
