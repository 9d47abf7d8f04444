"""When to try a delivery again, and how long to wait: the policy, kept apart from the I/O.

Retry what may succeed later (connection errors, timeouts, 429, 5xx) and never what will not
(other 4xx: a bad payload or a revoked webhook), so a broken channel fails loudly and fast
instead of burning its retries.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

Verdict = Literal["ok", "retry", "reject"]


def classify_status(status: int) -> Verdict:
    if 200 <= status < 300:
        return "ok"
    if status == 429 or 500 <= status < 600:
        return "retry"
    # 3xx included: redirects are not followed (a POST must reach the configured URL) and never fix themselves
    return "reject"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent or garbled."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter, overridden upwards by the server's Retry-After.

    Jitter (up to ``jitter`` of the delay taken off) keeps channels that failed together from
    retrying in lockstep against a recovering service.
    """

    initial_s: float
    max_s: float
    retry_after_max_s: float
    jitter: float = 0.2

    def delay(self, attempt: int, retry_after: float | None = None, rand: Callable[[], float] = random.random) -> float:
        """Wait before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
        base: float = min(self.max_s, self.initial_s * float(2 ** min(attempt, 40)))
        base *= 1.0 - self.jitter * rand()
        if retry_after is not None:
            base = max(base, min(retry_after, self.retry_after_max_s))
        return base
