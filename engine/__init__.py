"""aml-engine: asymmetric image retrieval (teacher-encoded galleries, student-encoded queries).

Python API: `open_store(path)` and `search(store, queries, k) -> (scores, ids)`.
"""
from .errors import EngineError
from .search import search
from .store import open_store

__version__ = "0.1.0"
__all__ = ["EngineError", "open_store", "search", "__version__"]
