"""The LLM judge's configuration: a rubric file (what to judge and how) and the judge's settings.

A rubric is YAML so the people who own quality can change it without touching code; it is
validated with pydantic and every error names the file, the key and what was expected.
``JudgeSettings`` says where the judge model is served (any OpenAI-compatible API) and how hard
to push it. The API key is never part of either: the settings only name the environment
variable that holds it, so a config file can be committed and printed.

Change a rubric's ``name`` when you change what its scores mean: scores are stored and compared
by (rubric, judge model), and one name must not mix two yardsticks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from schemas.durations import Duration
from schemas.files import read_yaml

RUBRIC_NAME_PATTERN = r"^[A-Za-z0-9_.:-]+$"
DEFAULT_RUBRIC = "data/rubrics/helpfulness.yaml"
"""The packaged rubric (relative to the ``schemas`` package)."""

_SCALE_SHORTHAND = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:\.\.|-|–)\s*(-?\d+(?:\.\d+)?)\s*$")


def _fmt(value: float) -> str:
    return f"{value:g}"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Scale(_Model):
    """What the judge answers with, and how that becomes a 0..1 score.

    Integer point scales (1..5) are what judges are most consistent on; ``integer: false`` with
    ``min: 0, max: 1`` takes a score that is already 0..1. Either way the stored score is
    ``(raw - min) / (max - min)``, so rubrics with different scales compare.
    """

    min: float = 1
    max: float = 5
    integer: bool = True
    """The judge must answer a whole number of points."""
    labels: dict[int, str] = Field(default_factory=dict)
    """What each point means, shown to the judge (anchors make scores reproducible)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``scale: 1..5`` (or ``1-5``) is ``scale: {min: 1, max: 5}``."""
        if isinstance(value, str):
            match = _SCALE_SHORTHAND.match(value)
            if not match:
                raise ValueError(f"expected `MIN..MAX` such as `1..5`, or a mapping with min and max (got {value!r})")
            return {"min": float(match.group(1)), "max": float(match.group(2))}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Scale:
        if self.max <= self.min:
            raise ValueError(f"max ({_fmt(self.max)}) must be above min ({_fmt(self.min)})")
        if self.integer and not (float(self.min).is_integer() and float(self.max).is_integer()):
            raise ValueError("an integer scale needs whole-number min and max (or set `integer: false`)")
        for point in self.labels:
            if not self.min <= point <= self.max:
                raise ValueError(f"label for {point} is outside the scale {self.range_text}")
        return self

    @property
    def range_text(self) -> str:
        return f"{_fmt(self.min)}..{_fmt(self.max)}"

    def describe(self) -> str:
        """How the prompt asks for the score."""
        kind = "a whole number" if self.integer else "a number"
        return f"{kind} from {_fmt(self.min)} to {_fmt(self.max)}"

    def problem(self, raw: float) -> str | None:
        """Why ``raw`` is not an answer on this scale; None when it is."""
        if not self.min <= raw <= self.max:
            return f"score {_fmt(raw)} is outside the scale {self.range_text}"
        if self.integer and not float(raw).is_integer():
            return f"score {_fmt(raw)} is not a whole point on the scale {self.range_text}"
        return None

    def normalise(self, raw: float) -> float:
        """The raw answer mapped onto 0..1 (``raw`` must be on the scale)."""
        return (raw - self.min) / (self.max - self.min)


class Example(_Model):
    """A worked example shown to the judge before the exchange (few-shot calibration)."""

    prompt: Annotated[str, Field(min_length=1)]
    output: str
    score: float
    rationale: str = ""


class Rubric(_Model):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=RUBRIC_NAME_PATTERN)]
    """Stored with every score; change it when the meaning of the scores changes."""
    description: str = ""
    instructions: Annotated[str, Field(min_length=1)]
    """What the judge looks for: the rubric's text, shown as the system prompt."""
    criteria: dict[str, str] = Field(default_factory=dict)
    """Named criteria (name → what it means), listed under the instructions."""
    scale: Scale = Field(default_factory=Scale)
    judge_model: Annotated[str, Field(min_length=1, max_length=128)] = "gpt-4o-mini"
    """The model that judges unless ``judge.model`` in the config names another."""
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    max_output_tokens: Annotated[int, Field(ge=16, le=32_768)] = 300
    examples: list[Example] = Field(default_factory=list)

    @field_validator("examples")
    @classmethod
    def _examples_on_scale(cls, examples: list[Example], info: ValidationInfo) -> list[Example]:
        scale = info.data.get("scale")
        if isinstance(scale, Scale):
            for i, example in enumerate(examples, start=1):
                problem = scale.problem(example.score)
                if problem is not None:
                    raise ValueError(f"example #{i}: {problem}")
        return examples


