"""Repeated library log lines are held back and counted, not printed 250 times a second."""

from __future__ import annotations

import logging

import pytest

from llmpulse.logs import QuietRepeats, quiet_repeats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_identical_lines_once_per_period_with_the_count_held_back(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("llmpulse.test.quiet")
    quiet = QuietRepeats(every=30.0, clock=clock)
    logger.addFilter(quiet)
    try:
        with caplog.at_level(logging.INFO, logger="llmpulse.test.quiet"):
            for _ in range(250):  # one second of a broker outage
                logger.error('Unable connect to "%s": %s', "127.0.0.1:19092", "[Errno 111] Connection refused")
                logger.error("Failed fetch messages from 1: NodeNotReadyError")
                clock.now += 0.004
            logger.warning("Failed fetch messages from 1: NodeNotReadyError")  # another level: its own line
            clock.now += 30.0
            logger.error('Unable connect to "%s": %s', "127.0.0.1:19092", "[Errno 111] Connection refused")
            logger.error('Unable connect to "%s": %s', "127.0.0.1:19092", "[Errno 111] Connection refused")
    finally:
        logger.removeFilter(quiet)
    assert _lines(caplog) == [
        'Unable connect to "127.0.0.1:19092": [Errno 111] Connection refused',
        "Failed fetch messages from 1: NodeNotReadyError",
        "Failed fetch messages from 1: NodeNotReadyError",
        'Unable connect to "127.0.0.1:19092": [Errno 111] Connection refused [and 249 more like this in the last 30 s]',
    ]


def test_installed_on_every_module_logger_of_the_library() -> None:
    import aiokafka.consumer.fetcher  # noqa: F401  (the loggers exist once the modules are imported)

    loggers = [logging.getLogger(n) for n in ["aiokafka", *logging.root.manager.loggerDict] if n.startswith("aiokafka")]
    before = {lg.name: [f for f in lg.filters if isinstance(f, QuietRepeats)] for lg in loggers}
    for lg in loggers:  # a CLI test in this process may have installed one already
        for f in before[lg.name]:
            lg.removeFilter(f)
    quiet = quiet_repeats(("aiokafka",))
    try:
        for name in ("aiokafka", "aiokafka.conn", "aiokafka.consumer.fetcher", "aiokafka.producer.sender"):
            assert quiet in logging.getLogger(name).filters, name
        assert quiet not in logging.getLogger("llmpulse").filters
        again = quiet_repeats(("aiokafka",))  # a second call adds nothing
        assert again not in logging.getLogger("aiokafka.conn").filters
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)
            for f in before[lg.name]:
                lg.addFilter(f)
