"""The pgvector backend against numpy references: kNN, LRFU in SQL, approximate indexes, compaction."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstore import lrfu
from memstore.backends import pg_sql
from memstore.backends.pg_connect import Float4Array
from memstore.errors import InvalidInputError
from memstore.naming import key_index, rows_table
from memstore.types import RowBlock


def brute_force(metric: str, queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(m, n) distances in the public convention, float64."""
    q, k = queries.astype(np.float64), keys.astype(np.float64)
    if metric == "l2":
        return np.sqrt(((q[:, None, :] - k[None, :, :]) ** 2).sum(-1))
    if metric == "ip":
        return -(q @ k.T)
    cos = (q @ k.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(k, axis=1)[None, :]
    return 1.0 - cos


def insert(backend, spec, keys, values=None, tick=0):
    ids = np.arange(1, len(keys) + 1, dtype=np.int64)
    values = keys[:, : spec.value_dim].copy() if values is None else values
    with backend.engine.begin() as conn:
        backend.insert_rows(conn, spec, RowBlock.fresh(ids, keys, values, tick))
    return ids


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    metric=st.sampled_from(["l2", "cosine", "ip"]),
    n=st.integers(1, 40),
    m=st.integers(1, 5),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_knn_equals_brute_force(pg_backend, make_spec, metric, n, m, k, seed):
    rng = np.random.default_rng(seed)
    spec = make_spec(metric=metric, key_dim=6, value_dim=3)
    keys = rng.standard_normal((n, 6)).astype(np.float32)
    values = rng.standard_normal((n, 3)).astype(np.float32)
    insert(pg_backend, spec, keys, values)
    queries = rng.standard_normal((m, 6)).astype(np.float32)
    with pg_backend.engine.connect() as conn:
        result = pg_backend.knn(conn, spec, queries, k)

    reference = brute_force(metric, queries, keys)
    found = min(k, n)
    for i in range(m):
        got = result.ids[i, :found] - 1
        # Same distances as brute force in the same order (ties may swap ids of equal distance).
        np.testing.assert_allclose(
            result.distances[i, :found], np.sort(reference[i])[:found], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(reference[i, got], result.distances[i, :found], atol=1e-5)
        assert len(set(got.tolist())) == found
        np.testing.assert_array_equal(result.keys[i, :found], keys[got])
        np.testing.assert_array_equal(result.values[i, :found], values[got])
    # Padding when fewer than k rows exist.
    assert (result.ids[:, found:] == -1).all()
    assert np.isinf(result.distances[:, found:]).all()
    assert (result.keys[:, found:] == 0).all() and (result.values[:, found:] == 0).all()
    assert result.ids.dtype == np.int64 and result.distances.dtype == np.float32


def test_knn_on_empty_collection_is_all_padding(pg_backend, make_spec):
    spec = make_spec()
    with pg_backend.engine.connect() as conn:
        result = pg_backend.knn(conn, spec, np.ones((2, 8), np.float32), 3)
    assert (result.ids == -1).all() and np.isinf(result.distances).all()


def test_rows_round_trip_update_delete(pg_backend, make_spec):
    rng = np.random.default_rng(1)
    spec = make_spec()
    keys = rng.standard_normal((50, 8)).astype(np.float32)
    ids = insert(pg_backend, spec, keys)
    new_keys = rng.standard_normal((3, 8)).astype(np.float32)
    new_values = rng.standard_normal((3, 4)).astype(np.float32)
    with pg_backend.engine.begin() as conn:
        pg_backend.update_rows(conn, spec, np.array([7, 3, 9]), new_keys, None)
        pg_backend.update_rows(conn, spec, np.array([9, 7]), None, new_values[:2])
        assert pg_backend.delete_rows(conn, spec, np.array([1, 2, 999])) == 2
    with pg_backend.engine.connect() as conn:
        rows = pg_backend.fetch_rows(conn, spec, np.array([9, 3, 7, 1]))
        everything = pg_backend.fetch_rows(conn, spec)
        assert pg_backend.count_rows(conn, spec) == 48
        assert pg_backend.max_id(conn, spec) == 50
    assert rows.ids.tolist() == [3, 7, 9]  # ordered by id, missing ids left out
    np.testing.assert_array_equal(rows.keys, new_keys[[1, 0, 2]])
    np.testing.assert_array_equal(rows.values[0], keys[2, :4])  # value of id 3 untouched
    np.testing.assert_array_equal(rows.values[1:], new_values[[1, 0]])
    assert everything.ids.tolist() == ids[2:].tolist()


def test_touch_lowest_scored_and_summary_match_the_lrfu_reference(pg_backend, make_spec):
    spec = make_spec(lrfu_lambda=0.3)
    rng = np.random.default_rng(2)
    ids = insert(pg_backend, spec, rng.standard_normal((20, 8)).astype(np.float32), tick=0)
    touches = [
        (np.array([1, 2, 3]), np.array([2, 1, 1]), 4),
        (np.array([2, 5]), np.array([1, 3]), 9),
    ]
    crf = np.ones(20)
    last = np.zeros(20, np.int64)
    hits = np.zeros(20, np.int64)
    for touched_ids, counts, tick in touches:
        with pg_backend.engine.begin() as conn:
            pg_backend.touch(conn, spec, touched_ids, counts, tick)
        at = touched_ids - 1
        crf[at] = lrfu.touched(crf[at], last[at], counts, tick, 0.3)
        last[at] = tick
        hits[at] += counts
    with pg_backend.engine.connect() as conn:
        rows = pg_backend.fetch_rows(conn, spec)
        order = pg_backend.lowest_scored(conn, spec, 12)
        lowest3 = pg_backend.lowest_scored(conn, spec, 12, limit=3)
        below = pg_backend.lowest_scored(conn, spec, 12, below=-1.0)
        summary = pg_backend.score_summary(conn, spec, 12)
    np.testing.assert_allclose(rows.crf, crf, rtol=1e-12)
    assert rows.last_tick.tolist() == last.tolist() and rows.hits.tolist() == hits.tolist()
    key = lrfu.order_key(crf, last, 12, 0.3)
    expected = ids[np.lexsort((ids, last, key))]
    assert order.tolist() == expected.tolist()
    assert lowest3.tolist() == expected[:3].tolist()
    assert sorted(below.tolist()) == sorted(ids[key < -1.0].tolist())
    assert summary["min"] == pytest.approx(key.min()) and summary["max"] == pytest.approx(key.max())
    assert summary["mean"] == pytest.approx(key.mean())


def test_touch_of_a_row_ahead_of_the_clock_decays_the_hit_to_its_last_tick(pg_backend, make_spec):
    """The crf is never scaled up (2^(+lam*5)); the hit at 5 counts as of the row's tick 10."""
    spec = make_spec()
    insert(pg_backend, spec, np.ones((1, 8), np.float32), tick=10)
    with pg_backend.engine.begin() as conn:
        pg_backend.touch(conn, spec, np.array([1]), np.array([1]), 5)
        rows = pg_backend.fetch_rows(conn, spec)
    assert rows.crf.tolist() == [pytest.approx(1 + 2 ** (-0.5 * 5))]
    assert rows.last_tick.tolist() == [10]


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, d)) * 3
    return (centres[rng.integers(0, 32, n)] + rng.standard_normal((n, d))).astype(np.float32)


