"""Types of the C extension built from ``processors/_native.c``."""

from typing import Any

def gather(events: list[Any], cls: type, specs: tuple[tuple[Any, ...], ...], /) -> list[Any]:
    """Per (field, kind) or (field, kind, field of that field): (null_count, validity or None, *buffers);
    a bool for kind 8 (some value non-empty)."""

def combine(events: list[Any], cls: type, fields: tuple[str, ...], /) -> tuple[bytes, list[tuple[Any, ...]]]:
    """Each event's combination of ``fields`` as an int32 code (first appearance order), and the combinations."""

def timestamps(events: list[Any], cls: type, field: str, /) -> list[float]:
    """Each event's datetime field as ``datetime.timestamp()`` gives it."""
