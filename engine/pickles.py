"""Reading and writing the datasets' pickles (ground truth, SfM db, whitening pairs): the one home for both.

Pickles come from elsewhere (downloads, colleagues), and `pickle.load` runs whatever code a file names.
`read_pickle` never does: it admits only plain data (dict, list, tuple, set, str, bytes, int, float,
bool, None) and numpy arrays and scalars of plain dtypes (bool, integers, floats, complex, fixed-width
strings), in every form numpy's own pickles take (numpy 1.x `numpy.core.*` and 2.x `numpy._core.*`
names, protocols 0-5, Python 2 files). Numpy's reconstructors are not called on the file's state
either: the arrays are rebuilt here from their dtype code, shape and bytes with `np.frombuffer`.
Anything else (a function, a class, an object array, a persistent id) is refused with one EngineError
naming the file and what was refused.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np

from .errors import EngineError
from .files import writing

PROTOCOL = 4  # what write_pickle writes: readable by Python >= 3.4 and byte-identical for equal data
PLAIN = "only plain data (dict, list, str, numbers, arrays) is read from pickles"
# numpy dtype kinds whose bytes are values, never object references: bool, ints, floats, complex, str, bytes
_PLAIN_KINDS = frozenset("biufcUS")


class _Refused(Exception):
    """A global, dtype or opcode outside plain data: the message says what it was."""


class _Dtype:
    """Stands in for `numpy.dtype(code, align, copy)` while the pickle sets its state (byte order, size)."""

    def __init__(self, code, align=False, copy=False):
        if isinstance(code, bytes):
            code = code.decode("latin1")
        if not isinstance(code, str):
            raise _Refused(f"numpy.dtype({code!r})")
        try:
            self.dtype = np.dtype(code)
        except TypeError:
            raise _Refused(f"numpy.dtype({code!r})") from None
        if self.dtype.kind not in _PLAIN_KINDS or self.dtype.fields is not None or self.dtype.subdtype is not None:
            what = "an object array" if self.dtype.hasobject else "a structured or special dtype"
            raise _Refused(f"numpy.dtype({code!r}) ({what})")
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def resolve(self) -> np.dtype:
        """The dtype with the byte order the pickle gave; only the plain fields of the state are accepted."""
        dt = self.dtype
        if self.state is None:
            return dt
        state = tuple(self.state)
        if len(state) < 8 or any(s is not None for s in state[2:5]):  # (version, order, subarray, names, fields, ...)
            raise ValueError(f"unsupported dtype state {state!r}")
        order, elsize = state[1], state[5]
        if order in ("<", ">"):
            dt = dt.newbyteorder(order)
        elif order not in ("|", "="):
            raise ValueError(f"byte order {order!r}")
        if elsize not in (-1, dt.itemsize):
            raise ValueError(f"dtype {dt} with item size {elsize}")
        return dt


class _Array:
    """Stands in for `numpy.core.multiarray._reconstruct(ndarray, ...)` until the pickle sets its state."""

    def __init__(self):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def resolve(self) -> np.ndarray:
        """(version, shape, dtype, is_fortran, data) or, from older numpy, the same without version."""
        state = tuple(self.state) if self.state is not None else ()
        if len(state) == 5:
            state = state[1:]
        if len(state) != 4:
            raise ValueError("array without its state")
        shape, dtype, fortran, data = state
        return _from_bytes(data, dtype, shape, "F" if fortran else "C")


def _from_bytes(data, dtype, shape, order: str) -> np.ndarray:
    """A fresh array of `shape` from the raw bytes `data` (a Python 2 str holds them as latin-1)."""
    if not isinstance(dtype, _Dtype):
        raise ValueError("array without a dtype")
    dt = dtype.resolve()
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise _Refused(f"array data of type {type(data).__name__}, not bytes")
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"array shape {shape!r}")
    count = math.prod(shape)
    if count * dt.itemsize != len(data):
        raise ValueError(f"array of shape {shape} and dtype {dt} with {len(data)} bytes of data")
    return np.frombuffer(data, dtype=dt, count=count).reshape(shape, order=order).copy()


_NDARRAY = object()  # the `numpy.ndarray` global: only ever an argument of _reconstruct


def _reconstruct(cls, shape=None, typecode=None):
    if cls is not _NDARRAY:
        raise _Refused("numpy.core.multiarray._reconstruct of anything but numpy.ndarray")
    return _Array()


def _scalar(dtype, data=None):
    if data is None:
        raise _Refused("a numpy scalar without data (an object scalar)")
    return _from_bytes(data, dtype, (), "C")[()]


def _frombuffer(buffer, dtype, shape, order="C"):
    """Protocol 5's form: the bytes in band (out-of-band buffers are not accepted)."""
    return _from_bytes(buffer, dtype, shape, order)


