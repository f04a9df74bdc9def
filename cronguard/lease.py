"""A lease on one job key: acquire it, keep it alive, give it back.

The lease is a Redis key set with ``NX`` and a TTL whose value starts with a
random token (see ``scripts``).  Its deadline is kept on the local monotonic
clock, started *before* each request is sent, so the holder always believes
its lease ends no later than the server does::

    host A  |--send ACQUIRE--|          (A's deadline = send time + TTL)
    server        |--SET NX PX TTL--|   (expires = SET time + TTL, later)

A renewal that fails, or that the server refuses because the token no longer
matches, never extends the local deadline; when the deadline passes the lease
is lost, whatever the server might still say.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, NamedTuple

from . import scripts
from .durations import format_duration
from .errors import LeaseHeld, LeaseLost, NotReplicated, StoreError
from .store import Store

log = logging.getLogger(__name__)

# Events kept per job in its run stream (approximately: XADD MAXLEN ~).
STREAM_LENGTH = 1000


def host_id() -> str:
    """The name this host goes by in leases and history."""
    return os.environ.get("CRONGUARD_HOST_ID") or socket.gethostname()


class Holder(NamedTuple):
    """Who holds a lease, as its value in Redis describes it."""

    host: str
    pid: int
    fence: int
    since_ms: int
    ttl_left: float
    extra: dict[str, Any]

    @classmethod
    def parse(cls, value: bytes | str, pttl_ms: int) -> Holder:
        text = value.decode() if isinstance(value, bytes) else value
        _, _, details = text.partition(" ")
        try:
            fields = json.loads(details)
        except ValueError:
            fields = {}
        if not isinstance(fields, dict):
            fields = {}
        return cls(
            host=str(fields.pop("host", "?")),
            pid=int(fields.pop("pid", 0)),
            fence=int(fields.pop("fence", 0)),
            since_ms=int(fields.pop("since", 0)),
            ttl_left=max(pttl_ms, 0) / 1000,
            extra=fields,
        )

    def __str__(self) -> str:
        return (
            f"{self.host}:{self.pid} (fence {self.fence}, "
            f"{format_duration(self.ttl_left)} left)"
        )


class Lease:
    """A token-checked lease on ``key`` in ``store``, ``ttl`` seconds long.

    Use it as a context manager to run Python code under the lease::

        with Lease(store, "invoices", ttl=30) as lease:
            send_invoices(fence=lease.fence)

    Entering raises ``LeaseHeld`` when another holder has the lease; while the
    block runs, a thread renews the lease every ``ttl / 3``.  Python cannot
    stop the block from outside, so code that must not run without the lease
    calls ``lease.check()`` between steps, which raises ``LeaseLost``.  On exit
    the lease is released, or with ``hold=True`` kept until ``ttl`` after it
    was acquired, so that hosts which start a little later in the same window
    still find it taken.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        ttl: float,
        *,
        renew: bool = True,
        hold: bool = False,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.ttl = ttl
        self.renew_enabled = renew
        self.hold_on_exit = hold
        self.details = {"host": host_id(), "pid": os.getpid(), **(details or {})}
        self.token = secrets.token_hex(16)  # 128 bits
        self.lease_key = store.key(key, "lease")
        self.fence_key = store.key(key, "fence")
        self.runs_key = store.key(key, "runs")
        self.skips_key = store.key(key, "skips")
        self.fence: int | None = None
        self.since_ms: int | None = None
        self.deadline: float | None = None  # monotonic; None while not held
        self.lost_reason: str | None = None
        # True when the lease ran out because the store stopped answering.
        self.lost_silently = False
        self._listeners: list[Callable[[], None]] = []
        self._renewed: list[Callable[[float], None]] = []
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        # In a keeper thread, the event that stops it: once it is set,
        # nothing that thread still brings back changes the lease.
        self._keeper_local = threading.local()

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))

    @property
    def holder_id(self) -> str:
        return f"{self.details['host']}:{self.details['pid']}"

    # Acquisition

    def try_acquire(self, **event: object) -> Holder | None:
        """One attempt, one round trip: ``None`` when acquired, else the holder.

        Winning records a ``started`` event with ``event``'s fields added;
        losing counts a skip for this host.
        """
        sent = time.monotonic()
        won, value, extra, recorded = self.store.eval(
            scripts.ACQUIRE,
            [self.lease_key, self.fence_key, self.runs_key, self.skips_key],
            [
                self.token,
                self.ttl_ms,
                json.dumps(self.details),
                STREAM_LENGTH,
                *self._fields("started", ttl_ms=self.ttl_ms, **event),
            ],
        )
        if not recorded:
            log.warning("%s: could not record the run in %s", self.key,
                        self.runs_key if won else self.skips_key)
        if not won:
            return Holder.parse(value, int(extra))
        self.fence, self.since_ms = int(value), int(extra)
        self.deadline = sent + self.ttl
        self.lost_reason = None
        if self.store.settings.min_replicas:
            self._await_replicas()
        log.info("%s: acquired (fence %d, ttl %s)", self.key, self.fence,
                 format_duration(self.ttl))
        return None

    def _await_replicas(self) -> None:
        """Count the lease only once ``--min-replicas`` replicas have it.

        A lease that only the primary has is lost if the primary fails over
        now; then another host can win the same window.  So unless enough
        replicas confirm it in time, it is given back and ``NotReplicated``
        raised, as for any store that fails before the command starts.
        """
        settings = self.store.settings
        wanted = settings.min_replicas
        try:
            acked = self.store.acknowledged_replicas(self.lease_key, self.token)
        except StoreError as exc:
            log.warning("%s: WAIT for replicas failed: %s", self.key, exc)
            acked = 0
        if acked >= wanted and self.deadline and time.monotonic() < self.deadline:
            log.debug("%s: %d replicas have the lease", self.key, acked)
            return

        try:
            self._give_back_unreplicated(acked)
        except StoreError as exc:
            log.warning("%s: could not give the unreplicated lease back, it "
                        "expires by itself: %s", self.key, exc)
        connected = self.store.connected_replicas(self.lease_key)
        text = (
            f"{self.key}: {acked} of the {wanted} replicas required by "
            "--min-replicas (CRONGUARD_MIN_REPLICAS) confirmed the lease within "
            f"{format_duration(settings.timeout)}, so it was given back; "
        )
        if connected is not None and connected < wanted:
            text += (
                f"the primary has only {connected} connected "
                f"replica{'' if connected == 1 else 's'}: lower "
                "--min-replicas or bring the replicas back"
            )
        else:
            text += "replication lags: raise --redis-timeout or check the replicas"
        raise NotReplicated(text, self.store.description)

    def _give_back_unreplicated(self, acked: int) -> None:
        """Delete a lease that only ``acked`` replicas confirmed, saying why."""
        self.release(event="unreplicated", replicas=acked)

    def acquire(
        self,
        wait: float = 0.0,
        give_up: Callable[[], bool] | None = None,
        **event: object,
    ) -> Holder | None:
        """Try until acquired or ``wait`` seconds have passed.

        Returns ``None`` once acquired, else the holder seen last.  ``give_up``
        is asked between attempts and ends the wait early when it says so.
        """
        until = time.monotonic() + wait
        pause = 0.05
        while True:
            holder = self.try_acquire(**event)
            if holder is None:
                return None
            left = until - time.monotonic()
            if left <= 0 or (give_up is not None and give_up()):
                return holder
            log.debug("%s: held by %s; trying again", self.key, holder)
            time.sleep(min(pause, left, max(holder.ttl_left, 0.01)))
            pause = min(pause * 2, 0.5)

    # Keeping and giving back

    def renew(self) -> None:
        """Extend the lease to ``ttl`` from now; raise ``LeaseLost`` if not ours.

        Subclasses change what extending means (``_extend``); the rules around
        it stay here: no renewal past the local deadline, and every listener
        hears the new deadline.
        """
        # Past the local deadline the lease is lost, even if the server still
        # has the key (its expiry is a little later than ours): renewing now
        # would revive a lease this run has already stopped trusting.  This
        # is what a holder that was frozen (SIGSTOP, a stalled VM) meets first
        # when it wakes up.
        self.check()
        deadline = self._extend(time.monotonic())
        if self._abandoned():
            return
        if self.lost_reason is None:
            self.deadline = deadline
            for listener in self._renewed:
                listener(deadline)
        log.info("%s: renewed for %s", self.key, format_duration(self.ttl))

    def _extend(self, sent: float) -> float:
        """Extend the lease in the store; return the new local deadline.

        ``sent`` is when the request left; raises ``LeaseLost`` when the store
        says the lease is no longer this holder's.
        """
        extended = self.store.eval(
            scripts.RENEW, [self.lease_key], [self.token, self.ttl_ms]
        )
        if not extended:
            self._refused()
        return sent + self.ttl

    def _refused(self) -> None:
        self._lose("another holder has it, or it expired in the store")
        raise LeaseLost(self.key, self.lost_reason or "")

    def release(
        self, *, hold: float = 0.0, event: str = "finished", **fields: object
    ) -> float:
        """Give the lease back and record ``event`` with ``fields``.

        With ``hold``, the lease is kept until ``hold`` seconds after it was
        acquired and deleted only if that moment has passed.  Returns the
        seconds it is still held (0 when deleted), or -1 when it was no longer
        this holder's.
        """
        self.deadline = None
        left_ms, recorded = self.store.eval(
            scripts.RELEASE,
            [self.lease_key, self.runs_key],
            [
                self.token,
                max(0, round(hold * 1000)),
                STREAM_LENGTH,
                *self._fields(event, fence=self.fence, **fields),
            ],
        )
        if not recorded:
            log.warning("%s: could not record the run in %s", self.key, self.runs_key)
        if left_ms > 0:
            log.info("%s: held for %s more", self.key, format_duration(left_ms / 1000))
        elif left_ms == 0:
            log.info("%s: released", self.key)
        else:
            log.info("%s: not released: it was no longer held by this run", self.key)
        return float(left_ms) / 1000 if left_ms >= 0 else -1.0

    def hold(self, event: str = "finished", **fields: object) -> float:
        """Release, but not before ``ttl`` has passed since acquisition."""
        return self.release(hold=self.ttl, event=event, **fields)

    def _fields(self, event: str, **fields: object) -> list[str]:
        """Flat field/value pairs of a run event."""
        pairs = ["event", event, "host", str(self.details["host"]),
                 "pid", str(self.details["pid"])]
        for name, value in fields.items():
            if value is not None:
                pairs += [name, str(value)]
        return pairs

    def check(self) -> None:
        """Raise ``LeaseLost`` if the lease is lost or its deadline has passed."""
        deadline = self.deadline
        if self.lost_reason is None and deadline and time.monotonic() >= deadline:
            self._lose("it expired before a renewal succeeded", silently=True)
        if self.lost_reason is not None:
            raise LeaseLost(self.key, self.lost_reason)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the keeper thread) when the lease is lost."""
        self._listeners.append(listener)

    def on_renew(self, listener: Callable[[float], None]) -> None:
        """Call ``listener`` with the new monotonic deadline after each renewal."""
        self._renewed.append(listener)

    def _lose(self, reason: str, *, silently: bool = False) -> None:
        if self.lost_reason is None and not self._abandoned():
            self.lost_reason = reason
            self.lost_silently = silently
            log.warning("%s: lease lost: %s", self.key, reason)
            for listener in self._listeners:
                listener()

    # The keeper thread

    def keep(self) -> None:
        """Start renewing in the background every ``ttl / 3``."""
        if not self.renew_enabled or self._keeper is not None:
            return
        self._stop = threading.Event()  # its own, in case an abandoned one lingers
        self._keeper = threading.Thread(
            target=self._keep, args=(self._stop,), name=f"cronguard-keeper-{self.key}",
            daemon=True,
        )
        self._keeper.start()

    def stop_keeping(self, *, wait: bool = True) -> None:
        """Stop renewing; with ``wait``, return only once no renewal is in flight.

        Without ``wait`` a renewal still in flight is abandoned, and whatever
        it brings back is ignored: it can neither mark the lease lost nor move
        its deadline.  Nor can it stretch the lease in the store once the
        lease is given back: a deleted lease has no token left to match, and
        one shortened to its minimum hold is marked released, so renewals of
        it are refused.  A renewal stuck on a slow or unreachable store thus
        delays neither the release nor the exit.
        """
        self._stop.set()
        if self._keeper is not None:
            if wait:
                self._keeper.join()
            self._keeper = None

    def _abandoned(self) -> bool:
        """Whether this is a keeper thread that stop_keeping() has stopped."""
        stop: threading.Event | None = getattr(self._keeper_local, "stop", None)
        return stop is not None and stop.is_set()

    def _keep(self, stop: threading.Event) -> None:
        # Renewals fall due a third of the way into the lease as the local
        # deadline counts it, not a third after the last reply: the time spent
        # starting the command and waiting for answers is already gone from
        # the lease, and on a slow link it would otherwise eat the margin.
        self._keeper_local.stop = stop
        interval = self.ttl / 3

        def due() -> float:
            if self.deadline is None:
                return time.monotonic() + interval
            return self.deadline - self.ttl + interval

        next_at = due()
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            try:
                self.renew()
            except LeaseLost:
                return
            except StoreError as exc:
                if self._abandoned():
                    return
                deadline = self.deadline or 0.0
                left = deadline - time.monotonic()
                if left <= 0:
                    self._lose(f"renewal failed until it expired: {exc}",
                               silently=True)
                    return
                log.warning("%s: renewal failed, lease ends in %s: %s",
                            self.key, format_duration(left), exc)
                # Try again soon, but leave the deadline to the supervisor.
                next_at = time.monotonic() + min(interval / 2, left / 2, 1.0)
                continue
            next_at = due()
        # Stopped by stop_keeping().

    # Context manager

    def __enter__(self) -> Lease:
        holder = self.acquire()
        if holder is not None:
            raise LeaseHeld(self.key, str(holder))
        self.keep()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_keeping()
        if self.lost_reason is not None:
            return
        status = "0" if exc_type is None else exc_type.__name__
        try:
            self.release(hold=self.ttl if self.hold_on_exit else 0.0,
                         status=status)
        except StoreError as error:
            log.warning("%s: could not give the lease back: %s", self.key, error)
