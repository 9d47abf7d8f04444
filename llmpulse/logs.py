"""Log hygiene for the long-running commands (worker, judge, server).

aiokafka logs every failed attempt of every connection, fetch and coordinator lookup: about 250
lines a second while the broker is away (measured on the worker: 5,401 lines in the 20 s of a
stop), which buries the few lines that say what llmpulse does about it and fills the disk of
whoever ships those logs. ``QuietRepeats`` lets the first of a run of identical lines through,
then one per ``every`` seconds carrying the count it held back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

NOISY_LIBRARIES = ("aiokafka",)
"""Loggers (and their children) whose retries repeat themselves."""


class QuietRepeats(logging.Filter):
    """Identical lines (same logger, level and text) at most once per ``every`` seconds."""

    MAX_KEYS = 2048
    """Distinct lines remembered; past that the memory starts over (a line may then repeat once more)."""

    def __init__(self, every: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every = every
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}
        """Per line: when it last went through, and how many copies were held back since."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        key = (record.name, record.levelno, text)
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.every:
            self._seen[key] = (seen[0], seen[1] + 1)
            return False
        if len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()
        held = seen[1] if seen is not None else 0
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{text} [and {held} more like this in the last {self.every:g} s]"
            record.args = None
        return True


def quiet_repeats(prefixes: Iterable[str] = NOISY_LIBRARIES, every: float = 30.0) -> QuietRepeats:
    """Install one ``QuietRepeats`` on every logger under ``prefixes`` that exists now.

    A filter on a logger sees only the records made on that very logger, not its children's, so
    each module's logger gets it; call this after the library is imported."""
    quiet = QuietRepeats(every)
    names = [n for n in logging.root.manager.loggerDict if any(n == p or n.startswith(p + ".") for p in prefixes)]
    for name in [*prefixes, *names]:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietRepeats) for f in logger.filters):
            logger.addFilter(quiet)
    return quiet
