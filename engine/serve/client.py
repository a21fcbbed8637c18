"""`engine.Client`: the Python client of `engine serve` (httpx), answering as the library does."""
from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np

from ..errors import EngineError


class Hits(tuple):
    """(scores float32 Q x k', ids int64 Q x k'), as `engine.search` returns them, with `.names` (Q lists of k'
    strings; None when not asked for)."""

    def __new__(cls, scores: np.ndarray, ids: np.ndarray, names: list[list[str]] | None):
        hits = super().__new__(cls, (scores, ids))
        hits.names = names
        return hits

    scores = property(lambda self: self[0])
    ids = property(lambda self: self[1])


class Client:
    """A connection (pool) to a search server at `url` (e.g. http://127.0.0.1:8080); safe to share between threads.

    Every refusal of the server, and a server that cannot be reached, is an EngineError with its one-line reason.
    """

    def __init__(self, url: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, limits=httpx.Limits(max_connections=256))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise EngineError(f"cannot reach the search server ({type(e).__name__}: {e})".splitlines()[0], self.url) from None
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": response.text[:200]}
        if response.status_code != 200:
            reason = payload.get("error", response.reason_phrase) if isinstance(payload, dict) else response.reason_phrase
            raise EngineError(f"server answered {response.status_code}: {reason}", self.url + path)
        return payload

    @staticmethod
    def _hits(payload: dict) -> Hits:
        width = payload["k"]
        scores = np.asarray(payload["scores"], np.float32).reshape(-1, width)
        ids = np.asarray(payload["ids"], np.int64).reshape(-1, width)
        return Hits(scores, ids, payload.get("names"))

    @staticmethod
    def _params(k: int, scan: str | None, rescore: int | None, space: str | None, names: bool) -> dict:
        given = (("k", k), ("scan", scan), ("rescore", rescore), ("space", space), ("names", str(names).lower()))
        return {name: value for name, value in given if value is not None}

    def search(self, queries: np.ndarray, k: int, scan: str | None = None, rescore: int | None = None,
               space: str | None = None, names: bool = True) -> Hits:
        """Top k of each query (Q x D, or one D vector), options as `engine.search`'s; sent as float32 .npy.
        names: also fetch the ids' gallery names (`.names` of the result)."""
        buf = io.BytesIO()
        np.save(buf, np.atleast_2d(np.asarray(queries, dtype=np.float32)), allow_pickle=False)
        return self._hits(self._call("POST", "/search", content=buf.getvalue(), headers={"Content-Type": "application/x-npy"},
                                     params=self._params(k, scan, rescore, space, names)))

    def search_image(self, image: str | Path | bytes, k: int, bbx=None, scan: str | None = None,
                     rescore: int | None = None, names: bool = True) -> Hits:
        """Top k for one image (a file's path or its bytes), cropped to bbx (x1, y1, x2, y2) first, encoded by the server."""
        if isinstance(image, bytes):
            data = image
        else:
            try:
                data = Path(image).read_bytes()
            except OSError as e:
                raise EngineError(f"cannot read the image ({e.strerror})", image) from None
        fields = {} if bbx is None else {"bbx": ",".join(str(float(v)) for v in bbx)}
        return self._hits(self._call("POST", "/search/image", files={"image": ("image", data)}, data=fields,
                                     params=self._params(k, scan, rescore, None, names)))

    def health(self) -> dict:
        return self._call("GET", "/health")

    def stats(self) -> dict:
        return self._call("GET", "/stats")

    def reload(self) -> dict:
        return self._call("POST", "/reload")
