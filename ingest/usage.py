"""Provider usage objects → the event's token fields, so every call is priced on the same counts.

llmpulse's ``input_tokens`` counts every input token, cached reads and cache writes included
(OpenAI's ``prompt_tokens`` semantics), and ``output_tokens`` every billed output token. The
providers do not agree on that:

* **Anthropic** reports ``input_tokens`` *beside* ``cache_read_input_tokens`` and
  ``cache_creation_input_tokens``. Published as is, a cached call is billed short (the cached
  and written tokens never reach the input count), its long-context tier is missed (the
  threshold compares the whole prompt), and a call whose cached part exceeds the raw input is
  rejected as inconsistent.
* **Gemini** reports thinking tokens (``thoughts_token_count``) beside the answer's
  ``candidates_token_count``, and tool-use prompt tokens beside ``prompt_token_count``; both are
  billed, as output and input. Its ``prompt_token_count`` already includes the cached part.

Each function takes the SDK's object or its JSON as a dict (either spelling, snake or camel
case) and returns keywords for ``TrackedCall.usage`` or ``Telemetry.record``. Unknown or
negative counts read as 0; an empty dict means no usage was reported at all, which the
pipeline prices as unknown rather than free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def openai_usage(usage: Any) -> dict[str, int]:
    """OpenAI's ``prompt_tokens`` already includes cached reads (and writes), like ``input_tokens``."""
    if usage is None:
        return {}
    input_tokens = _count(usage, "prompt_tokens")
    details = _field(usage, "prompt_tokens_details")
    cached = min(_count(details, "cached_tokens"), input_tokens)
    written = min(_count(details, "cache_write_tokens"), input_tokens - cached)
    return {
        "input_tokens": input_tokens,
        "output_tokens": _count(usage, "completion_tokens"),
        "cached_input_tokens": cached,
        "cache_write_tokens": written,
    }


def anthropic_usage(usage: Any) -> dict[str, int]:
    """Anthropic's ``message.usage``: cache reads and writes are added into ``input_tokens``, and
    the 1-hour writes of ``cache_creation`` (``ephemeral_1h_input_tokens``, billed 2x input
    against 1.25x for 5-minute ones) become ``cache_write_1h_tokens``."""
    if usage is None:
        return {}
    cached = _count(usage, "cache_read_input_tokens")
    by_ttl = _field(usage, "cache_creation")
    hour = _count(by_ttl, "ephemeral_1h_input_tokens")
    # the total, or where only the breakdown came (a proxy that dropped the total), its sum
    written = _count(usage, "cache_creation_input_tokens") or _count(by_ttl, "ephemeral_5m_input_tokens") + hour
    return {
        "input_tokens": _count(usage, "input_tokens") + cached + written,
        "output_tokens": _count(usage, "output_tokens"),
        "cached_input_tokens": cached,
        "cache_write_tokens": written,
        "cache_write_1h_tokens": min(hour, written),
    }


def gemini_usage(usage_metadata: Any) -> dict[str, int]:
    """Gemini's ``usage_metadata``: thinking tokens count as output and tool-use prompt tokens as
    input, as they are billed; ``cached_content_token_count`` is already inside the prompt count."""
    if usage_metadata is None:
        return {}
    meta = usage_metadata
    input_tokens = _count(meta, "prompt_token_count") + _count(meta, "tool_use_prompt_token_count")
    return {
        "input_tokens": input_tokens,
        "output_tokens": _count(meta, "candidates_token_count") + _count(meta, "thoughts_token_count"),
        "cached_input_tokens": min(_count(meta, "cached_content_token_count"), input_tokens),
        "cache_write_tokens": 0,
    }


def _field(obj: Any, name: str) -> Any:
    """An attribute of an SDK object, or a key of its JSON in snake or camel case."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        if name in obj:
            return obj[name]
        head, *rest = name.split("_")
        return obj.get(head + "".join(part.title() for part in rest))
    return getattr(obj, name, None)


def _count(obj: Any, name: str) -> int:
    value = _field(obj, name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