def _recall(result_ids: np.ndarray, reference: np.ndarray, k: int) -> float:
    truth = np.argsort(reference, axis=1, kind="stable")[:, :k] + 1
    return float(
        np.mean([len(set(a) & set(b)) / k for a, b in zip(result_ids, truth, strict=True)])
    )


@pytest.mark.parametrize("index", ["hnsw", "ivfflat"])
def test_approximate_index_is_used_and_oversample_is_the_recall_knob(pg_backend, make_spec, index):
    d, k = 16, 10
    keys = _clustered(3000, d, 3)
    queries = _clustered(40, d, 4)
    reference = brute_force("l2", queries, keys)
    recalls = {}
    for oversample in (1, 64):
        spec = make_spec(key_dim=d, value_dim=4, index=index, oversample=oversample)
        insert(pg_backend, spec, keys)  # a bulk load: the index is built once, after the COPY
        with pg_backend.engine.connect() as conn:
            raw = conn.connection.driver_connection
            for single in (True, False):  # the batch statement and the one-query statement
                m = 1 if single else len(queries)
                sql = pg_sql.knn_query(spec, exact_tiebreak=False, single=single)
                params = {"q": Float4Array(queries[:m]), "m": m, "k": k}
                plan = "\n".join(r[0] for r in raw.execute("EXPLAIN " + sql, params))
                assert f"Index Scan using {key_index(spec, index)}" in plan, plan
            result = pg_backend.knn(conn, spec, queries, k)
        recalls[oversample] = _recall(result.ids, reference, k)
        # Approximate ids, but exact distances of the rows returned.
        np.testing.assert_allclose(
            np.take_along_axis(reference, result.ids - 1, 1), result.distances, atol=1e-4
        )
    assert recalls[64] >= 0.95
    assert recalls[64] > recalls[1]  # measured: hnsw 0.63 -> 1.0, ivfflat 0.73 -> 1.0


