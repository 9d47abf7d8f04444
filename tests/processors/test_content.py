from __future__ import annotations

import msgspec

from processors.content import ContentPolicy, prompt_hash, redact
from schemas.wire import WireCall
from tests.conftest import payload

DECODE = msgspec.json.Decoder(WireCall).decode


def test_content_is_dropped_by_default_but_hashed_and_measured() -> None:
    e = DECODE(payload(prompt="What is my balance?", output="€12.40"))
    ContentPolicy(capture=False)([e])
    assert e.prompt is None and e.output is None
    assert e.prompt_hash == prompt_hash("What is my balance?")
    assert len(e.prompt_hash) == 32
    assert e.output_chars == 6


def test_client_prompt_hash_is_kept() -> None:
    e = DECODE(payload(prompt="hi", prompt_hash="client-hash"))
    ContentPolicy(capture=False)([e])
    assert e.prompt_hash == "client-hash"


def test_capture_redacts_pii_and_keys() -> None:
    text = "mail jane.doe@example.com or +1 (415) 555-0100, key sk-proj-abcdefghijklmnop1234 ok"
    e = DECODE(payload(prompt=text, output="call 030 1234567"))
    ContentPolicy(capture=True)([e])
    assert e.prompt == "mail [email] or [phone], key [api_key] ok"
    assert e.output == "call [phone]"
    assert e.prompt_hash == prompt_hash(text)  # the hash is of what the model saw


def test_redaction_leaves_ordinary_numbers() -> None:
    assert redact("version 4.5 costs 12 dollars on 2026-11-01") == "version 4.5 costs 12 dollars on 2026-11-01"
