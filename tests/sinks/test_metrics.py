"""The GenAI histograms are filled per batch: the bucket counts and sums must be what per-event
observation would give, with bounded labels."""

from __future__ import annotations

from typing import Any

from llmpulse.runtime import pipeline_options
from processors.chain import CallPipeline
from schemas.config import load_settings
from schemas.prices import builtin_price_table
from sinks.columns import batch_columns
from sinks.metrics import DURATION_BUCKETS, OTHER, TOKEN_BUCKETS, TTFT_BUCKETS, PipelineMetrics
from tests.conftest import NOW, batch, payload


def _series(metrics: PipelineMetrics, name: str) -> dict[tuple[tuple[str, str], ...], dict[str, float]]:
    """label set → {"le=...": cumulative count, "count": n, "sum": s} from the registry's own exposition."""
    out: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
    for family in metrics.registry.collect():
        if family.name != name:
            continue
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            key = f"le={s.labels['le']}" if "le" in s.labels else s.name.rsplit("_", 1)[1]
            out.setdefault(labels, {})[key] = s.value
    return out


def _expected(values: list[float], buckets: tuple[float, ...]) -> dict[str, float]:
    want = {f"le={b}": float(sum(1 for v in values if v <= b)) for b in buckets}
    want["le=+Inf"] = want["count"] = float(len(values))
    want["sum"] = sum(values)
    return want


def test_batch_histograms_equal_per_event_observation_with_bounded_labels() -> None:
    calls: list[dict[str, Any]] = [
        # exactly on bucket boundaries (160 ms, 1.28 s, 16 tokens) and between them
        {"model": "gpt-4o", "feature": "chat", "latency_ms": 160.0, "ttft_ms": 10.0, "input_tokens": 16},
        {"model": "gpt-4o", "feature": "chat", "latency_ms": 1280.0, "ttft_ms": None, "input_tokens": 17},
        {"model": "gpt-4o", "feature": "chat", "latency_ms": 33.3, "ttft_ms": 250.0, "input_tokens": 1},
        {"model": "gpt-4o-mini", "feature": "chat", "latency_ms": 5120.0, "ttft_ms": 1.0, "input_tokens": 4096},
    ] + [  # more models than the label bound: they fold into _other
        {"model": f"m-{i}", "feature": "chat", "latency_ms": 20.0, "ttft_ms": None, "input_tokens": 3}
        for i in range(60)
    ]  # fmt: skip
    pipe = CallPipeline(builtin_price_table(), pipeline_options(load_settings(None, {})))
    out = pipe.process(batch([payload(output_tokens=5, **c) for c in calls]), NOW)
    assert len(out.events) == len(calls)
    metrics = PipelineMetrics()
    metrics.observe(out, 0.01)

    def key(model: str, **extra: str) -> tuple[tuple[str, str], ...]:
        labels = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai" if model.startswith("gpt") else "",
                  "gen_ai_request_model": model, "llmpulse_feature": "chat", **extra}  # fmt: skip
        return tuple(sorted(labels.items()))

    duration = _series(metrics, "gen_ai_client_operation_duration_seconds")
    ttft = _series(metrics, "gen_ai_server_time_to_first_token_seconds")
    tokens = _series(metrics, "gen_ai_client_token_usage")
    assert duration[key("gpt-4o")] == _expected([0.16, 1.28, 0.0333], DURATION_BUCKETS)
    assert duration[key("gpt-4o-mini")] == _expected([5.12], DURATION_BUCKETS)
    assert ttft[key("gpt-4o")] == _expected([0.01, 0.25], TTFT_BUCKETS)  # a call without TTFT is not observed
    assert tokens[key("gpt-4o", gen_ai_token_type="input")] == _expected([16, 17, 1], TOKEN_BUCKETS)
    assert tokens[key("gpt-4o", gen_ai_token_type="output")] == _expected([5, 5, 5], TOKEN_BUCKETS)
    # 50 model labels at most: the first 48 unknown models get their own, the other 12 fold together
    models = {dict(labels)["gen_ai_request_model"] for labels in duration}
    assert len(models) == 51 and OTHER in models
    assert duration[key(OTHER)]["count"] == 12.0
    assert sum(s["count"] for s in duration.values()) == len(calls)


def test_a_batch_without_providers_or_ttft_is_observed_under_empty_labels() -> None:
    """All-NULL columns are left out of the batch's table (the column default fills them): the
    histograms must still group those calls, under an empty provider, and skip the absent TTFT."""
    calls = [{"model": "in-house-7b", "feature": "tagging", "latency_ms": ms, "input_tokens": 40} for ms in (5.0, 7.5)]
    pipe = CallPipeline(builtin_price_table(), pipeline_options(load_settings(None, {})))
    out = pipe.process(batch([payload(output_tokens=1, **c) for c in calls]), NOW)
    assert "provider" not in batch_columns(out).column_names and "ttft_ms" not in batch_columns(out).column_names
    metrics = PipelineMetrics()
    metrics.observe(out, 0.01)
    labels = (("gen_ai_operation_name", "chat"), ("gen_ai_provider_name", ""),
              ("gen_ai_request_model", "in-house-7b"), ("llmpulse_feature", "tagging"))  # fmt: skip
    assert _series(metrics, "gen_ai_client_operation_duration_seconds") == {
        labels: _expected([0.005, 0.0075], DURATION_BUCKETS)
    }
    assert _series(metrics, "gen_ai_server_time_to_first_token_seconds") == {}


def test_bounded_labels_go_to_the_models_seen_first() -> None:
    """The label bound is first come, first served, call by call, whatever the models' providers."""
    pipe = CallPipeline(builtin_price_table(), pipeline_options(load_settings(None, {})))
    metrics = PipelineMetrics()
    filler = [payload(model=f"m-{i}", feature="chat") for i in range(49)]
    metrics.observe(pipe.process(batch(filler), NOW), 0.01)
    # one label left: an unpriced model without a provider comes first, then a priced OpenAI one
    late = [payload(model="zeta-local", feature="chat"), payload(model="gpt-4o", feature="chat")]
    metrics.observe(pipe.process(batch(late, first=100), NOW), 0.01)
    models = {dict(labels)["gen_ai_request_model"] for labels in _series(metrics, "gen_ai_client_token_usage")}
    assert "zeta-local" in models and "gpt-4o" not in models and OTHER in models
