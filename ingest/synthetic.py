"""Realistic synthetic traffic for the demo, tests and benchmarks.

A week of calls from six features owned by five teams across OpenAI, Anthropic and Google
models: prompt caching, lognormal latencies and TTFT, multi-turn conversations, tool calls,
structured outputs, client-sent costs, a few unknown models, unknown fields, late and
duplicated events, and a sprinkling of malformed payloads. Three incidents are injected so the
demo has something to find:

* **prompt change**: ``search-summarize`` moves from prompt ``v7`` to ``v8`` in the middle of
  the period; ``v8`` writes twice as many output tokens from a 30% longer prompt (spend per
  call up ~1.7×: a cost spike);
* **refusal regression**: from 70% of the period on, ``claude-haiku-4-5`` refuses 18% of
  calls instead of 2%;
* **snapshot switch**: from 90% of the period on, the provider serves the ``gpt-4o-mini`` alias
  from a newer snapshot (only ``response_model`` tells);

and ``support-chat`` runs a canary of prompt ``v13`` (10% of conversations) whose refusal
rate is 4× the control's. ``simulated_judge`` stands in for an LLM judge so every quality view
has data: the canary's refusals pull its score down, ``v8``'s longer answers score a little higher.

Everything is a pure function of the seed and the end time, so a test can regenerate the
exact stream it checks against.
"""

from __future__ import annotations

import math
import random
import re
import time
from bisect import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import exp
from typing import Any

import orjson
import xxhash


@dataclass(frozen=True)
class ModelProfile:
    name: str
    provider: str
    ttft_ms: float
    """Median time to first token."""
    tokens_per_s: float
    response_model: str

    @property
    def log_ttft(self) -> float:
        return math.log(self.ttft_ms)


MODELS: dict[str, ModelProfile] = {
    m.name: m
    for m in (
        ModelProfile("gpt-4o", "openai", 420.0, 75.0, "gpt-4o-2024-08-06"),
        ModelProfile("gpt-4o-mini", "openai", 300.0, 110.0, "gpt-4o-mini-2024-07-18"),
        ModelProfile("gpt-4.1", "openai", 480.0, 70.0, "gpt-4.1-2025-04-14"),
        ModelProfile("claude-sonnet-4-5", "anthropic", 650.0, 62.0, "claude-sonnet-4-5-20250929"),
        ModelProfile("claude-haiku-4-5", "anthropic", 350.0, 120.0, "claude-haiku-4-5-20251001"),
        ModelProfile("gemini-2.5-flash", "google", 380.0, 160.0, "gemini-2.5-flash"),
    )
}


@dataclass(frozen=True)
class FeatureProfile:
    name: str
    team: str
    service: str
    weight: float
    models: tuple[tuple[str, float], ...]
    input_tokens: float
    output_tokens: float
    prompt_version: str
    cache_share: float = 0.0
    """Share of calls that read a prompt cache, and the cached share of their input."""
    turns: float = 1.0
    """Mean calls per conversation."""
    tool_rate: float = 0.0
    structured: bool = False
    streaming: bool = True
    distinct_prompts: int = 4000
    """How many different prompts the feature sends (fewer: more cache opportunity)."""
    agent: bool = False
    """An agent: each run is one trace whose steps follow each other back to back."""

    @property
    def log_input(self) -> float:
        return math.log(self.input_tokens)

    @property
    def log_output(self) -> float:
        return math.log(self.output_tokens)


