"""Configuration of ``llmpulse serve``: listening address, API keys, limits, group commit, backpressure.

Nested into the main settings as ``server:`` (``LLMPULSE_SERVER__PORT=4318`` and so on). API keys
are stored as hashes only: a key is 32 random bytes, so one SHA-256 is as good as a slow password
hash (nobody brute-forces 256 bits) and costs nothing per request. The key itself is printed once
by ``llmpulse keys create`` and never written anywhere by llmpulse.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.durations import Duration

KEY_HASH_PREFIX = "sha256:"
KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Tenant ids end up in ClickHouse user and row-policy names and in Kafka records: keep them plain."""

Role = Literal["admin", "tenant"]


def hash_api_key(key: str) -> str:
    """The at-rest form of an API key (what the keys file holds)."""
    return KEY_HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RateLimit(_Section):
    """A token bucket per API key: sustained events per second, with a burst allowance.

    A request costs as many tokens as it carries events (capped at the burst, so a batch larger
    than the burst is still possible once the bucket is full); ``requests_per_second`` adds a
    second bucket against floods of tiny requests.
    """

    events_per_second: Annotated[float, Field(gt=0)]
    burst_events: Annotated[int, Field(ge=1)] | None = None
    """Bucket size; default twice the per-second rate (at least 1)."""
    requests_per_second: Annotated[float, Field(gt=0)] | None = None

    @property
    def burst(self) -> float:
        return float(self.burst_events) if self.burst_events is not None else max(1.0, 2 * self.events_per_second)


class TenantKey(_Section):
    """One API key as stored at rest: its hash, whose it is, and what it may do."""

    key_hash: Annotated[str, Field(pattern=KEY_HASH_PATTERN)]
    """``sha256:<hex>`` of the key (``llmpulse keys create`` prints it; ``llmpulse keys hash`` computes it)."""
    tenant: Annotated[str, Field(pattern=TENANT_PATTERN)]
    """Every event sent with this key is filed under this tenant, whatever the payload says."""
    role: Role = "tenant"
    """``tenant``: ingest and the named queries (bound to its tenant); ``admin``: also free SQL."""
    rate_limit: RateLimit | None = None
    """None: ``server.default_rate_limit``."""
    name: Annotated[str, Field(max_length=128)] | None = None
    """Who holds the key (shown in logs), e.g. ``checkout-service``."""


