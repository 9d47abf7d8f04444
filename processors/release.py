"""ReleaseFingerprint: a short stable id for the release tuple that served a call.

The tuple is everything that can change an answer without a code deploy (the seeds' point:
prompt, model alias and served version, adapter, feature view, guardrail policy, and any
extra release inputs the event names). Same tuple, same id, in every process and forever:
it is a content hash, not a counter.
"""

from __future__ import annotations

import xxhash

from processors.native import K_ANY_LEN, _native
from schemas.wire import WireCall

_ANY_RELEASE = (("release", K_ANY_LEN),)
"""``_native.gather`` spec: whether any event of a batch has a ``release{}`` entry."""

RELEASE_FIELDS = ("prompt_version", "model", "response_model", "adapter", "feature_view", "guardrail_version")
ReleaseTuple = tuple[str | None, str | None, str | None, str | None, str | None, str | None]


def release_id(
    prompt_version: str | None,
    model: str | None,
    response_model: str | None,
    adapter: str | None,
    feature_view: str | None,
    guardrail_version: str | None,
    release: dict[str, str] | None = None,
) -> str:
    """12 hex chars of xxh3-64 over the unit-separated tuple; extra fields sorted by name."""
    parts = [prompt_version or "", model or "", response_model or "", adapter or "", feature_view or ""]
    parts.append(guardrail_version or "")
    if release:
        parts.extend(f"{k}={v}" for k, v in sorted(release.items()))
    return xxhash.xxh3_64_hexdigest("\x1f".join(parts).encode())[:12]


class ReleaseFingerprint:
    def __init__(self) -> None:
        self._memo: dict[tuple[object, ...], str] = {}

    def __call__(self, events: list[WireCall]) -> list[str]:
        """A batch holds a few distinct release tuples: ``_native.combine`` numbers them in one C
        pass and each is hashed once, instead of a tuple and a dict lookup per event. Events with
        a ``release{}`` map (rare) are then fingerprinted one by one."""
        if _native is None or not events:
            return [self._of(e) for e in events]
        try:
            raw, distinct = _native.combine(events, WireCall, RELEASE_FIELDS)
            (has_release,) = _native.gather(events, WireCall, _ANY_RELEASE)
        except TypeError:  # a value that is not text: the Python path says what it is
            return [self._of(e) for e in events]
        ids = [self._memoized((*combo, None), combo, None) for combo in distinct]
        out = list(map(ids.__getitem__, memoryview(raw).cast("i")))
        if has_release:
            for i, e in enumerate(events):
                if e.release:
                    out[i] = self._of(e)
        return out

    def _of(self, e: WireCall) -> str:
        fields: ReleaseTuple = (
            e.prompt_version,
            e.model,
            e.response_model,
            e.adapter,
            e.feature_view,
            e.guardrail_version,
        )
        extra = tuple(sorted(e.release.items())) if e.release else None
        return self._memoized((*fields, extra), fields, e.release)

    def _memoized(self, key: tuple[object, ...], fields: ReleaseTuple, release: dict[str, str] | None) -> str:
        rid = self._memo.get(key)
        if rid is None:
            rid = release_id(*fields, release=release or None)
            if len(self._memo) < 100_000:
                self._memo[key] = rid
        return rid
