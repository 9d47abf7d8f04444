"""Rubric files and judge settings: the packaged rubric loads, scales normalise, errors name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.judge import JudgeSettings, RubricError, Scale, default_rubric, load_rubric, rubric_for

GOOD = """\
name: support-tone
instructions: Grade the tone of the answer.
criteria:
  polite: Courteous, never curt.
scale: {min: 1, max: 5, labels: {1: rude, 5: exemplary}}
judge_model: gpt-4.1-mini
temperature: 0.2
max_output_tokens: 200
examples:
  - {prompt: hi, output: "hello! how can I help?", score: 5, rationale: warm}
"""


def write(tmp_path: Path, text: str, name: str = "rubric.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(RubricError) as info:
        load_rubric(path)
    message = str(info.value)
    assert message.startswith(str(path)), message  # every error names the file
    return message


def test_packaged_rubric_is_the_default() -> None:
    rubric = default_rubric()
    assert rubric.name == "helpfulness"
    assert set(rubric.criteria) == {"helpful", "correct", "grounded", "refusal", "tone"}
    assert (rubric.scale.min, rubric.scale.max, rubric.scale.integer) == (1, 5, True)
    assert sorted(rubric.scale.labels) == [1, 2, 3, 4, 5]
    assert [e.score for e in rubric.examples] == [5, 1]
    assert rubric.judge_model == "gpt-4o-mini"
    assert rubric.temperature == 0.0
    assert rubric_for(JudgeSettings()) == rubric


def test_rubric_file_loads(tmp_path: Path) -> None:
    rubric = load_rubric(write(tmp_path, GOOD))
    assert rubric.name == "support-tone"
    assert rubric.criteria == {"polite": "Courteous, never curt."}
    assert rubric.scale.labels == {1: "rude", 5: "exemplary"}
    assert rubric.examples[0].output == "hello! how can I help?"
    assert (rubric.judge_model, rubric.temperature, rubric.max_output_tokens) == ("gpt-4.1-mini", 0.2, 200)
    assert rubric_for(JudgeSettings(rubric_path=tmp_path / "rubric.yaml")) == rubric


def test_integer_scale_normalises_to_unit_interval() -> None:
    scale = Scale(min=1, max=5)
    assert [scale.normalise(p) for p in (1, 2, 3, 4, 5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert scale.problem(4) is None
    assert scale.problem(6) == "score 6 is outside the scale 1..5"
    assert scale.problem(0) == "score 0 is outside the scale 1..5"
    assert scale.problem(3.5) == "score 3.5 is not a whole point on the scale 1..5"
    assert scale.describe() == "a whole number from 1 to 5"


def test_scale_shorthand_and_continuous_scales(tmp_path: Path) -> None:
    assert Scale.model_validate("1..10").normalise(10) == 1.0
    assert Scale.model_validate("0-1").problem(0.5) == "score 0.5 is not a whole point on the scale 0..1"  # pass/fail
    unit = Scale(min=0, max=1, integer=False)
    assert unit.problem(0.37) is None
    assert unit.normalise(0.37) == 0.37
    assert unit.describe() == "a number from 0 to 1"
    rubric = load_rubric(write(tmp_path, "name: x\ninstructions: y\nscale: 1..3\n"))
    assert (rubric.scale.min, rubric.scale.max) == (1, 3)


def test_missing_and_unreadable_files_say_so(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RubricError, match=r"nope\.yaml: cannot read rubric file"):
        load_rubric(missing)
    assert "line 2, column" in error_for(tmp_path, "name: x\n  instructions: [unclosed\n")
    assert error_for(tmp_path, "- a\n- b\n").endswith(
        "expected a mapping with name, instructions and scale at the top level, got list"
    )
    assert error_for(tmp_path, "").endswith("got nothing")


HEAD = "name: x\ninstructions: y\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\n", "key `instructions`: required key is missing"),
        ("name: has space\ninstructions: y\n", "key `name`: String should match pattern"),
        (HEAD + "scale: {min: 1, maxx: 5}\n", "key `scale.maxx`: unknown key"),
        (HEAD + "scale: {min: 5, max: 1}\n", "key `scale`: max (1) must be above min (5)"),
        (HEAD + "scale: {min: 1, max: 4.5}\n", "key `scale`: an integer scale needs whole-number"),
        (HEAD + "scale: {labels: {9: great}}\n", "key `scale`: label for 9 is outside the scale 1..5"),
        (HEAD + "scale: lots\n", "key `scale`: expected `MIN..MAX` such as `1..5`"),
        (HEAD + "temperature: 3\n", "key `temperature`: Input should be less than or equal to 2 (got 3)"),
        (HEAD + "rubric: z\n", "key `rubric`: unknown key"),
        (
            HEAD + "examples:\n  - {prompt: a, output: b, score: 4}\n  - {prompt: a, output: b, score: 7}\n",
            "key `examples`: example #2: score 7 is outside the scale 1..5",
        ),
        (HEAD + "examples:\n  - {output: b, score: 4}\n", "example #1: key `prompt`: required key is missing"),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path: Path, text: str, expected: str) -> None:
    message = error_for(tmp_path, text)
    assert expected in message, message


def test_judge_settings_defaults_and_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    s = JudgeSettings()
    assert (s.base_url, s.api_key_env, s.model, s.rubric_path) == (
        "https://api.openai.com/v1", "OPENAI_API_KEY", None, None,
    )  # fmt: skip
    assert (s.concurrency, s.timeout_s, s.max_retries, s.group_id) == (8, 60.0, 5, "llmpulse-judge")
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    s = JudgeSettings(base_url="http://localhost:8000/v1/", api_key_env="JUDGE_KEY", timeout_s="90s")
    assert s.base_url == "http://localhost:8000/v1"
    assert s.timeout_s == 90.0
    assert s.api_key() is None
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    assert s.api_key() == "sk-test"
    assert "sk-test" not in repr(s) and "sk-test" not in s.model_dump_json()


def test_judge_settings_refuse_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="an API key does not belong in a config file") as info:
        JudgeSettings.model_validate({"api_key": "sk-live-123"})
    assert "sk-live-123" not in str(info.value)  # errors echo their input: the key is redacted first
    assert info.value.errors()[0]["loc"] == ("api_key",)
    with pytest.raises(ValidationError, match="expected an http"):
        JudgeSettings(base_url="localhost:8000/v1")
    with pytest.raises(ValidationError, match="api_key_env"):
        JudgeSettings(api_key_env="not a name")
    with pytest.raises(ValidationError, match="backoff_max_s must not be below backoff_initial_s"):
        JudgeSettings(backoff_initial_s=10, backoff_max_s=1)
    with pytest.raises(ValidationError, match="concurrency"):
        JudgeSettings(concurrency=0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        JudgeSettings.model_validate({"modle": "gpt-4o"})
