"""Page and frame numbers, and per-page results, on the wire: little-endian bytes.

A 512-page batch as a msgpack list costs a Python object per entry on both sides; as bytes it
is one buffer. Receivers also accept plain lists of ints (handy from a shell or a test).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def pack_i64(a: npt.ArrayLike) -> bytes:
    return np.asarray(a, dtype="<i8").tobytes()


def pack_i32(a: npt.ArrayLike) -> bytes:
    return np.asarray(a, dtype="<i4").tobytes()


def unpack(v: object, dtype: str) -> npt.NDArray[np.int64] | None:
    """bytes of ``dtype`` or a list of ints -> int64 array; None when it is neither."""
    if isinstance(v, bytes):
        size = np.dtype(dtype).itemsize
        if len(v) % size:
            return None
        return np.frombuffer(v, dtype=dtype).astype(np.int64)
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return np.asarray(v, dtype=np.int64)
    return None


def results(v: object) -> npt.NDArray[np.int32]:
    """Per-page results (0 / -errno) from a reply; ValueError when malformed."""
    a = unpack(v, "<i4")
    if a is None:
        raise ValueError("per-page results must be int32 bytes or a list of ints")
    return a.astype(np.int32)
