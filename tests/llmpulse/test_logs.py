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
        'Unable connect to "127.0.0.1:19092": [Errno 111] Connection refused'
        " [repeated 249 times since it was last shown]",
    ]


def test_installed_on_every_module_logger_of_the_library() -> None:
    def installed(name: str) -> list[logging.Filter]:
        return [f for f in logging.getLogger(name).filters if isinstance(f, QuietRepeats)]

    names = ["aiokafka", *(n for n in logging.root.manager.loggerDict if n.startswith("aiokafka."))]
    before = {n: installed(n) for n in names}
    for n, filters in before.items():  # a CLI test in this process may have installed it already
        for f in filters:
            logging.getLogger(n).removeFilter(f)
    try:
        quiet_repeats(("aiokafka",))
        # the admin client's and the assignors' modules, whether imported yet or not
        for name in ("aiokafka", "aiokafka.conn", "aiokafka.consumer.fetcher", "aiokafka.admin.client",
                     "aiokafka.coordinator.assignors.range"):  # fmt: skip
            assert len(installed(name)) == 1, name
        assert not installed("llmpulse")
        quiet_repeats(("aiokafka",))  # a second call adds nothing
        assert len(installed("aiokafka.conn")) == 1
    finally:
        for n in [*names, *(n for n in logging.root.manager.loggerDict if n.startswith("aiokafka."))]:
            for f in installed(n):
                logging.getLogger(n).removeFilter(f)
            for f in before.get(n, []):
                logging.getLogger(n).addFilter(f)


def test_a_bad_format_is_left_to_the_handler() -> None:
    record = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, "%d items", ("not a number",), None)
    assert QuietRepeats().filter(record)
