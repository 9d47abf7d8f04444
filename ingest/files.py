"""File replay: JSON Lines (optionally gzipped) read in fixed chunks of lines.

Chunk boundaries are fixed (``CHUNK_LINES``, not a setting), and each chunk's identity is its
line range plus a hash of its bytes. Replaying the same file again therefore produces the
same insert tokens, and ClickHouse drops the repeated blocks — raw rows and rollups alike.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path

import xxhash

from processors.records import PayloadBatch, Source

CHUNK_LINES = 50_000


def _open(path: Path) -> io.BufferedIOBase:
    raw = path.open("rb")
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    raw.seek(0)
    return raw  # type: ignore[return-value]


def read_chunks(path: Path, chunk_lines: int = CHUNK_LINES) -> Iterator[PayloadBatch]:
    """Payload batches of up to ``chunk_lines`` lines; offsets are 1-based line numbers."""
    source = Source("file", str(path.resolve()))
    with _open(path) as fh:
        payloads: list[bytes] = []
        offsets: list[int] = []
        digest = xxhash.xxh3_128()
        first_line = 1
        for number, line in enumerate(fh, start=1):
            digest.update(line)
            stripped = line.rstrip(b"\r\n")
            if stripped.strip():
                payloads.append(stripped)
                offsets.append(number)
            if number - first_line + 1 >= chunk_lines:
                yield PayloadBatch(source, payloads, offsets, digest=f"{first_line}:{digest.hexdigest()}")
                payloads, offsets, digest, first_line = [], [], xxhash.xxh3_128(), number + 1
        if payloads:
            yield PayloadBatch(source, payloads, offsets, digest=f"{first_line}:{digest.hexdigest()}")


def count_lines(path: Path) -> int:
    with _open(path) as fh:
        return sum(1 for _ in fh)
