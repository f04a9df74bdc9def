"""Durations as operators write them: ``500ms``, ``55``, ``5m``, ``1h30m``, ``1d``.

A bare number counts seconds, so ``--ttl 55`` keeps meaning what it means in
every crontab that already says it.
"""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_BARE = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(text: str) -> float:
    """Return the number of seconds that ``text`` names.

    Raises ``ValueError`` with a message fit for the user when ``text`` is not
    a duration.
    """
    spec = text.strip().lower()
    if _BARE.fullmatch(spec):
        return float(spec)
    total = 0.0
    position = 0
    for match in _PART.finditer(spec):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(spec):
        raise ValueError(
            f"{text!r} is not a duration (write it as 500ms, 55, 55s, 5m, 1h30m or 1d)"
        )
    return total


def format_duration(seconds: float) -> str:
    """Render ``seconds`` compactly for messages: ``750ms``, ``55s``, ``1h30m``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        text = f"{seconds:.1f}".rstrip("0").rstrip(".")
        return f"{text}s"
    remaining = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
