from __future__ import annotations

import msgspec
import pytest

from processors import release
from processors.release import ReleaseFingerprint, release_id
from schemas.wire import WireCall
from tests.conftest import payload

DECODE = msgspec.json.Decoder(WireCall).decode


def test_release_id_is_a_stable_content_hash() -> None:
    rid = release_id("v12", "gpt-4o", "gpt-4o-2024-08-06", "lora-1.9", "fv-3", "g-2", {"index": "kb-7"})
    assert rid == release_id("v12", "gpt-4o", "gpt-4o-2024-08-06", "lora-1.9", "fv-3", "g-2", {"index": "kb-7"})
    assert len(rid) == 12
    assert rid == "4810d6575b2e"  # pinned: a change here re-labels every stored release


def test_any_release_input_changes_the_id() -> None:
    base = ("v12", "gpt-4o", "gpt-4o-2024-08-06", None, None, None)
    ids = {
        release_id(*base),
        release_id("v13", *base[1:]),
        release_id(base[0], base[1], "gpt-4o-2024-11-20", *base[3:]),
        release_id(*base, {"index": "kb-8"}),
    }
    assert len(ids) == 4


def test_extra_release_fields_are_order_independent() -> None:
    a = DECODE(payload(release={"a": "1", "b": "2"}))
    b = DECODE(payload(release={"b": "2", "a": "1"}))
    step = ReleaseFingerprint()
    assert step([a]) == step([b])


def test_a_batch_gets_each_events_own_id_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C path numbers a batch's distinct tuples; events with a release map, repeats and
    missing fields must still each get exactly ``release_id`` of their own tuple."""
    variants = [
        {"prompt_version": "v1"},
        {"prompt_version": "v2", "adapter": "lora-3"},
        {"prompt_version": "v1", "release": {"index": "kb-7"}},
        {"response_model": "gpt-4o-2024-08-06", "guardrail_version": "g-1", "feature_view": "fv"},
        {"prompt_version": "v1", "release": {"index": "kb-8", "a": "b"}},
        {},
    ]
    events = [DECODE(payload(event_id=f"e{i}", **variants[i % len(variants)])) for i in range(40)]
    expected = [
        release_id(
            e.prompt_version, e.model, e.response_model, e.adapter, e.feature_view, e.guardrail_version, e.release
        )
        for e in events
    ]
    assert len(set(expected)) == len(variants)
    assert ReleaseFingerprint()(events) == expected
    monkeypatch.setattr(release, "_native", None)
    assert ReleaseFingerprint()(events) == expected