def _index_options(backend, spec) -> list[str] | None:
    with backend.engine.connect() as conn:
        return conn.exec_driver_sql(
            "SELECT c.reloptions FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = %(t)s::regclass AND NOT i.indisprimary",
            {"t": rows_table(spec)},
        ).scalar()


def test_large_loads_rebuild_the_index_small_ones_insert_into_it(pg_backend, make_spec):
    rng = np.random.default_rng(8)
    spec = make_spec(key_dim=4, value_dim=4, index="ivfflat", oversample=4)
    assert _index_options(pg_backend, spec) == ["lists=1"]  # made on the empty table
    keys = rng.standard_normal((4000, 4)).astype(np.float32)
    ids = np.arange(4000, dtype=np.int64)
    with pg_backend.engine.begin() as conn:
        pg_backend.insert_rows(conn, spec, RowBlock.fresh(ids[:3000], keys[:3000], keys[:3000], 0))
    assert _index_options(pg_backend, spec) == ["lists=3"]  # rebuilt, trained on 3000 rows
    with pg_backend.engine.begin() as conn:
        pg_backend.insert_rows(conn, spec, RowBlock.fresh(ids[3000:], keys[3000:], keys[3000:], 0))
    assert _index_options(pg_backend, spec) == ["lists=3"]  # 1000 rows into 3000: incremental
    with pg_backend.engine.connect() as conn:
        result = pg_backend.knn(conn, spec, keys[::400], 1)
    assert result.ids[:, 0].tolist() == ids[::400].tolist()  # every row findable via the index


def test_a_failed_bulk_load_keeps_the_index(pg_backend, make_spec):
    spec = make_spec(key_dim=4, value_dim=4, index="hnsw")
    keys = np.ones((1500, 4), np.float32)
    block = RowBlock.fresh(np.zeros(1500, np.int64), keys, keys, 0)  # duplicate ids: COPY fails
    with pytest.raises(Exception, match="duplicate key"):
        with pg_backend.engine.begin() as conn:
            pg_backend.insert_rows(conn, spec, block)
    assert _index_options(pg_backend, spec) == ["m=16", "ef_construction=64"]


def test_hnsw_with_k_beyond_ef_search_cap_scans_exactly(pg_backend, make_spec):
    spec = make_spec(key_dim=4, value_dim=4, index="hnsw", oversample=1)
    keys = np.random.default_rng(5).standard_normal((1100, 4)).astype(np.float32)
    insert(pg_backend, spec, keys)
    query = np.zeros((1, 4), np.float32)
    with pg_backend.engine.connect() as conn:
        result = pg_backend.knn(conn, spec, query, 1050)
    expected = np.sort(brute_force("l2", query, keys)[0])[:1050]
    np.testing.assert_allclose(result.distances[0], expected, rtol=1e-5, atol=1e-5)


def test_unknown_index_and_too_many_dimensions_are_refused(pg_backend, make_spec):
    with pytest.raises(InvalidInputError, match="not available on PostgreSQL"):
        make_spec(index="faiss")
    with pytest.raises(InvalidInputError, match="2000"):
        make_spec(index="hnsw", key_dim=2001)
    make_spec(index="exact", key_dim=2001)  # exact scans have no such limit
    with pytest.raises(InvalidInputError, match="16000"):
        make_spec(index="exact", key_dim=8, value_dim=16001)


@pytest.mark.parametrize("kind", ["rescore-bit", "rescore-int8"])
def test_sqlite_quantised_index_kinds_are_served_by_hnsw(pg_backend, make_spec, kind):
    spec = make_spec(index=kind, key_dim=4, value_dim=4)
    with pg_backend.engine.connect() as conn:
        method = conn.exec_driver_sql(
            "SELECT am.amname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = %(t)s::regclass "
            "AND NOT i.indisprimary",
            {"t": rows_table(spec)},
        ).scalar()
    assert method == "hnsw"


def test_compact_gives_deleted_space_back(pg_backend, make_spec):
    spec = make_spec(key_dim=64, value_dim=64)
    insert(
        pg_backend, spec, np.random.default_rng(6).standard_normal((5000, 64)).astype(np.float32)
    )
    table_size = f"SELECT pg_total_relation_size('{rows_table(spec)}')"
    with pg_backend.engine.begin() as conn:
        before = conn.exec_driver_sql(table_size).scalar()
        pg_backend.delete_rows(conn, spec, np.arange(1, 4501))
    pg_backend.compact(spec)
    with pg_backend.engine.connect() as conn:
        after = conn.exec_driver_sql(table_size).scalar()
        assert pg_backend.count_rows(conn, spec) == 500
    assert after < before / 4
    assert pg_backend.size_bytes() > 0
