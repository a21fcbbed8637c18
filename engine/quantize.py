"""Vector dtypes of the store: float32, float16, bfloat16 (stored as uint16 bits) and int8 with a per-row scale."""
from __future__ import annotations

import numpy as np

from .errors import EngineError

DTYPES = ("float32", "float16", "bfloat16", "int8")
# numpy dtype of each stored representation; bfloat16 has none, so its bits are kept as uint16.
STORAGE_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}


def check_dtype(dtype: str) -> str:
    """`dtype` itself when it is a store dtype; otherwise an EngineError listing the ones there are."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise EngineError(f"unknown vector dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return dtype


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even); returns the uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def bfloat16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 rows (N x D) -> (stored array, per-row float32 scale or None).

    int8 uses a symmetric per-row scale max|x| / 127, so x ~= q * scale.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_dtype(dtype)
    if dtype == "float32":
        return x, None
    if dtype == "float16":
        return x.astype(np.float16), None
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(x), None
    amax = np.abs(x).max(axis=1) if x.size else np.zeros(len(x), np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def decode(stored: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Stored rows back to float32 (exact for float32, rounded for the others)."""
    check_dtype(dtype)
    if dtype == "bfloat16":
        return bfloat16_bits_to_float32(stored)
    if dtype == "int8":
        return np.asarray(stored, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[:, None]
    return np.asarray(stored, dtype=np.float32)
