from __future__ import annotations

from processors.dedup import DropDuplicateEvents
from processors.validate import ValidationLimits, decode_calls
from tests.conftest import NOW, batch, payload


def test_repeated_event_ids_count_once_within_and_across_batches() -> None:
    decode = decode_calls(ValidationLimits())
    step = DropDuplicateEvents(capacity=10)
    first = decode(batch([payload(event_id="a"), payload(event_id="b"), payload(event_id="a")]), NOW)
    assert step(first) == 1
    assert [e.event_id for e in first.events] == ["a", "b"]
    assert first.offsets == [0, 1]
    second = decode(batch([payload(event_id="b"), payload(event_id="c")]), NOW)
    assert step(second) == 1
    assert [e.event_id for e in second.events] == ["c"]


def test_memory_is_bounded_by_two_generations() -> None:
    decode = decode_calls(ValidationLimits())
    step = DropDuplicateEvents(capacity=100)
    for k in range(10):
        step(decode(batch([payload(event_id=f"{k}-{i}") for i in range(100)]), NOW))
    assert len(step._current) + len(step._previous) <= 200


def test_ids_read_back_after_a_crash_are_remembered_within_the_same_bound() -> None:
    decode = decode_calls(ValidationLimits())
    step = DropDuplicateEvents(capacity=100)
    assert step.remember(f"old-{i}" for i in range(250)) == 250
    assert len(step._current) + len(step._previous) <= 200  # the newest 150-200 kept
    retried = decode(batch([payload(event_id="old-249"), payload(event_id="old-0"), payload(event_id="new")]), NOW)
    assert step(retried) == 1
    assert [e.event_id for e in retried.events] == ["old-0", "new"]  # the oldest fell out of the horizon