FEATURES: tuple[FeatureProfile, ...] = (
    FeatureProfile(
        "support-chat", "customer-experience", "helpdesk-api", 0.30,
        (("claude-sonnet-4-5", 0.7), ("claude-haiku-4-5", 0.3)),
        2400, 320, "v12", cache_share=0.65, turns=5, tool_rate=0.25,
    ),
    FeatureProfile(
        "search-summarize", "search", "search-api", 0.22,
        (("gpt-4o-mini", 0.85), ("gpt-4o", 0.15)), 1800, 500, "v7", distinct_prompts=400,
    ),
    FeatureProfile(
        "code-review", "devex", "review-bot", 0.12,
        (("gpt-4.1", 0.6), ("claude-sonnet-4-5", 0.4)), 6000, 700, "v3", cache_share=0.4,
    ),
    FeatureProfile(
        "email-draft", "growth", "campaigns", 0.14,
        (("gpt-4o-mini", 0.5), ("claude-haiku-4-5", 0.5)), 900, 420, "v5",
    ),
    FeatureProfile(
        "doc-extract", "platform", "ingest-workers", 0.14,
        (("gemini-2.5-flash", 1.0),), 5200, 380, "v9", structured=True, streaming=False,
    ),
    FeatureProfile(
        "agent-planner", "devex", "agent-runtime", 0.08,
        (("gpt-4.1", 0.7), ("gpt-4o", 0.3)), 4200, 240, "v2", cache_share=0.5, turns=6, tool_rate=0.8, agent=True,
    ),
)  # fmt: skip

FEEDBACK_FEATURES = frozenset({"support-chat", "search-summarize", "email-draft"})
"""User-facing features, where people click thumbs up or down."""
FLAG_COMMENTS = ("wrong answer", "refused a normal question", "too long", "made that up", "not helpful")

JUDGE_QUALITY = {
    "support-chat": 0.82, "search-summarize": 0.74, "code-review": 0.70,
    "email-draft": 0.86, "doc-extract": 0.90, "agent-planner": 0.66,
}  # fmt: skip
"""Mean judge score of a normal answer per feature: the simulated judge's baseline."""
SIM_JUDGE_MODEL = "sim-judge-1"
SIM_RUBRIC = "helpfulness"

LN2 = math.log(2)
LN13 = math.log(1.3)
SWITCHED_SNAPSHOT = "gpt-4o-mini-2025-10-28"
"""What ``gpt-4o-mini`` resolves to after the provider's silent switch (the demo's third incident)."""
UNKNOWN_MODEL = "acme-llm-1"
"""Not in any price table: its calls arrive with ``price_missing``."""


