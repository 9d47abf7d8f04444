"""ReleaseFingerprint: a short stable id for the release tuple that served a call.

The tuple is everything that can change an answer without a code deploy (the seeds' point:
prompt, model alias and served version, adapter, feature view, guardrail policy, and any
extra release inputs the event names). Same tuple, same id, in every process and forever:
it is a content hash, not a counter.
"""

from __future__ import annotations

import xxhash

from schemas.wire import WireCall

RELEASE_FIELDS = ("prompt_version", "model", "response_model", "adapter", "feature_view", "guardrail_version")


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
        memo = self._memo
        out: list[str] = []
        for e in events:
            key: tuple[object, ...] = (
                e.prompt_version,
                e.model,
                e.response_model,
                e.adapter,
                e.feature_view,
                e.guardrail_version,
                tuple(sorted(e.release.items())) if e.release else None,
            )
            rid = memo.get(key)
            if rid is None:
                rid = release_id(
                    e.prompt_version,
                    e.model,
                    e.response_model,
                    e.adapter,
                    e.feature_view,
                    e.guardrail_version,
                    e.release,
                )
                if len(memo) < 100_000:
                    memo[key] = rid
            out.append(rid)
        return out
