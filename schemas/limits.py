"""Bounds every accepted event must respect.

One place for them so the pydantic models (the documented schema), the msgspec
decoder on the hot path and the DLQ reasons cannot disagree.
"""

from __future__ import annotations

SCHEMA_VERSION = 2
"""Current event schema version. Changes are additive; every older version stays accepted.
2: ``cache_write_1h_tokens`` (the 1-hour cache writes among ``cache_write_tokens``)."""

MAX_ID_CHARS = 256
"""event_id, request_id, conversation_id, user_id, trace_id, prompt_hash."""
MAX_NAME_CHARS = 128
"""feature, team, service, tenant, provider, model, versions, variant and similar labels."""
MAX_ERROR_MESSAGE_CHARS = 4096
MAX_TOKENS = 100_000_000
"""Per call. Larger counts are corrupt data, not traffic."""
MAX_OUTPUT_CHARS = 4_294_967_295
"""``output_chars`` is stored as UInt32: a larger value is rejected at validation, not at the insert."""
MAX_LATENCY_MS = 86_400_000.0
"""One day: a call that took longer is a clock bug."""
MAX_COST_USD = 100_000.0
MAX_TOOL_CALLS = 256
MAX_ATTRIBUTES = 128
MAX_RELEASE_FIELDS = 32
MAX_RATING = 5

DEFAULT_MAX_EVENT_BYTES = 1_048_576
DEFAULT_MAX_DEPTH = 16
DEFAULT_FUTURE_TOLERANCE_S = 3600.0
