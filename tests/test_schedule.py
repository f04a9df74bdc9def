"""Slot arithmetic and durations: cron boundaries, DST, and properties."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cronguard.durations import format_duration, parse_duration
from cronguard.schedule import CronSchedule, Interval, Slot, default_tolerance, iso_utc

BERLIN = ZoneInfo("Europe/Berlin")
# 2001-09-09 .. 2100-01-01, in ms.
MOMENTS = st.integers(min_value=1_000_000_000_000, max_value=4_102_444_800_000)


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
       second: int = 0, zone: ZoneInfo | None = None, fold: int = 0) -> int:
    moment = datetime(year, month, day, hour, minute, second,
                      tzinfo=zone or UTC, fold=fold)
    return round(moment.timestamp() * 1000)


def slots_from(schedule: CronSchedule, start_ms: int, count: int) -> list[str]:
    """The next ``count`` slot starts from ``start_ms``, in UTC ISO form."""
    starts, at = [], start_ms
    for _ in range(count):
        slot = schedule.slot_at(at)
        starts.append(iso_utc(slot.start_ms))
        at = slot.end_ms
    return starts


# Cron expressions


def test_every_five_minutes_cuts_the_hour_into_twelve_slots() -> None:
    schedule = CronSchedule("*/5 * * * *", ZoneInfo("UTC"))
    slot = schedule.slot_at(ms(2026, 5, 4, 10, 7, 30))
    assert slot == Slot(ms(2026, 5, 4, 10, 5), ms(2026, 5, 4, 10, 10))
    assert slots_from(schedule, ms(2026, 5, 4, 10, 0), 3) == [
        "2026-05-04T10:00:00Z", "2026-05-04T10:05:00Z", "2026-05-04T10:10:00Z",
    ]


def test_ranges_and_lists_give_uneven_slots() -> None:
    schedule = CronSchedule("1-3,30 9 * * 1-5", ZoneInfo("UTC"))
    # Friday 2026-05-08 09:00 to Monday.
    assert slots_from(schedule, ms(2026, 5, 8, 9, 1), 6) == [
        "2026-05-08T09:01:00Z", "2026-05-08T09:02:00Z", "2026-05-08T09:03:00Z",
        "2026-05-08T09:30:00Z", "2026-05-11T09:01:00Z", "2026-05-11T09:02:00Z",
    ]


def test_daily_slots_start_at_local_midnight() -> None:
    schedule = CronSchedule("@daily", BERLIN)
    slot = schedule.slot_at(ms(2026, 7, 1, 12, zone=BERLIN))
    assert slot == Slot(ms(2026, 7, 1, zone=BERLIN), ms(2026, 7, 2, zone=BERLIN))
    assert iso_utc(slot.start_ms) == "2026-06-30T22:00:00Z"


@pytest.mark.parametrize("alias, expression", [
    ("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"),
    ("@weekly", "0 0 * * 0"), ("@monthly", "0 0 1 * *"), ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
])
def test_aliases_mean_their_expressions(alias: str, expression: str) -> None:
    at = ms(2026, 3, 17, 13, 45)
    assert CronSchedule(alias, BERLIN).slot_at(at) == CronSchedule(
        expression, BERLIN
    ).slot_at(at)


def test_hourly_slots_skip_the_hour_lost_in_spring() -> None:
    # 2026-03-29 in Berlin: 02:00 CET becomes 03:00 CEST.
    schedule = CronSchedule("0 * * * *", BERLIN)
    assert slots_from(schedule, ms(2026, 3, 29, 1, zone=BERLIN), 3) == [
        "2026-03-29T00:00:00Z", "2026-03-29T01:00:00Z", "2026-03-29T02:00:00Z",
    ]
    # 01:00 CET lasts one real hour, up to 03:00 CEST.
    slot = schedule.slot_at(ms(2026, 3, 29, 1, 30, zone=BERLIN))
    assert slot.length == 3600


def test_a_fixed_time_in_the_lost_hour_runs_once_at_its_end() -> None:
    schedule = CronSchedule("30 2 * * *", BERLIN)
    assert slots_from(schedule, ms(2026, 3, 28, 2, 30, zone=BERLIN), 3) == [
        "2026-03-28T01:30:00Z",  # 02:30 CET
        "2026-03-29T01:00:00Z",  # 03:00 CEST: 02:30 did not exist
        "2026-03-30T00:30:00Z",  # 02:30 CEST
    ]


def test_a_fixed_time_in_the_doubled_hour_runs_once() -> None:
    # 2026-10-25 in Berlin: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    schedule = CronSchedule("30 2 * * *", BERLIN)
    starts = slots_from(schedule, ms(2026, 10, 24, 2, 30, zone=BERLIN), 3)
    assert starts == [
        "2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z",
    ]


def test_half_hourly_slots_cover_both_passes_of_the_doubled_hour() -> None:
    schedule = CronSchedule("*/30 * * * *", BERLIN)
    starts = slots_from(schedule, ms(2026, 10, 25, 2, zone=BERLIN), 5)
    # Every real half hour, though the wall clock repeats 02:00 and 02:30.
    assert starts == [
        "2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z", "2026-10-25T01:00:00Z",
        "2026-10-25T01:30:00Z", "2026-10-25T02:00:00Z",
    ]


def test_tolerance_moves_an_early_firing_into_the_coming_slot() -> None:
    schedule = CronSchedule("*/5 * * * *", ZoneInfo("UTC"))
    early = ms(2026, 5, 4, 10, 4, 57)
    assert schedule.slot_at(early).start_ms == ms(2026, 5, 4, 10, 0)
    assert schedule.slot_at(early, 5000).start_ms == ms(2026, 5, 4, 10, 5)


def test_boundaries_cover_the_margin_around_a_moment() -> None:
    schedule = CronSchedule("* * * * *", ZoneInfo("UTC"))
    at = ms(2026, 5, 4, 10, 4, 30)
    edges = schedule.boundaries(at, 60_000)
    assert edges[0] <= at - 60_000 and edges[-1] > at + 60_000
    assert all(b - a == 60_000 for a, b in zip(edges, edges[1:], strict=False))
    # A sparse schedule still gives the slot around the moment.
    yearly = CronSchedule("@yearly", BERLIN).boundaries(at, 60_000)
    assert yearly == [ms(2026, 1, 1, zone=BERLIN), ms(2027, 1, 1, zone=BERLIN)]


@pytest.mark.parametrize("expression", ["", "* * * *", "* * * * * *", "61 * * * *",
                                        "@often", "a b c d e"])
def test_what_is_not_a_five_field_expression_is_refused(expression: str) -> None:
    with pytest.raises(ValueError):
        CronSchedule(expression, BERLIN)


# Properties


@given(at=MOMENTS, every=st.integers(min_value=100, max_value=86_400_000),
       tolerance=st.integers(min_value=0, max_value=5_000))
def test_interval_slot_contains_the_moment_plus_tolerance(
    at: int, every: int, tolerance: int
) -> None:
    slot = Interval(every / 1000).slot_at(at, tolerance)
    assert slot.start_ms <= at + tolerance < slot.end_ms
    assert slot.start_ms % every == 0
    assert slot.end_ms - slot.start_ms == every


@given(at=MOMENTS, later=st.integers(min_value=0, max_value=10**9),
       every=st.integers(min_value=100, max_value=3_600_000))
def test_interval_slots_never_go_backwards(at: int, later: int, every: int) -> None:
    interval = Interval(every / 1000)
    tolerance = round(default_tolerance(every / 1000) * 1000)
    assert interval.slot_at(at, tolerance) <= interval.slot_at(at + later, tolerance)


@given(at=MOMENTS, skew=st.integers(min_value=0, max_value=1_000))
def test_hosts_within_the_tolerance_agree_on_the_slot(at: int, skew: int) -> None:
    # Host A fires on the boundary, host B up to the tolerance earlier.
    interval = Interval(10)
    tolerance = 1_000
    boundary = interval.slot_at(at).start_ms
    assert interval.slot_at(boundary - skew, tolerance) == interval.slot_at(
        boundary, tolerance
    )


@given(at=MOMENTS, expression=st.sampled_from(
    ["*/5 * * * *", "0 * * * *", "30 2 * * *", "15,45 */3 * * 1-5", "@daily",
     "0 0 1 * *"]),
    zone=st.sampled_from(["Europe/Berlin", "America/New_York", "UTC",
                          "Australia/Lord_Howe"]))
def test_cron_slot_is_the_gap_between_two_fire_times(
    at: int, expression: str, zone: str
) -> None:
    schedule = CronSchedule(expression, ZoneInfo(zone))
    slot = schedule.slot_at(at)
    assert slot.start_ms <= at < slot.end_ms
    # No fire time falls strictly inside the slot.
    assert schedule.fire_after(slot.start_ms) == slot.end_ms
    assert schedule.fire_at_or_before(slot.end_ms - 1) == slot.start_ms


durations = st.builds(
    lambda d, h, m, s, milli: (d, h, m, s, milli),
    st.integers(0, 30), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59),
    st.integers(0, 999),
)


@given(parts=durations)
def test_durations_add_their_parts(parts: tuple[int, int, int, int, int]) -> None:
    d, h, m, s, milli = parts
    units = zip((d, h, m, s, milli), ("d", "h", "m", "s", "ms"), strict=True)
    text = "".join(f"{n}{unit}" for n, unit in units if n)
    expected = d * 86400 + h * 3600 + m * 60 + s + milli / 1000
    if not text:
        text = "0"
    assert parse_duration(text) == pytest.approx(expected)


@given(seconds=st.integers(min_value=0, max_value=10**7))
def test_a_bare_number_is_seconds_and_round_trips(seconds: int) -> None:
    assert parse_duration(str(seconds)) == seconds
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@given(text=st.text(alphabet="0123456789smhd. x-", max_size=8))
def test_a_duration_parses_or_fails_with_a_message(text: str) -> None:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        assert "is not a duration" in str(exc)
    else:
        assert value >= 0
