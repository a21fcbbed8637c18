"""aml-engine: asymmetric image retrieval (teacher-encoded galleries, student-encoded queries).

Python API: `open_store(path)`, `search(store, queries, k) -> (scores, ids)` and `search_stores(stores, queries, k)`.
"""
from .errors import EngineError
from .search import search, search_stores
from .store import open_store

__version__ = "0.1.0"
__all__ = ["EngineError", "open_store", "search", "search_stores", "__version__"]
