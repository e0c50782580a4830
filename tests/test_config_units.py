"""Strict duration and size parsing (supervisor.config.units)."""

from __future__ import annotations

import pytest

from supervisor.config.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("0s", 0.0),
        (10, 10.0),
        (0.5, 0.5),
    ],
)
def test_durations_accepted(text: object, seconds: float) -> None:
    """Unit strings and bare TOML numbers (seconds) parse to float seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("30 seconds", "invalid duration '30 seconds': expected a number with a unit"),
        ("-1s", "invalid duration '-1s': must not be negative"),
        ("", "empty duration"),
        ("30", "invalid duration '30': missing unit, e.g. '30s'"),
        ("5M", "invalid duration '5M'"),
        (" 5s", "invalid duration ' 5s'"),
        ("1d", "invalid duration '1d'"),
        (-3, "invalid duration -3: must not be negative"),
        (True, "invalid duration True"),
        (float("nan"), "must be finite"),
        ([1], "invalid duration [1]"),
    ],
)
def test_durations_rejected(text: object, message: str) -> None:
    """Anything that is not a non-negative number with a known unit is refused."""
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * 1024**2),
        ("1GiB", 1024**3),
        ("100MB", 100_000_000),
        ("64KiB", 65536),
        ("1.5KiB", 1536),
        ("10B", 10),
        (4096, 4096),
    ],
)
def test_sizes_accepted(text: object, size: int) -> None:
    """Binary and decimal units, and bare TOML integers (bytes), parse to int bytes."""
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("512mb", "unknown unit 'mb'"),
        ("1 GiB", "invalid size '1 GiB'"),
        ("1024", "missing unit, e.g. '1024B'"),
        ("-1MiB", "must not be negative"),
        ("0.5B", "not a whole number of bytes"),
        ("", "empty size"),
        (1.5, "invalid size 1.5"),
        (-1, "must not be negative"),
        (False, "invalid size False"),
    ],
)
def test_sizes_rejected(text: object, message: str) -> None:
    """Unknown units, spaces, fractions of a byte and negatives are refused."""
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert message in str(info.value)


def test_formatting_round_trips_for_plan_output() -> None:
    """The plan printer shows values the way a user would write them."""
    assert format_duration(0.25) == "250ms"
    assert format_duration(90) == "1m30s"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(3600) == "1h"
    assert format_duration(0) == "0s"
    assert format_size(512 * 1024**2) == "512MiB"
    assert format_size(1000) == "1000B"
    for text in ("250ms", "1m30s", "1h", "45s"):
        assert format_duration(parse_duration(text)) == text
