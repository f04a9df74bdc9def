"""Slots: the stretches of time in which a job runs at most once.

A schedule cuts time into slots.  ``Interval`` makes fixed slots counted from
the Unix epoch (``--every 10s``: slots start at every multiple of ten seconds
since 1970-01-01T00:00:00Z), so every host agrees on them without agreeing on
anything else.  ``CronSchedule`` makes a slot of each stretch between two fire
times of a cron expression, read in a time zone (``--schedule``, ``--tz``).

Which slot is current is decided by the Redis server's clock, inside the claim
script, never by the host's.  A host whose cron fires a little early (its
clock runs ahead, or cron woke it a moment before the minute) must still land
in the slot it was meant for, so the moment looked up is the server's time
plus a tolerance::

    slot T-1          | slot T                          | slot T+1
    ------------------+---------------------------------+----------
               T-tol  T                         T+1-tol
                 |<-- server time + tol picks T -->|

A host that fires up to ``tol`` early and any host that fires during the slot
both land in T.  This module holds the arithmetic only; ``scripts`` repeats
the ``Interval`` case in Lua and ``slots`` runs the flow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cronsim import CronSim

# The default tolerance is a tenth of the slot, and never more than this.
MAX_DEFAULT_TOLERANCE = 5.0
# Shortest --every: below this a slot is shorter than a Python start-up.
MIN_INTERVAL = 0.1
# Cron's finest step is a minute; the shortest gap of any five-field expression.
CRON_STEP = 60.0

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@dataclass(frozen=True, order=True)
class Slot:
    """One slot, ``[start_ms, end_ms)`` in milliseconds of Unix time."""

    start_ms: int
    end_ms: int

    @property
    def iso(self) -> str:
        """The start in ISO 8601 UTC, as ``CRONGUARD_SLOT`` gives it."""
        return iso_utc(self.start_ms)

    @property
    def length(self) -> float:
        return (self.end_ms - self.start_ms) / 1000


def iso_utc(ms: int) -> str:
    """``2026-12-03T08:35:00Z``; milliseconds are shown only when not zero."""
    moment = datetime.fromtimestamp(ms // 1000, UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if ms % 1000:
        text += f".{ms % 1000:03d}"
    return text + "Z"


def default_tolerance(interval: float) -> float:
    return min(interval / 10, MAX_DEFAULT_TOLERANCE)


class Interval:
    """Fixed slots of ``seconds`` each, counted from the Unix epoch."""

    def __init__(self, seconds: float) -> None:
        self.ms = round(seconds * 1000)
        if self.ms < MIN_INTERVAL * 1000:
            raise ValueError(f"is shorter than {MIN_INTERVAL * 1000:g}ms")

    @property
    def shortest(self) -> float:
        """The shortest slot this schedule makes, in seconds."""
        return self.ms / 1000

    def slot_at(self, at_ms: int, tolerance_ms: int = 0) -> Slot:
        """The slot that server time ``at_ms`` falls in, ``tolerance_ms`` early."""
        start = (at_ms + tolerance_ms) // self.ms * self.ms
        return Slot(start, start + self.ms)

    def __str__(self) -> str:
        from .durations import format_duration

        return f"every {format_duration(self.ms / 1000)}"


def local_zone() -> tzinfo:
    """The zone cron itself uses: ``TZ`` if set, else ``/etc/localtime``, else UTC."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with open("/etc/localtime", "rb") as handle:
            return ZoneInfo.from_file(handle, key="localtime")
    except (OSError, ValueError):
        return UTC


def zone_named(name: str) -> tzinfo:
    """The IANA zone ``name``; ``ValueError`` when there is no such zone."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a known time zone") from None


class CronSchedule:
    """Slots between the fire times of a five-field cron expression.

    The expression is read in ``zone`` (the host's local zone when None, as
    cron reads a crontab).  Daylight-saving changes follow Debian cron, as the
    ``cronsim`` library implements it: a job at a fixed time that falls into
    the hour skipped in spring runs once at the first valid moment, and a time
    that occurs twice in autumn runs once.
    """

    def __init__(self, expression: str, zone: tzinfo | None = None) -> None:
        from cronsim import CronSimError  # only in schedule mode

        text = " ".join(expression.split())
        self.expression = ALIASES.get(text.lower(), text)
        if len(self.expression.split()) != 5:
            raise ValueError(
                "does not have five fields (minute hour day month weekday) "
                "nor is it one of " + ", ".join(ALIASES)
            )
        self.zone = zone if zone is not None else local_zone()
        try:
            self._iterate(0, reverse=False)
        except CronSimError as exc:
            raise ValueError(f"is not a cron expression ({exc})") from None
        self.text = text

    @property
    def shortest(self) -> float:
        """A lower bound on the slot length, in seconds."""
        return CRON_STEP

    def _iterate(self, at_ms: int, *, reverse: bool) -> CronSim:
        from cronsim import CronSim

        moment = datetime.fromtimestamp(at_ms // 1000, self.zone)
        return CronSim(self.expression, moment, reverse=reverse)

    def fire_after(self, at_ms: int) -> int:
        """The first fire time strictly after ``at_ms``."""
        # CronSim starts one second after a whole-second moment.
        return _ms(next(self._iterate(at_ms, reverse=False)))

    def fire_at_or_before(self, at_ms: int) -> int:
        """The last fire time at or before ``at_ms``."""
        # Reversed, CronSim starts one second before its whole-second moment.
        return _ms(next(self._iterate(at_ms // 1000 * 1000 + 1000, reverse=True)))

    def slot_at(self, at_ms: int, tolerance_ms: int = 0) -> Slot:
        moment = at_ms + tolerance_ms
        start = self.fire_at_or_before(moment)
        return Slot(start, self.fire_after(start))

    def boundaries(self, around_ms: int, margin_ms: int, limit: int = 64) -> list[int]:
        """Consecutive fire times covering ``around_ms +- margin_ms``.

        The claim script picks the slot from these by the server's clock, so
        a host whose clock is off by less than ``margin_ms`` needs no extra
        round trip to learn the server's time.  At most ``limit`` are given.
        """
        edges = [self.fire_at_or_before(around_ms - margin_ms)]
        while edges[-1] <= around_ms + margin_ms and len(edges) < limit:
            edges.append(self.fire_after(edges[-1]))
        if len(edges) < 2:
            edges.append(self.fire_after(edges[-1]))
        return edges

    def __str__(self) -> str:
        return f"schedule {self.text!r}"


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


Schedule = Interval | CronSchedule

