"""Index kinds and URL schemes that only one backend serves get a clear answer, never a half-made collection."""

import numpy as np
import pytest

from memstore import Store
from memstore.errors import InvalidInputError


@pytest.mark.parametrize("index", ["hnsw", "ivfflat"])
def test_sqlite_refuses_pgvector_index_kinds_and_creates_nothing(tmp_path, index):
    with Store(f"sqlite:///{tmp_path / 'x.db'}") as store:
        with pytest.raises(InvalidInputError, match=f"{index}.*PostgreSQL"):
            store.create_collection("c", key_dim=4, index=index)
        assert store.list_collections() == []


@pytest.mark.parametrize("index", ["hnsw", "ivfflat"])
def test_postgres_serves_hnsw_and_ivfflat_through_the_store_api(fresh_postgres_url, index):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(300, 8)).astype(np.float32)
    with Store(fresh_postgres_url) as store:
        coll = store.create_collection("c", key_dim=8, metric="l2", index=index, oversample=64)
        coll.insert(keys)
        assert coll.index == index
        res = coll.search(keys[:5], 3, touch=False)
        # Each key's nearest row is itself at distance 0.
        np.testing.assert_allclose(res.distances[:, 0], 0.0, atol=1e-5)


def test_postgres_scheme_url_is_accepted(fresh_postgres_url):
    url = "postgres://" + fresh_postgres_url.split("://", 1)[1]
    with Store(url) as store:
        store.create_collection("c", key_dim=4)
        assert [c.name for c in store.list_collections()] == ["c"]