class OtlpAttributeSettings(_Section):
    """Which span/resource attributes attribute an OTLP GenAI call (``ingest.otlp.OtlpOptions``).

    None keeps the mapping's built-in list for that field; a list replaces it (tried in order,
    span attributes before resource attributes).
    """

    feature_keys: list[str] | None = None
    team_keys: list[str] | None = None
    prompt_version_keys: list[str] | None = None
    variant_keys: list[str] | None = None
    user_id_keys: list[str] | None = None
    default_feature: Annotated[str, Field(min_length=1, max_length=128)] = "unattributed"
    include_content: bool = False
    """Map prompt/output message attributes to ``prompt``/``output`` (the content policy still applies)."""
    input_excludes_cache_providers: list[str] = Field(default_factory=list)
    """Providers whose instrumentations report input tokens without cache reads/writes (e.g. anthropic)."""
    max_extra_attributes: Annotated[int, Field(ge=0, le=128)] = 32
    max_attribute_chars: Annotated[int, Field(ge=16, le=65536)] = 1024


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 4318
    """4318 is the OTLP/HTTP port exporters default to; 0 picks a free port."""
    mode: Literal["embedded", "kafka"] = "embedded"
    """embedded: in-process pipeline + ClickHouse; kafka: publish to the calls/feedback topics."""

    keys_file: Path | None = None
    """YAML or JSON list of ``TenantKey`` records; re-read when it changes (no restart to add or revoke)."""
    keys: list[TenantKey] = Field(default_factory=list)
    """Inline keys (e.g. ``LLMPULSE_SERVER__KEYS='[{"key_hash": "sha256:…", "tenant": "acme"}]'``)."""
    local_admin_token: bool = True
    """Embedded mode: write a random admin token into the data directory (mode 0600) so the CLI on this
    machine can query through the server; whoever can read it could read the chDB files anyway."""

    max_body_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    """Request body as sent (compressed or not); larger answers 413."""
    max_decompressed_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    """A gzip body may not inflate beyond this (zip bombs answer 413)."""
    max_events_per_request: Annotated[int, Field(ge=1)] = 10_000
    gzip: bool = True
    """Accept ``Content-Encoding: gzip``."""
    default_rate_limit: RateLimit | None = None
    """For keys without their own; None: unlimited."""

    group_commit_wait: Duration = 0.05
    """At most this long an idle server waits for more requests before writing; it stops waiting once
    requests stop arriving for 5 ms. Under load requests queue up behind the insert in progress and
    no wait is added."""
    group_commit_max_events: Annotated[int, Field(ge=1)] = 20_000
    """Events per group (one insert); a request is never split, so a group may hold one larger request."""
    max_pending_events: Annotated[int, Field(ge=1)] = 200_000
    """Accepted but not yet durable; beyond this new requests answer 503 with Retry-After."""
    max_pending_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024 * 1024
    commit_timeout: Duration = 10.0
    """How long a request waits for durability before answering 503 (its events still land, exactly once)."""
    stall_timeout: Duration = 5.0
    """An insert (or Kafka acknowledgement) in progress for longer than this makes new requests answer 503."""

    idempotency_keys_per_tenant: Annotated[int, Field(ge=0)] = 10_000
    idempotency_ttl: Duration = 86_400.0
    """Idempotency-Key horizon: the last N keys per tenant, for at most this long."""

    query_timeout: Duration = 30.0
    query_max_rows: Annotated[int, Field(ge=1)] = 100_000
    reports_public: bool = False
    """Serve ``GET /reports/latest`` (the weekly report, every tenant's figures) without an admin key."""

    otlp: OtlpAttributeSettings = Field(default_factory=OtlpAttributeSettings)

    @model_validator(mode="after")
    def _bounds(self) -> ServerSettings:
        if self.max_events_per_request > self.max_pending_events:
            raise ValueError(
                f"max_events_per_request ({self.max_events_per_request}) must not exceed "
                f"max_pending_events ({self.max_pending_events}): such a request could never be accepted"
            )
        return self


class KeysFileError(ValueError):
    """The keys file is unreadable or invalid; the message names the file, the entry and the field."""


def parse_keys(data: Any, origin: str) -> list[TenantKey]:
    """A list of key records, or ``{"keys": [...]}``; errors name ``origin``, the entry and the field."""
    if isinstance(data, dict) and "keys" in data:
        data = data["keys"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise KeysFileError(f"{origin}: expected a list of keys (or a mapping with `keys:`), got {type(data).__name__}")
    keys: list[TenantKey] = []
    for i, entry in enumerate(data):
        try:
            keys.append(TenantKey.model_validate(entry))
        except ValidationError as exc:
            hint = " (the keys file holds sha256:<64 hex digits>; `llmpulse keys hash KEY` computes it)"
            problems = "; ".join(
                f"`{'.'.join(str(p) for p in e['loc']) or 'entry'}`: {e['msg']}"
                + (hint if e["loc"][:1] == ("key_hash",) else "")
                for e in exc.errors()
            )
            raise KeysFileError(f"{origin}: key #{i + 1}: {problems}") from exc
    return keys


def load_keys_file(path: Path) -> list[TenantKey]:
    """Read a keys file (YAML or JSON); errors say which file and which entry to fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise KeysFileError(f"{path}: keys file not found (server.keys_file / --keys-file)") from exc
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read keys file: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise KeysFileError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    return parse_keys(data, str(path))


def is_key_hash(value: str) -> bool:
    return re.match(KEY_HASH_PATTERN, value) is not None
