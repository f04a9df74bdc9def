"""What the store remembers about jobs: their run events, and which jobs exist.

Runs record themselves from inside the lease scripts (see ``scripts``), so
this module only reads.  Each job has a capped stream ``PREFIX:{KEY}:runs``
of events; the stream ID is the Redis server's clock in milliseconds when the
event was written, so every time shown here is the server's, whatever the
clocks of the hosts that ran the job say.  The events are:

``started``      host, pid, fence, ttl_ms: the host won the lease
``finished``     host, pid, fence, status, reason (exited, timeout, lost),
                 duration_ms: the command ended
``failed``       host, pid, fence, status (126 or 127): it could not start
``interrupted``  host, pid, fence, signal: stopped before the command started
``unreplicated`` host, pid, fence, replicas: fewer replicas than
                 --min-replicas confirmed the lease; the command did not start
``released``     host, pid (the operator's), fence, holder: ``cronguard
                 release`` removed a lease

A run is the events that share a fence.  The stream keeps about the last
thousand events (``XADD MAXLEN ~``), so anything older is gone: a job's "last
success" is the last one the stream still holds.

Jobs are found by scanning for their ``runs`` and ``lease`` keys; in a Redis
Cluster ``scan_iter`` visits every primary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from .lease import Holder
from .store import Store

log = logging.getLogger(__name__)

# Events that begin a run, and those that end one.
STARTS = ("started", "takeover")
ENDS = ("finished", "failed", "interrupted", "unreplicated")
# Fields whose values are whole numbers.
_NUMBERS = ("pid", "fence", "status", "duration_ms", "ttl_ms", "signal", "replicas")
# Events read per request when looking back for a job's last success.
_PAGE = 200


@contextmanager
def store_errors(store: Store) -> Iterator[None]:
    """Turn a failed request into the store's ``StoreError``."""
    try:
        yield
    except redis.RedisError as exc:
        raise store.error(exc) from exc


def iso(seconds: float | None) -> str | None:
    """``2025-06-01T12:00:00.250Z`` for a time in seconds since the epoch."""
    if seconds is None:
        return None
    whole = int(seconds)
    millis = round((seconds - whole) * 1000)
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Event:
    """One entry of a job's run stream."""

    id: str
    time: float  # seconds since the epoch, by the server's clock
    kind: str
    host: str
    fields: dict[str, str]

    @classmethod
    def parse(cls, entry_id: bytes | str, raw: dict[Any, Any]) -> Event:
        entry = _text(entry_id)
        fields = {_text(k): _text(v) for k, v in raw.items()}
        kind = fields.pop("event", "?")
        host = fields.pop("host", "?")
        millis = int(entry.partition("-")[0] or 0)
        return cls(entry, millis / 1000, kind, host, fields)

    def number(self, name: str) -> int | None:
        try:
            return int(self.fields[name])
        except (KeyError, ValueError):
            return None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": self.id,
            "time": iso(self.time),
            "event": self.kind,
            "host": self.host,
        }
        for name, value in self.fields.items():
            number = self.number(name) if name in _NUMBERS else None
            entry[name] = value if number is None else number
        return entry


@dataclass
class Run:
    """One run of a job, put together from its events."""

    host: str
    pid: int | None
    fence: int | None
    start: float | None
    end: float | None = None
    status: int | None = None
    reason: str | None = None
    duration: float | None = None
    outcome: str = "unknown"
    takeover: bool = False
    released: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.outcome == "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": self.pid,
            "fence": self.fence,
            "start": iso(self.start),
            "end": iso(self.end),
            "duration_s": self.duration,
            "status": self.status,
            "reason": self.reason,
            "outcome": self.outcome,
            "takeover": self.takeover,
            "released": self.released,
        }


# What a run's ending says about it.  "running": its lease is still held and
# no end was recorded; "unknown": no end was recorded and the lease is gone
# (the host crashed, or was killed with SIGKILL, or its last write failed).
OUTCOMES = (
    "ok",
    "failed",
    "timeout",
    "lost",
    "not-started",
    "interrupted",
    "running",
    "unknown",
)


def _outcome(event: Event) -> str:
    if event.kind in ("failed", "unreplicated"):
        return "not-started"
    if event.kind == "interrupted":
        return "interrupted"
    reason = event.fields.get("reason", "exited")
    if reason in ("timeout", "lost"):
        return reason
    return "ok" if event.number("status") == 0 else "failed"


def runs_from(events: Iterable[Event], holder: Holder | None = None) -> list[Run]:
    """The runs that ``events`` (oldest first) describe, oldest first.

    ``holder`` is the lease's current holder, if any: a run of its fence with
    no recorded end is still running.
    """
    runs: list[Run] = []
    by_fence: dict[int, Run] = {}
    for event in events:
        fence = event.number("fence")
        if event.kind in STARTS:
            run = Run(event.host, event.number("pid"), fence, event.time,
                      takeover=event.kind == "takeover", extra=dict(event.fields))
            runs.append(run)
            if fence is not None:
                by_fence[fence] = run
        elif event.kind in ENDS:
            found = by_fence.get(fence) if fence is not None else None
            if found is None or found.end is not None:
                # Its start was trimmed from the stream: place it from its length.
                length = event.number("duration_ms") or 0
                found = Run(event.host, event.number("pid"), fence,
                            event.time - length / 1000)
                runs.append(found)
            found.end = event.time
            found.status = event.number("status")
            found.reason = event.fields.get("reason")
            millis = event.number("duration_ms")
            found.duration = millis / 1000 if millis is not None else None
            found.outcome = _outcome(event)
        elif event.kind == "released" and fence is not None and fence in by_fence:
            by_fence[fence].released = True
    for run in runs:
        if run.end is None and holder is not None and run.fence == holder.fence:
            run.outcome = "running"
    return runs


