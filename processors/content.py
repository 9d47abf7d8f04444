"""ContentPolicy: hash prompts, measure outputs, and keep raw text only when asked to.

Prompts and outputs are the most sensitive thing llmpulse sees. By default they are reduced
to ``prompt_hash`` (xxh3-128 of the UTF-8 prompt, good enough to find repeated prompts for
the cache-opportunity view) and ``output_chars``, and the text itself is dropped before
anything is stored. With capture enabled the text is kept after redacting e-mail addresses,
phone numbers and API keys.
"""

from __future__ import annotations

import re

import xxhash

from schemas.wire import WireCall

_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[email]"),
    (
        re.compile(
            r"\b(?:sk|pk|rk)-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{16,}"
            r"|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bAIza[0-9A-Za-z_-]{35}\b"
            r"|\bxox[abpr]-[A-Za-z0-9-]{10,}"
        ),
        "[api_key]",
    ),
    # phone numbers: a digit run of 9+ characters with separators, but not ISO dates or times
    (re.compile(r"(?<![\w.])(?!\d{4}-\d{2}-\d{2}\b)\+?\d[\d\s().-]{7,}\d(?![\w.:])"), "[phone]"),
)


def prompt_hash(prompt: str) -> str:
    """The documented prompt fingerprint; the SDK uses the same function."""
    return xxhash.xxh3_128_hexdigest(prompt.encode("utf-8", "surrogatepass"))


def redact(text: str) -> str:
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class ContentPolicy:
    def __init__(self, *, capture: bool, redact_pii: bool = True) -> None:
        self.capture = capture
        self.redact_pii = redact_pii

    def __call__(self, events: list[WireCall]) -> None:
        """Mutates the batch in place: the events are this step's to change."""
        capture = self.capture
        scrub = self.redact_pii
        for e in events:
            prompt = e.prompt
            output = e.output
            if prompt is None and output is None:
                continue
            if prompt is not None and e.prompt_hash is None:
                e.prompt_hash = prompt_hash(prompt)
            if output is not None and e.output_chars is None:
                e.output_chars = len(output)
            if not capture:
                e.prompt = None
                e.output = None
            elif scrub:
                if prompt is not None:
                    e.prompt = redact(prompt)
                if output is not None:
                    e.output = redact(output)
