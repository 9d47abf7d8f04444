"""Numbers in tables show every significant digit the value has, and no noise."""

from __future__ import annotations

import pytest

from llmpulse.console import fmt


@pytest.mark.parametrize(
    "value, shown",
    [
        (0.265, "0.265"),  # round(x, 3) was re-rounded to 0.27
        (0.075, "0.075"),  # gpt-4o-mini's cached input price showed as 0.07
        (1.005, "1.005"),
        (1e-9, "1e-09"),  # was 0.000000
        (0.1 + 0.2, "0.3"),
        (2.0, "2"),
        (-0.0, "0"),
        (-3.25, "-3.25"),
        (123.456789, "123.4568"),
        (1234567.891, "1,234,568"),
        (0.00012345678, "0.0001234568"),
        (1234, "1,234"),
        (None, "—"),
        ([0.5, 2.0], "[0.5, 2]"),
    ],
)
def test_fmt_keeps_significant_digits(value: object, shown: str) -> None:
    assert fmt(value) == shown
