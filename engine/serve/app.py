"""`engine serve`: the resident index behind HTTP (FastAPI on uvicorn).

Why this stack: one process holds the gallery mapped once; the C++ scan releases the GIL and uses every core
itself, so the service needs no worker processes (each would map and page in the gallery again), only an
event loop that keeps accepting while worker threads scan, and a batching task that turns concurrent single
queries into query blocks (batching.py). Starlette/FastAPI give small async handlers on uvicorn; Ray Serve
would add a cluster runtime and a second process hop for the same one-machine job (shard groups across
machines are Ray's, elsewhere).

Endpoints (every refusal is a 4xx with a one-line `{"error": "..."}`; the server keeps answering):
  POST /search         {"queries": [[float, ...], ...], "k": int, "scan"?, "rescore"?, "space"?, "names"?}, or an
                       .npy body (Content-Type application/x-npy or application/octet-stream) with k and the
                       options as query parameters -> {"ids", "scores", "names", "k"}: Q lists of k' best first,
                       exactly `engine.search`'s; k' = min(k, gallery size) (k above --max-k is refused);
                       "names": false leaves the names out (less to look up and to send).
  POST /search/image   an image (multipart field `image`, or the raw body), optional `bbx` x1,y1,x2,y2 (form
                       field or query parameter), k and the options as query parameters: the server's query
                       encoder (a student) encodes it and searches the gallery; the same answer as /search.
  GET  /health         {"status": "ok", "count", "dim", "generation"}
  GET  /stats          gallery size and generation, requests and queries served, blocks and mean block size,
                       latency p50 / p99 (ms) over the last requests.
  POST /reload         index.refresh(): the newest published generation, whole ({"changed", "generation"}).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngineError
from ..index import Index
from ..search import check_queries
from .batching import Batcher
from .requests import NPY_TYPES, BadRequest, media_type, parse_bbx, parse_image_upload, parse_int, parse_npy, \
    parse_search_json, read_body, search_options


@dataclass(frozen=True)
class ServeConfig:
    """The service's bounds. max_batch: queries per scanned block; max_wait_ms: how long a request may wait
    for others to join its block; blocks: blocks scanned at once (each scan uses every core already; a second
    overlaps one block's Python work with the other's scan); max_body_mb: the largest request body read;
    max_k: the largest k accepted."""

    max_batch: int = 64
    max_wait_ms: float = 2.0
    blocks: int = 2
    max_body_mb: float = 16.0
    max_k: int = 10_000


class QueryEncoder:
    """Images -> query vectors with one encoder (a student, usually), one image at a time under a lock."""

    def __init__(self, encoder, max_side: int, runner: str = "auto", device: str = "cpu"):
        from ..backends import make_runner
        from ..encode import EncodeOptions

        self.encoder = encoder
        self.options = EncodeOptions(max_side=max_side, workers=0, batch_size=1, skip_bad=True, progress=False,
                                     backend=runner, device=device)
        self.runner = make_runner(encoder, runner, device)
        self._lock = threading.Lock()  # one forward pass at a time: the runner's memory stays bounded

    def encode(self, image: bytes, bbx: list[float] | None) -> np.ndarray:
        """Image bytes (any format engine.images decodes) -> 1 x D float32; undecodable bytes are a BadRequest."""
        from ..encode import encode_to_array

        with tempfile.TemporaryDirectory(prefix="aml-serve-") as folder:  # the decoder reads files; the name is ours
            path = Path(folder) / "upload"
            path.write_bytes(image)
            with self._lock:
                vectors, _, skipped = encode_to_array(self.encoder, [(path, bbx)], self.options, self.runner)
        if skipped:
            raise BadRequest(422, skipped[0]["error"].replace(f"{path}: ", "").replace(str(path), "upload"))
        return vectors


def _json(content: dict, status: int = 200) -> Response:
    # allow_nan: an overflowing query's scores are +-inf (Python's json reads the literals back)
    return Response(json.dumps(content, separators=(",", ":")), status, media_type="application/json")


def _error(status: int, reason: str) -> Response:
    return _json({"error": reason.splitlines()[0] if reason else "error"}, status)


def create_app(index: Index, config: ServeConfig = ServeConfig(), encoder: QueryEncoder | None = None) -> FastAPI:
    """The ASGI app over `index`; `encoder` (optional) serves /search/image."""
    batcher = Batcher(index, config.max_batch, config.max_wait_ms, config.blocks)
    limit = int(config.max_body_mb * 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="aml-engine search", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(BadRequest)
    async def bad_request(_request, e: BadRequest):
        return _error(e.status, e.reason)

    @app.exception_handler(EngineError)
    async def engine_error(_request, e: EngineError):
        return _error(422, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def internal(_request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    async def answer(queries, k, options: dict) -> Response:
        if isinstance(k, str):
            k = parse_int(k, "k")
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k > config.max_k:
            raise BadRequest(422, f"k = {k} is over this server's limit of {config.max_k} (--max-k)")
        q = check_queries(index.stores[0], queries, k, options["space"])  # the library's checks, before batching
        if len(q) == 0:
            raise BadRequest(422, "no queries: send a Q x D array with Q >= 1")
        hits = await batcher.search(q, int(k), options["scan"], options["rescore"], options["space"], options["names"])
        answer = {"k": hits.ids.shape[1], "ids": hits.ids.tolist(), "scores": hits.scores.tolist()}
        return _json(answer if hits.names is None else {**answer, "names": hits.names})

    @app.post("/search")
    async def search(request: Request):
        body = await read_body(request, limit)
        kind = media_type(request)
        if kind in NPY_TYPES:
            params = request.query_params
            if "k" not in params:
                raise BadRequest(422, "k is required (a query parameter with an .npy body)")
            return await answer(parse_npy(body), params["k"], search_options(params))
        if kind not in ("application/json", ""):
            raise BadRequest(415, f"Content-Type {kind!r}: send application/json or an .npy as application/x-npy")
        fields = parse_search_json(body)
        return await answer(fields.pop("queries"), fields.pop("k"), fields)

    @app.post("/search/image")
    async def search_image(request: Request):
        if encoder is None:
            raise BadRequest(404, "this server has no query encoder: start it with --model or --student")
        body = await read_body(request, limit)
        params = dict(request.query_params)
        if media_type(request) == "multipart/form-data":
            image, bbx = await asyncio.to_thread(parse_image_upload, body, request.headers["content-type"])
            params.setdefault("bbx", bbx)
        else:
            image = body
        if not image:
            raise BadRequest(422, "no image: send it as the body or as the multipart field 'image'")
        if "k" not in params:
            raise BadRequest(422, "k is required (a query parameter)")
        vector = await asyncio.to_thread(encoder.encode, image, parse_bbx(params.get("bbx")))
        options = search_options(params)
        options["space"] = options["space"] or encoder.encoder.space
        return await answer(vector, params["k"], options)

    @app.get("/health")
    async def health():
        return _json({"status": "ok", "count": index.count, "dim": index.dim, "generation": list(index.generation)})

    @app.get("/stats")
    async def stats():
        return _json({"count": index.count, "dim": index.dim, "space": index.space,
                      "generation": list(index.generation), **batcher.stats()})

    @app.post("/reload")
    async def reload():
        try:
            changed = await batcher.reload()
        except EngineError as e:  # the new generation cannot be opened: the old one is still served
            return _error(409, f"reload failed, still serving generation {list(index.generation)}: {e}")
        return _json({"changed": changed, "count": index.count, "generation": list(index.generation)})

    return app


def serve(index: Index, host: str, port: int, config: ServeConfig = ServeConfig(), encoder: QueryEncoder | None = None) -> None:
    """Run the service until interrupted (one process; uvicorn's event loop)."""
    import uvicorn

    uvicorn.run(create_app(index, config, encoder), host=host, port=port, log_level="warning")
