"""Slot mode: each slot of a schedule runs once across the fleet.

Two keys work together.  The slot record (``PREFIX:{KEY}:slot``) remembers
the last slot claimed and how its run went; a slot is claimed only when it
comes after the one recorded, so no slot runs twice, however the hosts' cron
firings are spread and however short the job.  The running lease
(``PREFIX:{KEY}:lease``, ``--lease``) says a run is in progress: it is renewed
while the command runs and deleted when it ends, so that a crash shows as a
lease that expired while the record still says ``running``.

Claiming costs one round trip: the claim script computes the slot from the
server's clock, applies the overlap rule, takes the lease and the fencing
token and records the start.  A losing host spends that round trip and exits,
unless ``--standby`` asks it to wait for the winner::

    host A  claim slot T ... running, renewing ........ X (killed)
    host B  lose (running) - wait on PTTL - wait - ... lease gone: take over
                                                       T runs again on B,
                                                       CRONGUARD_TAKEOVER=1

A standby sleeps until the lease would expire, as its PTTL says, and asks
again; when the winner records the end of its run, the standby exits.  The
takeover script takes the slot over only when the record still says
``running`` and nobody holds the lease, so exactly one standby wins it, with
a fencing token greater than the lost holder's.

A standby that finds the previous slot's run still going waits for that run
instead, and claims its own slot once the lease is gone (``claim_again``,
only while the server's clock is still in that slot), so that an overrun
delays a slot rather than losing it.

With ``--min-replicas N`` a won claim or takeover counts only once N
replicas have it (``Lease._await_replicas``): a claim that only the primary
had would vanish in a failover, and the slot could then run a second time.
A claim not confirmed in time is given back with the slot left ``running``,
so the command does not start and a standby may take the slot over.

What a takeover cannot promise: the slot runs at least once and at most once
*at a time*, but the lost holder's command may have done part of its work.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from . import scripts
from .config import RunSettings, SlotSettings
from .durations import format_duration
from .errors import (
    EXIT_STORE_UNAVAILABLE,
    CommandNotExecutable,
    CommandNotFound,
    StoreError,
)
from .lease import STREAM_LENGTH, Holder, Lease
from .schedule import CronSchedule, Slot
from .store import Store
from .supervise import Outcome, SignalRelay, _wait_for, _wake_pipe

log = logging.getLogger(__name__)

# How far around its own clock a host lists cron boundaries for the claim
# script; a host whose clock is further off than this from the server's pays
# one more round trip.
BOUNDARY_MARGIN_MS = 60_000
# A standby asks again at least this often, to exit soon after the winner
# finished, and else as the lease's PTTL says.
STANDBY_POLL = 1.0


def record_lifetime(settings: SlotSettings) -> float:
    """How long the slot record is kept after its slot ends, in seconds."""
    return max(settings.schedule.shortest, 60.0)


@dataclass(frozen=True)
class Claim:
    """The answer to a claim: won, or why not."""

    won: bool
    slot: Slot | None
    reason: str = ""  # running, done, failed, past, overlap, clock
    detail: str = ""  # who holds or held it
    pttl_ms: int = -2  # of the slot's lease, when it is running


class SlotLease(Lease):
    """The running lease of one slot, claimed through the slot record."""

    def __init__(self, store: Store, key: str, settings: SlotSettings) -> None:
        super().__init__(store, key, settings.lease)
        self.settings = settings
        self.slot_key = store.key(key, "slot")
        self.base_lease_key = self.lease_key
        self.slot: Slot | None = None
        self.takeover = False
        self._keep_ms = round(record_lifetime(settings) * 1000)

    def _lease_key_for(self, slot: Slot) -> str:
        if self.settings.overlap == "allow":
            return f"{self.base_lease_key}:{slot.start_ms}"
        return self.base_lease_key

    def claim(self, *, standby: bool = False) -> Claim:
        """Try to claim the current slot: one round trip, two when the host's
        clock is too far off the server's for its cron boundaries.

        With ``standby``, a run of an earlier slot that still holds the lease
        does not get the slot recorded as skipped: the caller means to wait
        for that run and claim the slot after it (``claim_again``).
        """
        around = round(time.time() * 1000)
        for _ in range(2):
            claim = self._claim_once(around, waiting="wait" if standby else "")
            if claim.reason != "clock":
                return claim
            around = int(claim.detail)
            log.info("%s: this host's clock is %s off the store's", self.key,
                     format_duration(abs(time.time() * 1000 - around) / 1000))
        raise StoreError(
            f"{self.store.description}: its clock jumped by more than "
            f"{BOUNDARY_MARGIN_MS // 1000}s between two requests; cannot pick a slot",
            self.store.description,
        )

    def claim_again(self, slot: Slot) -> Claim:
        """Ask again for ``slot``, which a run of an earlier slot held off.

        Only ``slot`` itself can be claimed: once the server's clock has left
        it, the answer is a loss with reason ``past``, and the next slot is
        left to the hosts that fire for it.
        """
        claim = self._claim_once(0, waiting="again", only=slot)
        if claim.reason == "clock":
            return Claim(False, slot, "past")
        return claim

    def _claim_once(
        self, around_ms: int, *, waiting: str = "", only: Slot | None = None
    ) -> Claim:
        schedule = self.settings.schedule
        tolerance_ms = round(self.settings.tolerance * 1000)
        if only is not None:
            length, edges = 0, [only.start_ms, only.end_ms]
        elif isinstance(schedule, CronSchedule):
            length, edges = 0, schedule.boundaries(
                around_ms + tolerance_ms, BOUNDARY_MARGIN_MS
            )
        else:
            length, edges = schedule.ms, []
        sent = time.monotonic()
        reply = self.store.eval(
            scripts.SLOT_CLAIM,
            [self.slot_key, self.base_lease_key, self.fence_key, self.runs_key,
             self.skips_key],
            [
                self.token,
                self.ttl_ms,
                json.dumps(self.details),
                STREAM_LENGTH,
                length,
                json.dumps(edges),
                tolerance_ms,
                self.settings.overlap,
                self._keep_ms,
                waiting,
                *self._fields("started", ttl_ms=self.ttl_ms),
            ],
        )
        if reply[0] != 1:
            _, reason, start, end, detail, pttl, recorded = reply
            reason, detail = _text(reason), _text(detail)
            if not recorded:
                log.warning("%s: could not count the skip in %s", self.key,
                            self.skips_key)
            if reason == "overlap" and detail:
                detail = str(Holder.parse(detail, int(pttl)))  # not its token
            slot = Slot(int(start), int(end)) if reason != "clock" else None
            return Claim(False, slot, reason, detail, int(pttl))

        _, fence, since, start, end, recorded = reply
        if not recorded:
            log.warning("%s: could not record the run in %s", self.key, self.runs_key)
        self._hold(Slot(int(start), int(end)), int(fence), int(since), sent)
        if self.store.settings.min_replicas:
            self._await_replicas()
        log.info("%s: claimed slot %s (fence %d, lease %s)", self.key,
                 self.slot.iso if self.slot else "?", self.fence,
                 format_duration(self.ttl))
        return Claim(True, self.slot)

    def take_over(self, slot: Slot) -> tuple[bool, str, int]:
        """Take ``slot`` over if its holder is gone: (taken, state, PTTL ms)."""
        sent = time.monotonic()
        lease_key = self._lease_key_for(slot)
        reply = self.store.eval(
            scripts.SLOT_TAKEOVER,
            [self.slot_key, lease_key, self.fence_key, self.runs_key],
            [
                self.token,
                self.ttl_ms,
                json.dumps(self.details),
                STREAM_LENGTH,
                slot.start_ms,
                self._keep_ms,
                *self._fields("takeover", ttl_ms=self.ttl_ms),
            ],
        )
        if reply[0] != 1:
            return False, _text(reply[1]), int(reply[2])
        _, fence, since, recorded = reply
        if not recorded:
            log.warning("%s: could not record the takeover in %s", self.key,
                        self.runs_key)
        self._hold(slot, int(fence), int(since), sent)
        self.takeover = True
        if self.store.settings.min_replicas:
            self._await_replicas()
        log.warning("%s: took over slot %s: its holder's lease expired before "
                    "the run ended (fence %d)", self.key, slot.iso, self.fence)
        return True, "running", self.ttl_ms

    def _give_back_unreplicated(self, acked: int) -> None:
        """Delete the running lease, leaving the slot recorded as running.

        The claim could vanish in a failover, so the command does not start
        on it; a slot left running without a lease is one that a standby
        takes over, and the standby waits for the replicas in its turn.
        """
        self.finish("", EXIT_STORE_UNAVAILABLE, event="unreplicated",
                    replicas=acked)

    def _extend(self, sent: float) -> float:
        """Extend the lease, and the slot record with it."""
        extended = self.store.eval(
            scripts.SLOT_RENEW,
            [self.slot_key, self.lease_key],
            [self.token, self.ttl_ms, self._keep_ms],
        )
        if not extended:
            self._refused()
        return sent + self.ttl

    def _hold(self, slot: Slot, fence: int, since: int, sent: float) -> None:
        self.slot = slot
        self.lease_key = self._lease_key_for(slot)
        self.details["slot"] = slot.iso
        self.fence, self.since_ms = fence, since
        self.deadline = sent + self.ttl
        self.lost_reason = None

    def finish(
        self, state: str, status: int, *, event: str = "finished", **fields: object
    ) -> None:
        """Record ``event`` and how the run ended, and delete the lease.

        ``state`` is ``done`` or ``failed``; an empty one leaves the slot
        recorded as running, so that a standby takes it over.
        """
        assert self.slot is not None, "finish() before the slot was claimed"
        self.deadline = None
        updated, released, recorded = self.store.eval(
            scripts.SLOT_FINISH,
            [self.slot_key, self.lease_key, self.runs_key],
            [
                self.token,
                self.slot.start_ms,
                state,
                status,
                STREAM_LENGTH,
                self._keep_ms,
                *self._fields(event, fence=self.fence, slot_ms=self.slot.start_ms,
                              status=status, **fields),
            ],
        )
        if not recorded:
            log.warning("%s: could not record the run in %s", self.key, self.runs_key)
        if state and not updated:
            log.info("%s: slot %s was no longer this run's; its record is "
                     "left as it is", self.key, self.slot.iso)
        log.info("%s: slot %s %s; lease %s", self.key, self.slot.iso,
                 state or "left to a standby",
                 "released" if released else "was no longer this run's")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def run_slot(
    settings: RunSettings, environ: Mapping[str, str], store: Store, relay: SignalRelay
) -> int:
    """One firing in slot mode; returns cronguard's exit status."""
    from .run import on_store_error

    assert settings.slot is not None
    key = settings.key
    lease = SlotLease(store, key, settings.slot)
    standby = settings.slot.standby > 0
    try:
        claim = lease.claim(standby=standby)
    except StoreError as exc:
        return on_store_error(settings, environ, relay, exc)

    if not claim.won:
        assert claim.slot is not None
        if standby and _worth_waiting(claim.reason, claim.pttl_ms):
            status = _stand_by(settings, lease, claim, relay)
            if status is not None:
                return status
        else:
            _log_skip(key, claim)
            return settings.skip_exit

    if relay.first is not None:
        log.info("%s: interrupted by signal %d before the command started", key,
                 relay.first)
        _finish(lease, "", 128 + relay.first, event="interrupted",
                signal=relay.first)
        return 128 + relay.first

    try:
        outcome = _run_command(settings, environ, relay, lease)
    except (CommandNotFound, CommandNotExecutable) as exc:
        _finish(lease, "failed", exc.exit_status, event="failed")
        raise
    _finish(
        lease,
        _state(outcome),
        outcome.returncode,
        reason=outcome.reason,
        duration_ms=round(outcome.duration * 1000),
        takeover=1 if lease.takeover else None,
    )
    return outcome.status


