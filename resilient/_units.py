"""Parsing of human-friendly sizes ("12.7GB") and durations ("5min")."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DURATION_UNITS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$", re.ASCII)


def parse_size(value: str | int | float, *, name: str = "size") -> int:
    """Bytes in ``value``: an int (bytes) or a string such as ``"12.7GB"`` or ``"512MiB"``."""
    if isinstance(value, bool):
        raise ValueError(f"Invalid value for `{name}`. Received: {name}={value!r}. Expected bytes or a string like '12.7GB'.")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 1:
            raise ValueError(f"Invalid value for `{name}`. Received: {name}={value!r}. Expected a positive size of at least 1 byte.")
        return int(value)
    match = _NUMBER_UNIT.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise ValueError(
            f"Invalid value for `{name}`. Received: {name}={value!r}. "
            "Expected a positive size of at least 1 byte, such as '12.7GB', '512MiB' or a number of bytes."
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: str | int | float, *, name: str = "duration") -> float:
    """Seconds in ``value``: a number (seconds) or a string such as ``"5min"`` or ``"90s"``."""
    if isinstance(value, bool):
        raise ValueError(f"Invalid value for `{name}`. Received: {name}={value!r}. Expected seconds or a string like '5min'.")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"Invalid value for `{name}`. Received: {name}={value!r}. Expected a positive, finite duration.")
        return float(value)
    match = _NUMBER_UNIT.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _DURATION_UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"Invalid value for `{name}`. Received: {name}={value!r}. "
            "Expected a positive duration such as '5min', '90s', '1h' or a number of seconds."
        )
    return float(match.group(1)) * _DURATION_UNITS[unit]


def format_bytes(n: int | None) -> str:
    """``1536`` -> ``'1.5 KiB'``; None -> ``'n/a'``."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
