"""The C extension built from ``processors/_native.c``, or None on an install without a C compiler.

One place imports it for every user (validate, pricing, release, the sink's columns), each of
which keeps a Python path for None. The column kinds are the C file's ``enum kind``, named, so a
``gather`` spec reads as what it asks for.
"""

from __future__ import annotations

try:
    from processors import _native
except ImportError:  # pragma: no cover - an install without a C compiler
    _native = None  # type: ignore[assignment]

K_STR = 0
K_I64 = 1
K_U32 = 2
K_U16 = 3
K_I32 = 4
K_F64 = 5
"""float64 with validity: a None value is a null."""
K_BOOL = 6
K_STR_TUPLE = 7
K_ANY_LEN = 8
"""Not a column: whether any event's value (a map, a tuple) is non-empty."""

__all__ = ["K_ANY_LEN", "K_BOOL", "K_F64", "K_I32", "K_I64", "K_STR", "K_STR_TUPLE", "K_U16", "K_U32", "_native"]
