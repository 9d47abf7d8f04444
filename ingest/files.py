"""File replay: JSON Lines (optionally gzipped) read in fixed chunks of lines.

Chunk boundaries are fixed (``CHUNK_LINES``, not a setting), and each chunk's identity is its
line range plus a hash of its bytes. Replaying the same file again therefore produces the
same insert tokens, and ClickHouse drops the repeated blocks — raw rows and rollups alike.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

import xxhash

from processors.records import PayloadBatch, Source

CHUNK_LINES = 50_000

_GZIP_FAILURES = (EOFError, gzip.BadGzipFile, zlib.error)


class UnreadableFile(Exception):
    """A gzipped file that cannot be read to its end (cut short, or not gzip after its magic bytes).

    Python reports a cut gzip stream as ``EOFError``, which click takes for Ctrl-D and answers
    with a bare "Aborted!": the user learned neither what was wrong nor which file."""

    def __init__(self, path: Path, lines: int, cause: BaseException) -> None:
        self.path, self.lines = path, lines
        if isinstance(cause, EOFError):
            what = "its gzip stream ends before the end-of-stream marker: the file was cut short (an interrupted copy "
            what += "or download, or a file still being written)"
        else:
            what = f"it is not a readable gzip file ({cause})"
        super().__init__(f"{path}: {what}; {lines:,} whole line(s) read before that")


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
        for number, line in _numbered(path, fh):
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
    """Lines in the file; reading it through first also finds a cut-short gzip before any is replayed."""
    with _open(path) as fh:
        return sum(1 for _ in _numbered(path, fh))


def _numbered(path: Path, fh: io.BufferedIOBase) -> Iterator[tuple[int, bytes]]:
    number = 0
    try:
        for number, line in enumerate(fh, start=1):
            yield number, line
    except _GZIP_FAILURES as exc:
        raise UnreadableFile(path, number, exc) from exc
