"""Export the JSON Schemas of the event models: ``python -m schemas.export``.

The exported files are committed (``schemas/jsonschema/``) so producers in any language can
validate against them; ``tests/schemas/test_events.py`` fails when they are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.events import CallEvent, FeedbackEvent, JudgeResult
from schemas.limits import SCHEMA_VERSION

OUT_DIR = Path(__file__).parent / "jsonschema"
MODELS: dict[str, type[BaseModel]] = {
    "call_event": CallEvent,
    "feedback_event": FeedbackEvent,
    "judge_result": JudgeResult,
}


def schema_of(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = MODELS[name].model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://llmpulse.dev/schemas/{name}.v{SCHEMA_VERSION}.json"
    return schema


def render(name: str) -> str:
    return json.dumps(schema_of(name), indent=2, sort_keys=True) + "\n"


def main() -> None:
    OUT_DIR.mkdir(exist_ok=True)
    for name in MODELS:
        path = OUT_DIR / f"{name}.schema.json"
        path.write_text(render(name))
        sys.stdout.write(f"wrote {path}\n")


if __name__ == "__main__":
    main()
