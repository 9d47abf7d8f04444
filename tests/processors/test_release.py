from __future__ import annotations

import msgspec

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