@dataclass
class Scenario:
    events: int = 200_000
    days: float = 7.0
    seed: int = 7
    end: float = field(default_factory=lambda: float(int(time.time() // 60 * 60)))
    """Epoch seconds the traffic ends at (defaults to the current minute)."""
    malformed_rate: float = 0.0005
    late_rate: float = 0.002
    duplicate_rate: float = 0.0005
    unknown_model_rate: float = 0.001
    incidents: bool = True
    feedback_rate: float = 0.04
    """Share of user-facing calls that get a thumbs up or down."""

    @property
    def start(self) -> float:
        return self.end - self.days * 86400

    @property
    def prompt_change_at(self) -> float:
        return self.start + 0.5 * (self.end - self.start)

    @property
    def refusal_regression_at(self) -> float:
        return self.start + 0.7 * (self.end - self.start)

    @property
    def snapshot_switch_at(self) -> float:
        return self.start + 0.9 * (self.end - self.start)


@dataclass
class Conversation:
    cid: str
    feature: FeatureProfile
    model: str
    variant: str
    prompt_version: str
    user_id: str
    remaining: int
    """Calls still to come in this conversation."""
    static: bytes = b""
    """The JSON members every call of the conversation shares, encoded once."""
    last_end: float = 0.0
    """When the previous call ended: a chat turn starts after it, an agent step right at it."""


def _static_fields(c: Conversation, switched: bool = False) -> bytes:
    """``switched``: the provider now serves the ``gpt-4o-mini`` alias from a newer snapshot."""
    m = MODELS[c.model]
    f = c.feature
    fields = {
        "service": f.service,
        "feature": f.name,
        "team": f.team,
        "provider": m.provider,
        "model": c.model,
        "response_model": SWITCHED_SNAPSHOT if switched and c.model == "gpt-4o-mini" else m.response_model,
        "prompt_version": c.prompt_version,
        "variant": c.variant,
        "conversation_id": c.cid,
        "user_id": c.user_id,
        "params": {"temperature": 0.2, "max_tokens": 1024},
    }
    if f.agent:
        fields["trace_id"] = "t" + c.cid[1:]  # an agent run: its steps share a trace
    return b"," + orjson.dumps(fields)[1:-1]


def _iso(t: float, cache: dict[int, str]) -> str:
    minute = int(t // 60)
    prefix = cache.get(minute)
    if prefix is None:
        if len(cache) > 4096:
            cache.clear()
        prefix = cache[minute] = time.strftime("%Y-%m-%dT%H:%M:", time.gmtime(minute * 60))
    ms = int((t - minute * 60) * 1000)
    return f"{prefix}{ms // 1000:02d}.{ms % 1000:03d}Z"


def _fallback(payload: bytes, event_id: str, getrandbits: Any, at: str) -> bytes:
    """The same request served by OpenAI after Anthropic rate-limited or timed out, sent ``at``
    the failed call's end: the user waits for both."""
    e = orjson.loads(payload)
    new_id = f"{getrandbits(64):016x}{getrandbits(64):016x}"
    output_tokens = max(1, int(e["input_tokens"]) // 10)
    e.update(event_id=new_id, request_id=f"r-{new_id[:20]}", model="gpt-4o", provider="openai", ts=at,
             response_model="gpt-4o-2024-08-06", status="ok", fallback_from="anthropic", finish_reason="stop",
             output_tokens=output_tokens, latency_ms=round(400 + output_tokens * 12.5, 1))  # fmt: skip
    for key in ("error_type", "error_message", "cost_usd"):
        e.pop(key, None)
    return orjson.dumps(e)


def _malformed(rng: random.Random, good: dict[str, object], end: float) -> bytes:
    """One of the ways real producers get it wrong; each must land in the DLQ with a reason.

    ``end``: the scenario's "now". A timestamp from the future is three hours past it, not past
    the wall clock, so one seed gives the same bytes whenever it runs."""
    kind = rng.randrange(8)
    bad = dict(good)
    if kind == 0:
        return orjson.dumps(bad)[: rng.randrange(5, 40)]  # truncated
    if kind == 1:
        bad["input_tokens"] = -rng.randrange(1, 500)
    elif kind == 2:
        bad.pop("model")
    elif kind == 3:
        bad["output_tokens"] = str(bad["output_tokens"])
    elif kind == 4:
        bad["ts"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end + 3 * 3600))
    elif kind == 5:
        return orjson.dumps(bad).replace(b'"feature":"', b'"feature":"\xff\xfe', 1)  # invalid UTF-8
    elif kind == 6:
        bad["cached_input_tokens"] = int(bad["input_tokens"]) + 10  # type: ignore[call-overload]
    else:
        bad["status"] = "exploded"
    return orjson.dumps(bad)


def generate(s: Scenario, batch_size: int = 10_000) -> Iterator[list[bytes]]:
    """Payload batches in event-time order (up to ``late_rate`` stragglers)."""
    rng = random.Random(s.seed)
    weights = [f.weight for f in FEATURES]
    cum_weights = [sum(weights[: i + 1]) for i in range(len(weights))]
    open_convs: dict[str, list[Conversation]] = {f.name: [] for f in FEATURES}
    iso_cache: dict[int, str] = {}
    step = (s.end - s.start) / max(s.events, 1)
    conv_seq = 0
    batch: list[bytes] = []
    recent: list[bytes] = []
    rand = rng.random
    getrandbits = rng.getrandbits
    # standard normals drawn once: indexing a table is 5x cheaper than random.gauss per call
    normals = [rng.gauss() for _ in range(1 << 14)]

    def gauss() -> float:
        return normals[getrandbits(14)]

    total_weight = cum_weights[-1]
    burst: Conversation | None = None  # an agent run in progress: its steps come back to back
    for i in range(s.events):
        t = s.start + i * step + rand() * step
        if burst is not None:
            conv, feature = burst, burst.feature
            t = conv.last_end + 0.05 + 0.4 * rand()  # the next step starts as the previous one returns
            conv.remaining -= 1
            if conv.remaining <= 0:
                burst = None
        else:
            if rand() < s.late_rate:
                t -= 180 + rand() * 600  # arrives 3-13 min late
            conv, feature = None, FEATURES[bisect(cum_weights, rand() * total_weight)]
            convs = open_convs[feature.name]
            if convs and not feature.agent and rand() < 1 - 1 / feature.turns:
                j = rng.randrange(len(convs))
                conv = convs[j]
                conv.remaining -= 1
                stale = t - conv.last_end > 1800  # a conversation idle for 30 min is over; so are its turns
                if conv.remaining <= 0 or stale:  # swap-remove: O(1), the list can hold thousands
                    convs[j] = convs[-1]
                    convs.pop()
                if stale:
                    conv = None
                elif conv.last_end > t:
                    t = conv.last_end + 2.0 + 8.0 * rand()  # the user reads the answer, then types
        if conv is None:
            conv_seq += 1
            r = rand()
            model = feature.models[-1][0]
            acc = 0.0
            for name, share in feature.models:
                acc += share
                if r < acc:
                    model = name
                    break
            cid = f"c-{s.seed:x}-{conv_seq:09x}"
            variant, version = "control", feature.prompt_version
            if feature.name == "support-chat" and rand() < 0.10:
                variant, version = "canary", "v13"
            if feature.name == "search-summarize" and s.incidents and t >= s.prompt_change_at:
                version = "v8"
            turns = 1 if feature.turns <= 1 else max(1, round(rng.expovariate(1 / feature.turns)))
            conv = Conversation(cid, feature, model, variant, version, f"u-{rng.randrange(5000):05d}", turns - 1)
            conv.static = _static_fields(conv, s.incidents and t >= s.snapshot_switch_at)
            if conv.remaining > 0:
                if feature.agent:
                    burst = conv
                else:
                    open_convs[feature.name].append(conv)

        profile = MODELS[conv.model]
        static = conv.static
        if rand() < s.unknown_model_rate:
            static = re.sub(rb'"(response_)?model":"[^"]*"', rb'"\1model":"' + UNKNOWN_MODEL.encode() + b'"', static)
        v8 = conv.prompt_version == "v8"  # the incident: more few-shot examples, twice the output
        input_tokens = max(20, int(exp(feature.log_input + (LN13 if v8 else 0.0) + 0.45 * gauss())))
        log_out = feature.log_output + (LN2 if v8 else 0.0)
        output_tokens = max(1, int(exp(log_out + 0.5 * gauss())))
        cached = 0
        cache_write = 0
        if feature.cache_share and rand() < feature.cache_share:
            cached = int(input_tokens * (0.5 + 0.4 * rand()))
        elif feature.cache_share and profile.provider == "anthropic" and rand() < 0.1:
            cache_write = int(input_tokens * 0.6)
        ttft = exp(profile.log_ttft + 0.35 * gauss())
        latency = ttft + output_tokens / profile.tokens_per_s * 1000 * exp(0.15 * gauss())

        refusal_p = 0.02
        if conv.model == "claude-haiku-4-5" and s.incidents and t >= s.refusal_regression_at:
            refusal_p = 0.18
        if conv.variant == "canary":
            refusal_p *= 4
        refusal = "true" if rand() < refusal_p else "false"
        r = rand()
        tail = ""
        if r < 0.012:
            status, error_type = (
                ("error", "server_error") if r < 0.006 else
                ("timeout", "timeout") if r < 0.009 else
                ("rate_limited", "rate_limit_exceeded")
            )  # fmt: skip
            if status == "timeout":
                latency = 30_000 + rand() * 30_000
            output_tokens = 0
            tail = f',"error_type":"{error_type}","error_message":"{profile.provider} returned {error_type}"'
        else:
            status = "ok"
            tail = ',"finish_reason":"stop"'
            if feature.streaming:
                tail += f',"ttft_ms":{ttft:.1f}'
        conv.last_end = t + latency / 1000
        if feature.tool_rate and rand() < feature.tool_rate:
            tail += (
                ',"tool_calls":["search_kb"]'
                if feature.name == "support-chat"
                else ',"tool_calls":["read_file","run_tests"]'
            )
        if feature.structured:
            tail += ',"schema_valid":true' if rand() > 0.03 else ',"schema_valid":false'
        if feature.name == "code-review" and rand() < 0.3:
            tail += f',"cost_usd":{input_tokens * 2e-6 + output_tokens * 8e-6:.6f}'  # client-priced
        if rand() < 0.05:
            tail += ',"region":"eu-west-1"' if rand() < 0.5 else ',"region":"us-east-1"'  # unknown field

        event_id = f"{getrandbits(64):016x}{getrandbits(64):016x}"
        prompt = f"p-{feature.name}-{int(rand() * feature.distinct_prompts)}"
        payload = (
            (
                f'{{"event_id":"{event_id}","ts":"{_iso(t, iso_cache)}","request_id":"r-{event_id[:20]}",'
                f'"input_tokens":{input_tokens},"output_tokens":{output_tokens},'
                f'"cached_input_tokens":{cached},"cache_write_tokens":{cache_write},"latency_ms":{latency:.1f},'
                f'"status":"{status}","refusal":{refusal},"prompt_hash":"{prompt}","output_chars":{output_tokens * 4}'
            ).encode()
            + static
            + tail.encode()
            + b"}"
        )
        # a malformed payload is what the producer sent; the retry below is of the call itself
        sent = _malformed(rng, orjson.loads(payload), s.end) if rand() < s.malformed_rate else payload
        batch.append(sent)
        if status in ("rate_limited", "timeout") and profile.provider == "anthropic" and rand() < 0.5:
            # the service retried on another provider
            batch.append(_fallback(payload, event_id, getrandbits, _iso(conv.last_end, iso_cache)))
        if status == "ok" and feature.name in FEEDBACK_FEATURES and rand() < s.feedback_rate:
            down = rand() < (0.6 if refusal == "true" else 0.15 if conv.variant == "canary" else 0.1)
            when = _iso(min(t + 30 + rand() * 600, s.end), iso_cache)
            feedback = {
                "kind": "feedback",
                "request_id": f"r-{event_id[:20]}",
                "ts": when,
                "thumbs": "down" if down else "up",
                "user_id": conv.user_id,
                "feature": feature.name,
            }
            if down and rand() < 0.4:
                feedback["comment"] = rng.choice(FLAG_COMMENTS)
            batch.append(orjson.dumps(feedback))  # fmt: skip
        if rand() < s.duplicate_rate and recent:
            batch.append(recent[rng.randrange(len(recent))])  # a client retry re-sends an event
        if i % 97 == 0:
            recent = [*recent[-15:], sent]
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def simulated_judge(requests: list[dict[str, Any]]) -> list[bytes]:
    """Deterministic verdicts for judge requests, as a judge service would publish them.

    A refusal scores low (the demo's refusals are regressions, not policy), an error scores 0,
    ``v8`` gains a little from its extra examples and the ``v13`` canary loses a little besides
    its refusals; the rest is noise fixed by the request id, so reruns score identically.
    """
    out = []
    for r in requests:
        noise = xxhash.xxh64_intdigest(r["request_id"].encode()) / 2**64 - 0.5  # uniform in [-0.5, 0.5)
        prompt_version = r.get("release", {}).get("prompt_version")
        if r.get("status", "ok") != "ok":
            score = 0.0
        elif r.get("refusal"):
            score = 0.15 + 0.2 * noise
        else:
            score = JUDGE_QUALITY.get(r.get("feature", ""), 0.75) + 0.24 * noise
            score += 0.03 if prompt_version == "v8" else -0.04 if prompt_version == "v13" else 0.0
        verdict = {
            "kind": "judge_result",
            "request_id": r["request_id"],
            "rubric": SIM_RUBRIC,
            "score": round(min(1.0, max(0.0, score)), 3),
            "judge_model": SIM_JUDGE_MODEL,
            "ts": r["ts"],
            "rationale": "simulated verdict (llmpulse demo)",
        }
        out.append(orjson.dumps(verdict))
    return out


def produce_into(queue: Any, scenario: Scenario, batch_size: int = 10_000) -> None:
    """Child-process entry point: generation runs on the other core while the pipeline works."""
    try:
        for batch in generate(scenario, batch_size):
            queue.put(batch)
    finally:
        queue.put(None)