def _codecs_encode(text, encoding="utf-8"):
    """Protocols 0-2 store bytes as `_codecs.encode(str, 'latin1')`; no other codec is needed or admitted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _bytes(*args):
    """Protocols 0-1 store b'' as `bytes()`; a size (`bytes(10**12)`) would be an allocation, not data."""
    if not args:
        return b""
    if not isinstance(args[0], str):
        raise _Refused(f"builtins.bytes({type(args[0]).__name__})")
    return _codecs_encode(*args)


_ALLOWED = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _bytes,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{(f"{m}.multiarray", "_reconstruct"): _reconstruct for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.multiarray", "scalar"): _scalar for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.numeric", "_frombuffer"): _frombuffer for m in ("numpy.core", "numpy._core")},
}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # Python 2's name, and protocol 2's from Python 3
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        raise _Refused("a persistent id")


def _resolve(obj, done: dict):
    """`obj` with every stand-in replaced by its numpy array or dtype; shared and cyclic parts stay shared."""
    key = id(obj)
    if key in done:
        return done[key]
    if isinstance(obj, (_Array, _Dtype)):
        done[key] = out = obj.resolve()
    elif isinstance(obj, list):
        done[key] = out = []
        out.extend(_resolve(v, done) for v in obj)
    elif isinstance(obj, dict):
        done[key] = out = {}
        for k, v in obj.items():
            out[_resolve(k, done)] = _resolve(v, done)
    elif isinstance(obj, tuple):  # registered after its items: a cycle through it may have registered it already
        out = done.setdefault(key, tuple(_resolve(v, done) for v in obj))
    elif isinstance(obj, (set, frozenset)):
        done[key] = out = type(obj)(_resolve(v, done) for v in obj)
    elif obj is None or isinstance(obj, (str, bytes, bytearray, int, float, complex, np.ndarray, np.generic)):
        out = obj
    else:  # unreachable with _ALLOWED as it is; a guard should it ever grow
        raise _Refused(f"an object of type {type(obj).__module__}.{type(obj).__qualname__}")
    return out


def read_pickle(path: str | Path):
    """The plain data in the pickle at `path`: dicts, lists, tuples, sets, str, bytes, numbers, None,
    numpy arrays (C-contiguous copies, plain dtypes) and numpy scalars.

    Raises EngineError naming the file when it is missing, is not a readable pickle (truncated, another
    format), or names anything but plain data (the refused global is named).
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError("file not found", path)
    try:
        with open(path, "rb") as f:
            # latin1: Python 2 files hold array bytes as str; it changes nothing in Python 3 pickles
            return _resolve(_PlainUnpickler(f, encoding="latin1").load(), {})
    except _Refused as e:
        raise EngineError(f"refusing to load {e}: {PLAIN}", path) from None
    except RecursionError:
        raise EngineError("not a readable pickle (nested too deeply)", path) from None
    except Exception as e:  # pickle's errors for a truncated or foreign file come in many types
        raise EngineError(f"not a readable pickle ({type(e).__name__}: {e})".splitlines()[0], path) from None


def write_pickle(obj, path: str | Path) -> None:
    """Write `obj` (plain data as read_pickle admits) as a protocol-4 pickle into place, atomically."""
    with writing(path) as f:
        pickle.dump(obj, f, protocol=PROTOCOL)
