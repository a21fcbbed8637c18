"""Request bodies as data: read within a size limit, then parsed into checked values; never executed, never paths.

Every problem is a `BadRequest` carrying its HTTP status and a one-line reason.
"""
from __future__ import annotations

import email.parser
import email.policy
import io
import json
import numbers

import numpy as np
from starlette.requests import Request

from ..checks import float_problem

NPY_TYPES = ("application/octet-stream", "application/x-npy")
BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
SEARCH_FIELDS = ("queries", "k", "scan", "rescore", "space", "names")


class BadRequest(Exception):
    """A request the service refuses: `status` (4xx) and a one-line `reason`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed `limit` bytes: by its Content-Length before
    reading anything, and while reading when it has none (chunked)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BadRequest(400, f"Content-Length must be a byte count, got {length[:40]!r}")
        if int(length) > limit:
            raise BadRequest(413, f"body of {int(length)} bytes is over this server's limit of {limit} bytes (--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"body is over this server's limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_search_json(body: bytes) -> dict:
    """{"queries": [[...], ...], "k": int, "scan"?, "rescore"?, "space"?, "names"?} -> the same keys, queries as an array
    (any dtype: `engine.search.check_queries` judges it), the options type-checked; unknown fields refused."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(400, f"body is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(payload, dict):
        raise BadRequest(422, f"body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(SEARCH_FIELDS))
    if unknown:
        raise BadRequest(422, f"unknown field {unknown[0]!r}: expected {', '.join(SEARCH_FIELDS)}")
    for name in ("queries", "k"):
        if name not in payload:
            raise BadRequest(422, f"field {name!r} is required")
    try:
        queries = np.asarray(payload["queries"])
    except (ValueError, TypeError):  # ragged lists
        raise BadRequest(422, "queries must be a Q x D array of numbers (lists of equal length)") from None
    return {"queries": queries, "k": payload["k"], **search_options(payload)}


def search_options(values) -> dict:
    """scan (a string), rescore (an integer >= 0), space (a string) and names (a boolean: answer the ids' names
    too; default true) from a JSON object or query parameters (strings there); absent or null -> None (names:
    true). Whether the store holds the copy is the library's to say."""
    out = {}
    for name in ("scan", "space"):
        value = values.get(name)
        if value is not None and not isinstance(value, str):
            raise BadRequest(422, f"{name} must be a string, got {value!r}")
        out[name] = value
    rescore = values.get("rescore")
    if isinstance(rescore, str):
        rescore = parse_int(rescore, "rescore")
    if rescore is not None and (isinstance(rescore, bool) or not isinstance(rescore, numbers.Integral) or rescore < 0):
        raise BadRequest(422, f"rescore must be an integer >= 0, got {rescore!r}")
    out["rescore"] = rescore
    names = values.get("names", True)
    if isinstance(names, str) and names.lower() in BOOLEANS:
        names = BOOLEANS[names.lower()]
    if not isinstance(names, bool):
        raise BadRequest(422, f"names must be true or false, got {names!r}")
    out["names"] = names
    return out


def parse_int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadRequest(422, f"{name} must be an integer, got {text[:40]!r}") from None


def parse_npy(body: bytes) -> np.ndarray:
    """An .npy file's bytes -> its array (no pickles: object arrays are refused)."""
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # numpy raises several types for a bad file
        raise BadRequest(400, f"body is not a readable .npy array ({type(e).__name__})") from None
    if not isinstance(array, np.ndarray):
        raise BadRequest(400, "body is an .npz archive, not an .npy array")
    return array


def parse_bbx(text: str | None) -> list[float] | None:
    """"x1,y1,x2,y2" (or a JSON list) -> four finite numbers with x1 < x2, y1 < y2; None when absent."""
    if text is None or not text.strip():
        return None
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else [float(v) for v in text.split(",")]
    except (ValueError, RecursionError):
        raise BadRequest(422, f"bbx must be four numbers x1,y1,x2,y2, got {text[:60]!r}") from None
    if not isinstance(values, list) or len(values) != 4 or any(float_problem(v) for v in values):
        raise BadRequest(422, f"bbx must be four finite numbers x1,y1,x2,y2, got {text[:60]!r}")
    x1, y1, x2, y2 = (float(v) for v in values)
    if not (x1 < x2 and y1 < y2):
        raise BadRequest(422, f"bbx must have x1 < x2 and y1 < y2, got {text[:60]!r}")
    return [x1, y1, x2, y2]


def parse_image_upload(body: bytes, content_type: str) -> tuple[bytes, str | None]:
    """(image bytes, bbx text or None) from a multipart/form-data body (fields `image` and optional `bbx`).

    The part's file name is ignored: the bytes are the image, whatever it is called.
    """
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise BadRequest(400, "multipart body could not be parsed (no parts, or no boundary)")
    image = bbx = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if name == "image":
            image = payload
        elif name == "bbx":
            bbx = (payload or b"").decode("utf-8", "replace")
    if not image:
        raise BadRequest(422, "multipart body has no (or an empty) 'image' field")
    return image, bbx