def server_time(store: Store) -> float:
    """The Redis server's clock, in seconds since the epoch."""
    with store_errors(store):
        seconds, micros = store.client.time()
    return int(seconds) + int(micros) / 1_000_000


def read_events(
    store: Store,
    key: str,
    *,
    since: float | None = None,
    limit: int | None = None,
) -> list[Event]:
    """A job's events, oldest first: those from ``since`` (server seconds) on,
    at most the ``limit`` most recent."""
    stream = store.key(key, "runs")
    start = f"{int(since * 1000)}-0" if since is not None else "-"
    entries: list[Any]
    with store_errors(store):
        if limit is None:
            entries = list(store.client.xrange(stream, min=start) or [])
        else:
            newest = store.client.xrevrange(stream, max="+", min=start, count=limit)
            entries = list(reversed(newest or []))
    return [Event.parse(entry_id, raw) for entry_id, raw in entries]


def read_holder(store: Store, key: str) -> Holder | None:
    lease = store.key(key, "lease")
    with store_errors(store):
        pipe = store.client.pipeline(transaction=False)
        pipe.get(lease)
        pipe.pttl(lease)
        value, pttl = pipe.execute()
    return Holder.parse(value, int(pttl)) if value is not None else None


def find_jobs(store: Store) -> list[str]:
    """Every job key the store knows, sorted."""
    prefix = store.settings.prefix
    found: set[str] = set()
    with store_errors(store):
        for kind in ("runs", "lease"):
            pattern = f"{prefix}:{{*}}:{kind}"
            for name in store.client.scan_iter(match=pattern, count=1000):
                job = _job_of(_text(name), prefix)
                if job is not None:
                    found.add(job)
    return sorted(found)


def _job_of(name: str, prefix: str) -> str | None:
    """``PREFIX:{JOB}:KIND`` -> ``JOB``; None for keys that only look alike."""
    head = f"{prefix}:{{"
    close = name.rfind("}:")
    if not name.startswith(head) or close < len(head):
        return None
    return name[len(head):close]


@dataclass
class JobState:
    """Everything ``status``, ``check`` and ``metrics`` say about one job."""

    key: str
    now: float
    holder: Holder | None
    runs: list[Run]
    last_success: Run | None
    skips: dict[str, int]
    events_seen: int

    @property
    def last_run(self) -> Run | None:
        return self.runs[-1] if self.runs else None

    @property
    def state(self) -> str:
        """running: a run holds the lease; held: the lease outlives its run (the
        minimum hold of --ttl); idle: no lease."""
        if self.holder is None:
            return "idle"
        last = self.last_run
        if last is not None and last.fence == self.holder.fence and last.end is None:
            return "running"
        return "held"

    @property
    def success_age(self) -> float | None:
        success = self.last_success
        if success is None or success.end is None:
            return None
        return max(0.0, self.now - success.end)

    def to_json(self) -> dict[str, Any]:
        holder = None
        if self.holder is not None:
            holder = {
                "host": self.holder.host,
                "pid": self.holder.pid,
                "fence": self.holder.fence,
                "since": iso(self.holder.since_ms / 1000),
                "lease_left_s": self.holder.ttl_left,
                **self.holder.extra,
            }
        last, success = self.last_run, self.last_success
        return {
            "key": self.key,
            "state": self.state,
            "holder": holder,
            "last_run": last.to_json() if last is not None else None,
            "last_success": success.to_json() if success is not None else None,
            "last_success_age_s": self.success_age,
            "skips": self.skips,
        }


def read_job(
    store: Store, key: str, now: float | None = None, *, full: bool = False
) -> JobState:
    """One job's lease, recent runs, last success and skip counts.

    The recent events and the lease come in one round trip; when the last
    success is further back, the stream is read back a page at a time until
    one turns up or the stream ends.  ``full`` reads every event at once.
    """
    lease, stream = store.key(key, "lease"), store.key(key, "runs")
    with store_errors(store):
        pipe = store.client.pipeline(transaction=False)
        pipe.get(lease)
        pipe.pttl(lease)
        pipe.xrevrange(stream, count=None if full else _PAGE)
        pipe.hgetall(store.key(key, "skips"))
        value, pttl, newest, skips = pipe.execute()
    if now is None:
        now = server_time(store)
    holder = Holder.parse(value, int(pttl)) if value is not None else None

    entries: list[Any] = list(newest)
    runs = runs_from(_events(entries), holder)
    success = _last_success(runs)
    while success is None and not full and entries and len(entries) % _PAGE == 0:
        with store_errors(store):
            older = store.client.xrevrange(
                stream, max=f"({_text(entries[-1][0])}", count=_PAGE
            )
        if not older:
            break
        entries.extend(older)
        success = _last_success(runs_from(_events(entries), holder))
    return JobState(
        key=key,
        now=now,
        holder=holder,
        runs=runs,
        last_success=success,
        skips={_text(h): int(n) for h, n in skips.items()},
        events_seen=len(entries),
    )


def _events(newest_first: Sequence[Any]) -> list[Event]:
    return [Event.parse(entry_id, raw) for entry_id, raw in reversed(newest_first)]


def _last_success(runs: Sequence[Run]) -> Run | None:
    return next((run for run in reversed(runs) if run.succeeded), None)