def _log_skip(key: str, claim: Claim) -> None:
    assert claim.slot is not None
    slot = claim.slot.iso
    if claim.reason == "overlap":
        log.info("%s: skipped slot %s: the previous run is still going (%s)",
                 key, slot, claim.detail or "recorded")
    elif claim.reason == "past":
        log.info("%s: skipped slot %s: a later slot was claimed already by %s",
                 key, slot, claim.detail)
    else:
        log.info("%s: skipped slot %s: claimed by %s (%s)", key, slot,
                 claim.detail, claim.reason)


def _worth_waiting(state: str, pttl_ms: int) -> bool:
    """Whether a standby has a reason to wait for a slot it lost in ``state``:
    its winner may still die, or an earlier slot's run holding the lease (of
    ``pttl_ms`` left, -2 for none) ends."""
    return state == "running" or (state == "overlap" and pttl_ms != -2)


def _stand_by(
    settings: RunSettings, lease: SlotLease, claim: Claim, relay: SignalRelay
) -> int | None:
    """Wait, up to --standby, for the slot that ``claim`` lost.

    While the slot's winner runs, the standby waits for its lease to expire
    with the run unrecorded, and then takes the slot over.  While a run of an
    earlier slot holds the lease, it waits for that run to end and then
    claims the slot itself, so that an overrun delays a slot instead of
    losing it.  Returns ``None`` once this host holds the slot, else the exit
    status to return.
    """
    assert settings.slot is not None and claim.slot is not None
    key, slot = settings.key, claim.slot
    until = time.monotonic() + settings.slot.standby
    state, pttl, holder = claim.reason, claim.pttl_ms, claim.detail
    waiting_for = {"running": "runs on", "overlap": "waits for an earlier run on"}
    log.info("%s: slot %s %s %s; standing by for %s", key, slot.iso,
             waiting_for[state], holder, format_duration(settings.slot.standby))
    with _wake_pipe() as (wake, _):
        while True:
            left = until - time.monotonic()
            if relay.first is not None:
                log.info("%s: standby interrupted by signal %d", key, relay.first)
                return 128 + relay.first
            if left <= 0:
                log.info("%s: standby ended; slot %s still %s %s", key, slot.iso,
                         waiting_for[state], holder)
                return settings.skip_exit
            if pttl != -2:
                _wait_for(wake, min(_next_look(state, pttl, lease.ttl), left))
            try:
                if state == "overlap":
                    again = lease.claim_again(slot)
                    if again.won:
                        return None
                    state, pttl, holder = again.reason, again.pttl_ms, again.detail
                else:
                    taken, state, pttl = lease.take_over(slot)
                    if taken:
                        return None
            except StoreError as exc:
                # Nothing ran here: "run" cannot mean running beside a
                # winner that may be alive, so only "fail" reports it.
                if settings.on_error == "fail":
                    raise
                log.warning("%s: standby ended, the store failed: %s", key, exc)
                return settings.skip_exit
            if not _worth_waiting(state, pttl):
                log.info("%s: slot %s needs no standby any more (%s)", key,
                         slot.iso, state)
                return settings.skip_exit


