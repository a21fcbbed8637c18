"""aml-engine: asymmetric image retrieval (teacher-encoded galleries, student-encoded queries).

Python API: `open_store(path)`, `search(store, queries, k) -> (scores, ids)`, `search_stores(stores, queries, k)`
and `Index(paths)`, the resident gallery (`index.search(queries, k)`, `index.refresh()`).
"""
from .errors import EngineError
from .index import Index
from .search import search, search_stores
from .serve.client import Client
from .store import open_store

__version__ = "0.1.0"
__all__ = ["Client", "EngineError", "Index", "open_store", "search", "search_stores", "__version__"]
