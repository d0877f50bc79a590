"""Binary framing of tensors between the mesh services (no JSON for tensors).

A frame is a tiny header followed by raw array bytes::

    b"STM1" | u16 count | count x field header | payloads (each 8-byte aligned)
    field header = u8 name_len | name (ascii) | u8 dtype code | u8 ndim | ndim x u32 dims

Payloads are the arrays' C-order bytes (``ndarray.tobytes()``), little-endian, in field order,
each starting at a multiple of 8 from the frame start so ``np.frombuffer`` views are aligned (no
copy on decode). Strings travel as a ``uint8`` blob plus ``int64`` offsets (:func:`pack_strings`).

:func:`decode` validates everything before handing arrays out (magic, truncation, unknown dtype,
sizes, duplicate names, trailing bytes) and raises :class:`ProtocolError` (a ``ValueError``), which
the services answer with HTTP 400.
"""

from __future__ import annotations

import struct
from typing import Mapping

import numpy as np

__all__ = ["MAGIC", "CONTENT_TYPE", "ProtocolError", "encode", "decode", "pack_strings",
           "unpack_strings", "require"]

MAGIC = b"STM1"
CONTENT_TYPE = "application/x-silvertorch-mesh"
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"), 2: np.dtype("<i8"), 3: np.dtype("u1"), 4: np.dtype("<i4"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_MAX_DIMS = 4
_MAX_FIELDS = 64


class ProtocolError(ValueError):
    """A malformed frame or a field of the wrong name, dtype or shape (answered with HTTP 400)."""


def _pad(n: int) -> int:
    return (-n) % 8


def encode(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``{name: array}`` (float32 / int64 / uint8 / int32, at most 4-D) -> one frame."""
    if len(arrays) > _MAX_FIELDS:
        raise ProtocolError(f"at most {_MAX_FIELDS} fields per frame, got {len(arrays)}")
    head = [MAGIC, struct.pack("<H", len(arrays))]
    bodies = []
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        code = _CODES.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
        if code is None:
            raise ProtocolError(f"field '{name}': dtype {a.dtype} not supported (float32, int64, uint8, int32)")
        if a.ndim > _MAX_DIMS:
            raise ProtocolError(f"field '{name}': at most {_MAX_DIMS} dimensions, got {a.ndim}")
        raw = name.encode("ascii")
        head.append(struct.pack(f"<B{len(raw)}sBB{a.ndim}I", len(raw), raw, code, a.ndim, *a.shape))
        bodies.append(a.astype(_DTYPES[code], copy=False).tobytes())
    out = bytearray(b"".join(head))
    for body in bodies:
        out += b"\0" * _pad(len(out))
        out += body
    return bytes(out)


def decode(frame: bytes) -> dict[str, np.ndarray]:
    """One frame -> ``{name: read-only array view}``; :class:`ProtocolError` on anything malformed."""
    mv = memoryview(frame)
    n = len(mv)
    if n < 6 or bytes(mv[:4]) != MAGIC:
        raise ProtocolError(f"not a mesh frame: expected magic {MAGIC!r} and a field count "
                            f"({n} bytes received)")
    (count,) = struct.unpack_from("<H", mv, 4)
    if count > _MAX_FIELDS:
        raise ProtocolError(f"frame declares {count} fields, at most {_MAX_FIELDS} allowed")
    pos = 6
    fields: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    for i in range(count):
        if pos + 1 > n:
            raise ProtocolError(f"frame truncated in the header of field {i}")
        ln = mv[pos]
        if pos + 1 + ln + 2 > n:
            raise ProtocolError(f"frame truncated in the header of field {i}")
        try:
            name = bytes(mv[pos + 1 : pos + 1 + ln]).decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(f"field {i}: name is not ascii") from None
        code, ndim = mv[pos + 1 + ln], mv[pos + 2 + ln]
        pos += 3 + ln
        if code not in _DTYPES:
            raise ProtocolError(f"field '{name}': unknown dtype code {code} (expected one of {sorted(_DTYPES)})")
        if ndim > _MAX_DIMS or pos + 4 * ndim > n:
            raise ProtocolError(f"field '{name}': bad dimension count {ndim} or truncated shape")
        shape = struct.unpack_from(f"<{ndim}I", mv, pos)
        pos += 4 * ndim
        if any(f[0] == name for f in fields):
            raise ProtocolError(f"field '{name}' appears twice")
        fields.append((name, _DTYPES[code], tuple(shape)))
    out: dict[str, np.ndarray] = {}
    for name, dt, shape in fields:
        pos += _pad(pos)
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if pos + size > n:
            raise ProtocolError(f"field '{name}': payload of {size} bytes for shape {shape} "
                                f"exceeds the frame ({n - pos} bytes left)")
        out[name] = np.frombuffer(frame, dtype=dt, count=size // dt.itemsize, offset=pos).reshape(shape)
        pos += size
    if pos != n:
        raise ProtocolError(f"frame has {n - pos} trailing bytes after its {count} fields")
    return out


def pack_strings(values: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Strings (None = empty) -> ``(blob (nbytes,) uint8, offsets (n + 1,) int64)``."""
    data = [(v or "").encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(d) for d in data], dtype=np.int64) if data else []
    return np.frombuffer(b"".join(data), dtype=np.uint8).copy(), offsets


def unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Inverse of :func:`pack_strings` (validated: monotone offsets inside the blob, utf-8)."""
    if offsets.ndim != 1 or offsets.size < 1 or blob.ndim != 1:
        raise ProtocolError("strings need a 1-D uint8 blob and 1-D int64 offsets (n + 1,)")
    off = offsets.tolist()
    if off[0] != 0 or off[-1] != blob.size or any(b < a for a, b in zip(off, off[1:])):
        raise ProtocolError(f"string offsets must rise from 0 to the blob size {blob.size}")
    raw = blob.tobytes()
    try:
        return [raw[a:b].decode("utf-8") for a, b in zip(off, off[1:])]
    except UnicodeDecodeError:
        raise ProtocolError("strings are not valid utf-8") from None


def require(arrays: Mapping[str, np.ndarray], name: str, dtype: str, ndim: int) -> np.ndarray:
    """``arrays[name]`` checked for dtype and number of dimensions (:class:`ProtocolError` if not)."""
    if name not in arrays:
        raise ProtocolError(f"missing field '{name}' (got {sorted(arrays)})")
    a = arrays[name]
    if a.dtype != np.dtype(dtype) or a.ndim != ndim:
        raise ProtocolError(f"field '{name}' must be {ndim}-D {np.dtype(dtype).name}, "
                            f"got {a.ndim}-D {a.dtype.name} {a.shape}")
    return a
