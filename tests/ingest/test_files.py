from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from ingest.files import read_chunks


def test_chunks_keep_line_numbers_and_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    path.write_bytes(b'{"a":1}\n\n{"a":2}\r\n{"a":3}\n')
    (chunk,) = read_chunks(path)
    assert chunk.payloads == [b'{"a":1}', b'{"a":2}', b'{"a":3}']
    assert chunk.offsets == [1, 3, 4]
    assert chunk.source.kind == "file" and chunk.source.name == str(path.resolve())


def test_chunk_identity_is_stable_and_content_addressed(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    path.write_bytes(b"".join(b'{"n":%d}\n' % i for i in range(25)))
    first = [c.block_id for c in read_chunks(path, chunk_lines=10)]
    again = [c.block_id for c in read_chunks(path, chunk_lines=10)]
    assert first == again and len(first) == 3
    path.write_bytes(b"".join(b'{"n":%d}\n' % i for i in range(25)).replace(b'{"n":24}', b'{"n":99}'))
    changed = [c.block_id for c in read_chunks(path, chunk_lines=10)]
    assert changed[:2] == first[:2] and changed[2] != first[2]


def test_gzip_is_read_transparently(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a":1}\n{"a":2}\n'))
    (chunk,) = read_chunks(path)
    assert chunk.payloads == [b'{"a":1}', b'{"a":2}']


def test_a_cut_short_gzip_is_named_with_the_lines_before_the_cut(tmp_path: Path) -> None:
    """Python reports it as EOFError, which click turned into a bare "Aborted!"."""
    from ingest.files import UnreadableFile, count_lines

    whole = gzip.compress(b"".join(b'{"n":%d}\n' % i for i in range(50_000)))
    path = tmp_path / "calls.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UnreadableFile, match=r"calls\.jsonl\.gz: its gzip stream ends before the end-of-stream "
                       r"marker: the file was cut short") as info:  # fmt: skip
        count_lines(path)
    assert 0 < info.value.lines < 50_000
    with pytest.raises(UnreadableFile) as again:
        list(read_chunks(path, chunk_lines=10**6))
    assert again.value.lines == info.value.lines
    path.write_bytes(b"\x1f\x8b" + b"not gzip at all")
    with pytest.raises(UnreadableFile, match=r"it is not a readable gzip file \("):
        count_lines(path)
