"""The operator's commands: ``status``, ``history``, ``check`` and ``release``.

Each reads the store (see ``history``) and renders text for a person or JSON
for a program.  ``rich`` draws the tables; it is imported here, inside the
functions that print, and never on the path of a run.

``check`` is a dead man's switch for monitoring systems that run Nagios-style
plugins: it prints exactly one line and exits 0 (OK), 1 (WARNING), 2
(CRITICAL) or 3 (UNKNOWN, the store could not be read).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from . import scripts
from .durations import format_duration
from .errors import StoreError
from .history import (
    Event,
    JobState,
    Run,
    find_jobs,
    iso,
    read_events,
    read_job,
    server_time,
    store_errors,
)
from .keys import validate_key
from .lease import STREAM_LENGTH, Holder, host_id
from .store import Store

log = logging.getLogger(__name__)

# Monitoring-plugin exit statuses.
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_CHECK_WORDS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds) + " ago"


def _when(seconds: float | None) -> str:
    text = iso(seconds)
    return "-" if text is None else text[:19].replace("T", " ")


# status


def job_states(store: Store, keys: Sequence[str]) -> list[JobState]:
    """The named jobs, or every job the store knows when none is named."""
    for key in keys:
        validate_key(key, "KEY")
    names = list(keys) or find_jobs(store)
    now = server_time(store)
    return [read_job(store, key, now) for key in names]


def print_status(states: Sequence[JobState], *, as_json: bool, out: TextIO) -> None:
    if as_json:
        json.dump([state.to_json() for state in states], out, indent=2)
        out.write("\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("JOB", "STATE", "HOLDER", "LEASE LEFT", "LAST RUN", "HOST",
                   "DURATION", "EXIT", "LAST SUCCESS"):
        table.add_column(column, no_wrap=column != "JOB")
    for state in states:
        holder, last = state.holder, state.last_run
        table.add_row(
            state.key,
            state.state,
            f"{holder.host}:{holder.pid}" if holder else "-",
            format_duration(holder.ttl_left) if holder else "-",
            _when(last.start) if last else "never",
            last.host if last else "-",
            _run_length(last, state.now) if last else "-",
            _exit_text(last) if last else "-",
            _age(state.success_age) if state.last_success else "never",
        )
    if not states:
        out.write("no jobs found\n")
        return
    # Off a terminal (a pipe, cron mail) the table keeps its natural width.
    width = None if out.isatty() else 1000
    Console(file=out, highlight=False, width=width).print(table)


def _run_length(run: Run, now: float) -> str:
    if run.duration is not None:
        return format_duration(run.duration)
    if run.outcome == "running" and run.start is not None:
        return format_duration(max(0.0, now - run.start)) + " so far"
    return "-"


def _exit_text(run: Run) -> str:
    if run.outcome == "ok":
        return "0"
    if run.outcome in ("running", "unknown"):
        return run.outcome
    if run.status is None:
        return run.outcome
    return f"{run.status} ({run.outcome})" if run.outcome != "failed" else str(
        run.status)


# history


def print_history(events: Sequence[Event], *, as_json: bool, out: TextIO) -> None:
    if as_json:
        json.dump([event.to_json() for event in events], out, indent=2)
        out.write("\n")
        return
    if not events:
        out.write("no events recorded\n")
        return
    width = max(len(event.host) for event in events)
    for event in events:
        details = " ".join(f"{name}={value}" for name, value in event.fields.items()
                           if name != "holder")
        out.write(f"{iso(event.time)}  {event.host:<{width}}  {event.kind:<11}  "
                  f"{details}".rstrip() + "\n")


def history(
    store: Store, key: str, *, since: float | None, limit: int | None
) -> list[Event]:
    validate_key(key, "KEY")
    start = server_time(store) - since if since is not None else None
    return read_events(store, key, since=start, limit=limit)


# check


@dataclass(frozen=True)
class CheckResult:
    status: int
    line: str


def check(
    store: Store, key: str, *, max_age: float, warn_age: float | None
) -> CheckResult:
    """Judge the age of ``key``'s last success; never raises ``StoreError``."""
    try:
        state = read_job(store, key)
    except StoreError as exc:
        return CheckResult(UNKNOWN, f"CRONGUARD UNKNOWN - {key}: {exc}")

    success = state.last_success
    age = state.success_age
    running = " (running now)" if state.state == "running" else ""
    if success is None or age is None:
        seen = (f"among the last {state.events_seen} events"
                if state.events_seen else "recorded")
        status = CRITICAL
        text = f"{key}: no successful run {seen}{running}"
    else:
        if age > max_age:
            status, limit = CRITICAL, f" (more than {format_duration(max_age)})"
        elif warn_age is not None and age > warn_age:
            status, limit = WARNING, f" (more than {format_duration(warn_age)})"
        else:
            status, limit = OK, ""
        text = (f"{key}: last success {format_duration(age)} ago{limit} on "
                f"{success.host} at {iso(success.end)}{running}")
    # Performance data, after the pipe, for graphing plugins.
    warn = f"{warn_age:g}" if warn_age is not None else ""
    perf = f" | age={age:.3f}s;{warn};{max_age:g}" if age is not None else ""
    return CheckResult(status, f"CRONGUARD {_CHECK_WORDS[status]} - {text}{perf}")


# release


@dataclass(frozen=True)
class Released:
    removed: Holder | None
    current: Holder | None  # the lease left in place when the fence differed


def release(store: Store, key: str, *, fence: int | None) -> Released:
    """Remove ``key``'s lease, whoever holds it; recorded as ``released``."""
    validate_key(key, "KEY")
    fields = ["event", "released", "host", host_id(), "pid", str(os.getpid())]
    with store_errors(store):
        done, value, pttl, recorded = store.client.eval(
            scripts.FORCE_RELEASE,
            2,
            store.key(key, "lease"),
            store.key(key, "runs"),
            "" if fence is None else str(fence),
            STREAM_LENGTH,
            *fields,
        )
    holder = Holder.parse(value, int(pttl)) if value else None
    if done and not recorded:
        log.warning("%s: released, but could not record it in %s", key,
                    store.key(key, "runs"))
    if done:
        log.info("%s: released the lease of %s", key, holder)
        return Released(holder, None)
    return Released(None, holder)


def release_message(key: str, result: Released, fence: int | None) -> str:
    if result.removed is not None:
        holder = result.removed
        return (f"released {key}: removed the lease of {holder.host}:{holder.pid} "
                f"(fence {holder.fence}, acquired {iso(holder.since_ms / 1000)}, "
                f"{format_duration(holder.ttl_left)} left)")
    if result.current is not None:
        return (f"not released {key}: the lease now has fence "
                f"{result.current.fence} ({result.current.host}:"
                f"{result.current.pid}), not {fence}")
    return f"nothing to release: {key} has no lease"

