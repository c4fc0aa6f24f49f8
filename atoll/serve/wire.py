"""The wire format of openpi-style policy servers: msgpack with NumPy arrays.

An array travels as a map {"__ndarray__": True, "data": raw bytes, "dtype":
dtype.str, "shape": [...]}, a NumPy scalar as {"__npgeneric__": True, "data":
item, "dtype": dtype.str} (keys as bytes), so a client of that ecosystem
(openpi_client's msgpack_numpy) and this server read each other's messages.
Object, void and complex arrays are refused: they cannot cross safely.
Errors travel as text frames, which those clients raise as server errors.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_REFUSED_KINDS = ("V", "O", "c")


class WireError(ValueError):
    """Bytes that are not a message of this protocol."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise WireError(f"arrays of dtype {obj.dtype} cannot be sent")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _decode(obj: dict) -> Any:
    try:
        if b"__ndarray__" in obj:
            dtype = np.dtype(obj[b"dtype"])
            if dtype.kind in _REFUSED_KINDS:
                raise WireError(f"arrays of dtype {dtype} are refused")
            shape = tuple(int(n) for n in obj[b"shape"])
            return np.frombuffer(obj[b"data"], dtype=dtype).reshape(shape)
        if b"__npgeneric__" in obj:
            return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, WireError):
            raise
        raise WireError(f"malformed array in the message: {e}") from None
    return obj


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes) -> Any:
    """A message from bytes; WireError for anything that is not one."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected a binary message, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_decode)
    except WireError:
        raise
    except Exception as e:  # msgpack raises several types for garbage
        raise WireError(f"not a msgpack message ({type(e).__name__}: {e})") from None
