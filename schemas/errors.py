"""Which failures are timeouts and which are rate limiting: one vocabulary for every ingest path.

The SDK sees exception classes, OTLP spans see ``error.type`` strings (usually the same class
names, sometimes an HTTP status or a gRPC code), and both must land on the same ``status`` so
fallback decisions and error-rate alerts compare like with like.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

ErrorStatus = Literal["error", "timeout", "rate_limited"]

RATE_LIMIT_MARKERS = (
    "ratelimit",
    "rate_limit",
    "rate limit",
    "too_many_requests",
    "toomanyrequests",
    "throttl",
    "resource_exhausted",
    "resourceexhausted",
)
TIMEOUT_MARKERS = ("timeout", "timed_out", "timedout", "timed out", "deadline_exceeded", "deadlineexceeded")
RATE_LIMIT_HTTP = frozenset({429})
TIMEOUT_HTTP = frozenset({408, 504})


def error_status(names: Iterable[str | None], http_status: int | None = None) -> ErrorStatus:
    """Classify a failure from its type names (exception classes, ``error.type``) and HTTP status."""
    if http_status in RATE_LIMIT_HTTP:
        return "rate_limited"
    if http_status in TIMEOUT_HTTP:
        return "timeout"
    lowered = [n.lower() for n in names if n]
    if any(n == "429" or any(m in n for m in RATE_LIMIT_MARKERS) for n in lowered):
        return "rate_limited"
    if any(n in ("408", "504") or any(m in n for m in TIMEOUT_MARKERS) for n in lowered):
        return "timeout"
    return "error"
