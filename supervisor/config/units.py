"""Strict parsing of durations (``"250ms"``, ``"1m30s"``) and sizes (``"512MiB"``).

Rules (documented in docs/CONFIG.md):

* A TOML number is taken in base units: seconds for durations, bytes for sizes.
* A string must carry a unit. ``"30"`` is rejected so a forgotten unit never
  silently means seconds (or bytes) when the author meant minutes.
* Nothing negative, no spaces, no words (``"30 seconds"`` is an error).

Errors are ``ValueError`` with a message fit to end a one-line config error.
"""

from __future__ import annotations

import math
import re

DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([A-Za-z]+)")

DURATION_HINT = "expected a number with a unit ms, s, m or h, e.g. '500ms', '30s', '5m', '1m30s'"
SIZE_HINT = "expected a number with a unit B, kB, MB, GB, KiB, MiB, GiB, e.g. '512MiB'"


def _unit_text(value: object, kind: str, hint: str) -> str:
    """``value`` as a non-empty, non-negative string, else the ``ValueError`` both parsers raise."""
    if not isinstance(value, str):
        raise ValueError(f"invalid {kind} {value!r}: {hint}")
    if value == "":
        raise ValueError(f"empty {kind}: {hint}")
    if value.startswith("-"):
        raise ValueError(f"invalid {kind} {value!r}: must not be negative")
    return value


def parse_duration(value: object) -> float:
    """Seconds as a float from ``"250ms"``, ``"1.5s"``, ``"5m"``, ``"1h30m"`` or a number.

    :raises ValueError: on anything else (empty, negative, no unit, unknown unit).
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: {DURATION_HINT}")
    if isinstance(value, int | float):
        seconds = float(value)
        if math.isnan(seconds) or math.isinf(seconds):
            raise ValueError(f"invalid duration {value!r}: must be finite")
        if seconds < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return seconds
    value = _unit_text(value, "duration", DURATION_HINT)
    if not _DURATION_FULL.fullmatch(value):
        if re.fullmatch(r"\d+(?:\.\d+)?", value):
            raise ValueError(f"invalid duration {value!r}: missing unit, e.g. '{value}s'")
        raise ValueError(f"invalid duration {value!r}: {DURATION_HINT}")
    total = 0.0
    for number, unit in _DURATION_PART.findall(value):
        total += float(number) * DURATION_UNITS[unit]
    return total


def parse_size(value: object) -> int:
    """Bytes as an int from ``"512MiB"``, ``"100MB"``, ``"1.5GiB"`` or an integer.

    :raises ValueError: on anything else (floats without unit, unknown units,
        negative values, fractions of a byte).
    """
    if isinstance(value, bool | float):
        raise ValueError(f"invalid size {value!r}: {SIZE_HINT}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    value = _unit_text(value, "size", SIZE_HINT)
    match = _SIZE.fullmatch(value)
    if match is None:
        if re.fullmatch(r"\d+", value):
            raise ValueError(f"invalid size {value!r}: missing unit, e.g. '{value}B'")
        raise ValueError(f"invalid size {value!r}: {SIZE_HINT}")
    number, unit = match.groups()
    if unit not in SIZE_UNITS:
        raise ValueError(f"invalid size {value!r}: unknown unit {unit!r}; {SIZE_HINT}")
    total = float(number) * SIZE_UNITS[unit]
    if total != int(total):
        raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
    return int(total)


def format_duration(seconds: float) -> str:
    """Short human form for plan output: ``0.25`` -> ``"250ms"``, ``90`` -> ``"1m30s"``."""
    if seconds < 1 and seconds != 0:
        ms = seconds * 1000
        return f"{ms:g}ms"
    if seconds < 60 or seconds != int(seconds):
        return f"{seconds:g}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if secs:
        out += f"{secs}s"
    return out


def format_size(size: int) -> str:
    """Short human form for plan output: ``536870912`` -> ``"512MiB"``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = SIZE_UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