def _next_look(state: str, pttl_ms: int, lease_ttl: float) -> float:
    """Seconds until a standby asks again.

    A winner's lease is worth asking about just after it would expire, and
    at least every STANDBY_POLL to notice the end of its run.  An earlier
    slot's run usually ends by deleting its lease long before that, and the
    slot waits for it, so that lease is looked at a few times per lease.
    """
    due = pttl_ms / 1000 + 0.002 if pttl_ms >= 0 else STANDBY_POLL
    if state == "overlap":
        return min(due, STANDBY_POLL, max(0.05, lease_ttl / 10))
    return min(due, max(STANDBY_POLL, lease_ttl / 4))


def _run_command(
    settings: RunSettings,
    environ: Mapping[str, str],
    relay: SignalRelay,
    lease: SlotLease,
) -> Outcome:
    from .run import command_environment, supervise

    assert lease.slot is not None
    env = command_environment(environ, lease)
    env["CRONGUARD_SLOT"] = lease.slot.iso
    if lease.takeover:
        env["CRONGUARD_TAKEOVER"] = "1"
    else:
        env.pop("CRONGUARD_TAKEOVER", None)
    return supervise(settings, env, relay, lease)


def _state(outcome: Outcome) -> str:
    """The slot's recorded state after a run; a run stopped because its lease
    was lost leaves the slot running, for a standby to take over."""
    if outcome.reason == "lost":
        return ""
    succeeded = outcome.reason == "exited" and outcome.returncode == 0
    return "done" if succeeded else "failed"


def _finish(
    lease: SlotLease, state: str, status: int, event: str = "finished",
    **fields: object,
) -> None:
    """Record the end of the run; a failure is logged and never changes the
    exit status (the lease then expires by itself)."""
    try:
        lease.finish(state, status, event=event, **fields)
    except StoreError as exc:
        log.warning("%s: could not record the end of slot %s; its lease expires "
                    "by itself: %s", lease.key,
                    lease.slot.iso if lease.slot else "?", exc)

