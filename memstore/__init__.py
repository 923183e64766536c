"""memstore: a SQL-backed (SQLite + sqlite-vec, PostgreSQL + pgvector) vector store with LRFU
eviction and recombination, numpy in and out. Never imports torch.
"""

from memstore import errors
from memstore.collection import Collection
from memstore.store import Store
from memstore.types import CollectionOptions, CollectionSpec, RowBlock, SearchResult

__all__ = [
    "Store",
    "Collection",
    "SearchResult",
    "RowBlock",
    "CollectionOptions",
    "CollectionSpec",
    "errors",
]
