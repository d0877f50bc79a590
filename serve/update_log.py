"""The durable update log: one JSON record per line, each with a CRC32, fsynced before an update
is acknowledged.

Line format: ``<crc32 of the JSON text, 8 hex digits> <JSON text>\\n``. The first record is a
header ``{"type": "header", "format": 1, "artifact_version": V}``: a log is replayed only on the
artifact it was written for. Every other record carries a strictly increasing ``seq``.

A crash can leave a torn LAST line (no newline, bad checksum or bad JSON): :func:`read_log` ignores
it and :class:`UpdateLog` truncates it away on open. Damage anywhere before the last line is not a
torn write but a corrupt file: :class:`LogError`, and the server refuses to start.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

__all__ = ["LogError", "UpdateLog", "read_log", "fsync_dir"]

FORMAT = 1


class LogError(RuntimeError):
    """The update log is corrupt or belongs to another artifact."""


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename / create inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _encode(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, separators=(",", ":"), allow_nan=False)
    return f"{zlib.crc32(text.encode()):08x} {text}\n".encode()


def _decode(line: bytes) -> dict[str, Any] | None:
    """The record of one complete line, or None when the checksum / JSON is bad."""
    try:
        crc, text = line.rstrip(b"\n").split(b" ", 1)
        if int(crc, 16) != zlib.crc32(text):
            return None
        record = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_log(path: Path, artifact_version: str) -> tuple[list[dict[str, Any]], int]:
    """``(records after the header, byte length of the valid prefix)`` of log ``path``.

    Raises :class:`LogError` when the header names another artifact, or a record before the
    last line is damaged. A missing file reads as empty.
    """
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    pos, valid_end, lineno = 0, 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        record = _decode(data[pos:end]) if nl >= 0 else None
        lineno += 1
        if record is None:
            if end < len(data):
                raise LogError(f"{path}: record {lineno} (byte {pos}) is damaged and is not the last "
                               f"one: the log is corrupt, not torn; refusing to replay it")
            break  # torn last write: ignored
        if lineno == 1:
            if record.get("type") != "header":
                raise LogError(f"{path}: the first record is not a log header")
            if record.get("artifact_version") != artifact_version:
                raise LogError(
                    f"{path} was written for artifact version {record.get('artifact_version')!r}, "
                    f"but the artifact being served is {artifact_version!r}; refusing to replay "
                    f"another artifact's updates (use another --state-dir)")
        else:
            records.append(record)
        pos = valid_end = end
    return records, valid_end


class UpdateLog:
    """Append-only log file ``path`` of one artifact version (see the module docstring).

    Not thread-safe: one writer (the model-owner thread) appends; :meth:`append` returns after
    the records are on disk (``flush`` + ``fsync``).
    """

    def __init__(self, path: str | Path, artifact_version: str) -> None:
        self.path = Path(path)
        self.version = artifact_version
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records, valid = read_log(self.path, artifact_version)
        self.replayed: list[dict[str, Any]] = records
        self.last_seq = max((int(r["seq"]) for r in records), default=0)
        if not self.path.exists() or valid == 0:
            self._rewrite([])
        else:
            with open(self.path, "r+b") as f:  # drop a torn tail before appending after it
                f.truncate(valid)
                f.flush()
                os.fsync(f.fileno())
        self._file = open(self.path, "ab")

    def append(self, records: list[dict[str, Any]]) -> list[int]:
        """Give each record the next ``seq``, write them and fsync; returns their seqs."""
        seqs = []
        chunks = []
        for record in records:
            self.last_seq += 1
            record = {**record, "seq": self.last_seq}
            chunks.append(_encode(record))
            seqs.append(self.last_seq)
        self._file.write(b"".join(chunks))
        self._file.flush()
        os.fsync(self._file.fileno())
        return seqs

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        header = {"type": "header", "format": FORMAT, "artifact_version": self.version}
        with open(tmp, "wb") as f:
            f.write(_encode(header) + b"".join(_encode(r) for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def truncate_through(self, seq: int, kept: list[dict[str, Any]]) -> None:
        """After a snapshot that holds every record up to ``seq``: rewrite the log atomically with
        only ``kept`` (the records after ``seq``, in order)."""
        if any(int(r["seq"]) <= seq for r in kept):
            raise ValueError(f"records to keep must all come after seq {seq}")
        self._file.close()
        self._rewrite(kept)
        self._file = open(self.path, "ab")

    def close(self) -> None:
        self._file.close()