class JudgeSettings(_Model):
    """Where the judge model is served and how hard to push it (the config file's ``judge:``)."""

    base_url: str = "https://api.openai.com/v1"
    """An OpenAI-compatible API (``POST {base_url}/chat/completions``): OpenAI, vLLM, LiteLLM, Ollama..."""
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "OPENAI_API_KEY"
    """The environment variable that holds the API key; unset or empty: no Authorization header."""
    model: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    """Overrides the rubric's ``judge_model``."""
    rubric_path: Path | None = None
    """Rubric YAML; default: the packaged helpfulness rubric."""
    concurrency: Annotated[int, Field(ge=1, le=256)] = 8
    """Judge requests in flight at once."""
    timeout_s: Annotated[Duration, Field(gt=0, le=600)] = 60.0
    """One attempt, connect to last byte."""
    max_retries: Annotated[int, Field(ge=0, le=20)] = 5
    """Attempts after the first, on connection errors, timeouts, 429 and 5xx; never on other 4xx."""
    backoff_initial_s: Annotated[Duration, Field(ge=0, le=3600)] = 1.0
    backoff_max_s: Annotated[Duration, Field(ge=0, le=3600)] = 60.0
    retry_after_max_s: Annotated[Duration, Field(ge=0, le=3600)] = 300.0
    """A Retry-After header is honoured up to this long."""
    group_id: Annotated[str, Field(min_length=1)] = "llmpulse-judge"
    """Kafka consumer group of ``llmpulse judge`` on the judge requests topic."""
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 100
    """Requests scored together; their offsets are committed once every verdict is published."""
    max_content_chars: Annotated[int, Field(ge=500, le=2_000_000)] = 20_000
    """Prompt and output are each cut to this many characters (middle elided) before judging."""

    api_key_in_config: Annotated[None, Field(alias="api_key", exclude=True, repr=False)] = None
    """Refused: a key put here by mistake fails validation (redacted, so the error cannot leak it)."""

    @model_validator(mode="before")
    @classmethod
    def _redact_key(cls, value: Any) -> Any:
        """Errors echo their input; a key pasted into the config must not reach a log that way."""
        if isinstance(value, dict):
            return {k: "<redacted>" if k in ("api_key", "api_key_in_config") and v is not None else v
                    for k, v in value.items()}  # fmt: skip
        return value

    @field_validator("api_key_in_config", mode="before")
    @classmethod
    def _no_key_in_config(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(
                "an API key does not belong in a config file: put it in the environment variable "
                "named by `api_key_env` (default OPENAI_API_KEY)"
            )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http(s) URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1")
        return value.rstrip("/")

    @field_validator("backoff_max_s")
    @classmethod
    def _backoff_order(cls, value: float, info: ValidationInfo) -> float:
        if value < info.data.get("backoff_initial_s", 0.0):
            raise ValueError("backoff_max_s must not be below backoff_initial_s")
        return value

    def api_key(self) -> str | None:
        """The key from the environment, read when needed (never stored, never printed)."""
        return os.environ.get(self.api_key_env) or None


class RubricError(ValueError):
    """A rubric that cannot be used; the message names the file and the key."""


def parse_rubric(data: Any, source: str) -> Rubric:
    if not isinstance(data, dict):
        got = "nothing" if data is None else type(data).__name__
        raise RubricError(f"{source}: expected a mapping with name, instructions and scale at the top level, got {got}")
    try:
        return Rubric.model_validate(data)
    except ValidationError as exc:
        raise RubricError(_describe(exc, source)) from exc


def load_rubric(path: Path) -> Rubric:
    return parse_rubric(read_yaml(path, "rubric file", RubricError), str(path))


def default_rubric() -> Rubric:
    from importlib import resources

    text = resources.files("schemas").joinpath(DEFAULT_RUBRIC).read_text(encoding="utf-8")
    return parse_rubric(yaml.safe_load(text), f"schemas/{DEFAULT_RUBRIC} (built-in)")


def rubric_for(judge: JudgeSettings) -> Rubric:
    """``judge.rubric_path``, else the packaged rubric."""
    return load_rubric(judge.rubric_path) if judge.rubric_path is not None else default_rubric()


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not str(p).startswith("function-")]
        where = ""
        if len(loc) >= 2 and loc[0] == "examples" and isinstance(loc[1], int):
            where = f"example #{loc[1] + 1}: "
            loc = loc[2:]
        key = ".".join(str(p) for p in loc) or "(the rubric)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{source}: {where}key `{key}`: {msg}")
    return "\n".join(lines)
