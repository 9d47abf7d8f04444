"""How events get in: producer SDK, Kafka source, HTTP and OTLP receivers, file replay, synthetic traffic.

Importing ``ingest`` must stay cheap and need only the base install (pydantic, orjson,
aiokafka, xxhash): services import the SDK from here. So the package imports nothing itself;
the SDK's names resolve on first access (PEP 562), and the pipeline-side modules (Kafka
source, replay, synthetic traffic) are only ever imported by their full name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.openai_instrument import instrument_openai
    from ingest.sdk import (
        CallbackTransport,
        KafkaTransport,
        Telemetry,
        TrackedCall,
        Transport,
        assign_variant,
        bucket,
        classify_error,
        prompt_hash,
    )
    from ingest.usage import anthropic_usage, gemini_usage, openai_usage

_LAZY: dict[str, str] = {
    "Telemetry": "ingest.sdk",
    "TrackedCall": "ingest.sdk",
    "Transport": "ingest.sdk",
    "KafkaTransport": "ingest.sdk",
    "CallbackTransport": "ingest.sdk",
    "assign_variant": "ingest.sdk",
    "bucket": "ingest.sdk",
    "classify_error": "ingest.sdk",
    "prompt_hash": "ingest.sdk",
    "instrument_openai": "ingest.openai_instrument",
    "anthropic_usage": "ingest.usage",
    "gemini_usage": "ingest.usage",
    "openai_usage": "ingest.usage",
}

__all__ = [
    "CallbackTransport",
    "KafkaTransport",
    "Telemetry",
    "TrackedCall",
    "Transport",
    "anthropic_usage",
    "assign_variant",
    "bucket",
    "classify_error",
    "gemini_usage",
    "instrument_openai",
    "openai_usage",
    "prompt_hash",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ingest' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
