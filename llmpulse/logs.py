"""Log hygiene for the long-running commands (worker, judge, server).

aiokafka logs every failed attempt of every connection, fetch and coordinator lookup: about 250
lines a second while the broker is away (measured on the worker: 5,401 lines in the 20 s of a
stop), which buries the few lines that say what llmpulse does about it and fills the disk of
whoever ships those logs. ``QuietRepeats`` lets the first of a run of identical lines through,
then one per ``every`` seconds carrying the count it held back.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
import time
from collections.abc import Callable, Iterable

NOISY_LIBRARIES = ("aiokafka",)
"""Loggers (and their children) whose retries repeat themselves."""


class QuietRepeats(logging.Filter):
    """Identical lines (same logger, level, text and exception type) at most once per ``every``
    seconds. When a run stops, its last held-back copies are not reported (nothing logs then)."""

    MAX_KEYS = 2048
    """Distinct lines remembered; past that the memory starts over (a line may then repeat once more)."""

    def __init__(self, every: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every = every
        self._clock = clock
        self._seen: dict[tuple[str, int, int, str], tuple[float, int]] = {}
        """Per line (its text hashed: a DEBUG line may carry a whole message): when it last went
        through, and how many copies were held back since."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:
            return True  # the handler reports the bad format, as it would without this filter
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, hash(text), error)
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
            record.msg = f"{text} [repeated {held} times since it was last shown]"
            record.args = None
        return True


def quiet_repeats(prefixes: Iterable[str] = NOISY_LIBRARIES, every: float = 30.0) -> None:
    """Install one ``QuietRepeats`` on the logger of every module of the ``prefixes`` packages.

    A filter on a logger sees only the records made on that very logger, not its children's, so
    each module's logger gets it, including modules not imported yet (their loggers are made
    here, ahead of them)."""
    quiet = QuietRepeats(every)
    for prefix in prefixes:
        names = {prefix, *(n for n in logging.root.manager.loggerDict if n.startswith(prefix + "."))}
        with contextlib.suppress(ImportError):
            package = importlib.import_module(prefix)
            names.update(m.name for m in pkgutil.walk_packages(package.__path__, prefix + ".", onerror=lambda _: None))
        for name in names:
            logger = logging.getLogger(name)
            if not any(isinstance(f, QuietRepeats) for f in logger.filters):
                logger.addFilter(quiet)
