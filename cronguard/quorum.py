"""Quorum mode: one lease voted on by three or more independent Redis servers.

This is the Redlock scheme.  The same token is offered to every node at once;
the lease is held only when a majority granted it and time is left over::

    validity = TTL - (time since the first request was sent) - drift
    drift    = 1% of TTL + 2 ms   (clock rate differences between servers)

Each node gets a short limit (a tenth of the TTL, at most --redis-timeout)
and no retries, so one slow or frozen node cannot eat the validity.  An
attempt that fails for any reason removes its token from every node, so a
split vote between two contenders leaves nothing behind; a node that grants
after the clean-up has passed holds a token nobody renews, which expires.

Renewal counts only when a majority extended the lease; a majority that says
"not yours" means the lease is lost.

Fencing.  Each node has its own counter, and the counters drift apart: two
holders that win on different majorities could otherwise be handed fences
out of order::

    counters   n1=10  n2=3  n3=3
    holder A   wins n1, n2: fence max(11, 4) = 11
    holder B   later wins n2, n3: fence max(5, 4) = 5    (goes backwards)

So acquisition has a second step before the lease counts: on every node
where the holder still has the lease, the counter is raised to the chosen
fence (``scripts.QUORUM_CONFIRM``), and a majority must confirm within the
validity.  Any later holder's majority shares a node with that majority, a
node where the later holder could only win after this lease ended there, so
its INCR starts above this fence.  The guarantee is: fences strictly
increase while no node loses its data.  A node restarted without
persistence forgets its counter and its lease; the majority argument then no
longer holds for the leases it had granted (run nodes with ``appendfsync
always``, or keep a restarted node out for one TTL).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from . import scripts
from .durations import format_duration
from .errors import LeaseLost, QuorumUnavailable, StoreError, UsageError
from .lease import STREAM_LENGTH, Holder, Lease
from .store import Store, StoreSettings, redact

log = logging.getLogger(__name__)

# A node's answer: the script's reply, or the StoreError that stood for it.
Reply = Any


class _Node(Store):
    """One quorum member.  No retries: a retry would spend the validity that
    the other nodes' answers are counted against."""

    retries = 0


class QuorumStore(Store):
    """Three or more independent servers that vote on each lease.

    ``client`` is the first node's client, for commands that read history
    or status; those see what that node recorded.
    """

    def __init__(self, settings: StoreSettings) -> None:
        settings.validate()
        self.settings = settings
        self.description = "quorum of " + ", ".join(redact(u) for u in settings.nodes)
        self.nodes = [_Node(settings._replace(url=url, nodes=()))
                      for url in settings.nodes]
        self.client = self.nodes[0].client

    @property
    def majority(self) -> int:
        return len(self.nodes) // 2 + 1

    def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        # A single-server script's answer from one node, or from each node
        # separately, could claim a lease that no majority granted.
        raise UsageError(
            "quorum mode (--redis given three or more times) supports TTL-window "
            "runs only, not this; give --redis (CRONGUARD_REDIS) once"
        )

    def eval_all(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        limit: float,
        enough: Callable[[list[Reply | None]], bool] | None = None,
    ) -> list[Reply]:
        """Run ``script`` on every node at once; wait up to ``limit`` seconds.

        Returns one entry per node: its reply, or a ``StoreError`` when it
        failed or has not answered yet.  ``enough`` sees the replies so far
        (``None`` for a node still silent) and ends the wait early once they
        decide the outcome.
        """
        replies: list[Reply | None] = [None] * len(self.nodes)  # None: waiting
        done = threading.Condition()

        def call(index: int, node: Store) -> None:
            try:
                reply: Reply = node.eval(script, keys, args)
            except StoreError as exc:
                reply = exc
            with done:
                replies[index] = reply
                done.notify()

        for index, node in enumerate(self.nodes):
            # Daemon threads: one stuck on a frozen node must not hold up exit.
            threading.Thread(target=call, args=(index, node), daemon=True).start()
        until = time.monotonic() + limit
        with done:
            while any(reply is None for reply in replies):
                if enough is not None and enough(replies):
                    break
                left = until - time.monotonic()
                if left <= 0:
                    break
                done.wait(left)
            answered = list(replies)
        return [
            StoreError(
                f"{node.description}: no answer within {format_duration(limit)}",
                node.description,
            )
            if reply is None
            else reply
            for node, reply in zip(self.nodes, answered, strict=True)
        ]

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _decided(replies: list[Reply | None], majority: int) -> bool:
    """Do the answers so far settle a vote: a majority for, or so many nodes
    held by others that no majority remains?  Failed nodes do not end the
    wait: the silent ones decide whether this is a skip or a store failure."""
    granted = sum(map(_granted, replies))
    refused = sum(1 for r in replies if r is not None and _refused(r))
    return granted >= majority or refused > len(replies) - majority


def _granted(reply: Reply) -> bool:
    return isinstance(reply, list) and bool(reply[0])


def _refused(reply: Reply) -> bool:
    return isinstance(reply, list) and not reply[0]


class QuorumLease(Lease):
    """A ``Lease`` held by a majority of a ``QuorumStore``'s nodes."""

    store: QuorumStore

    def __init__(self, store: Store, key: str, ttl: float, **options: Any) -> None:
        if not isinstance(store, QuorumStore):
            raise TypeError("QuorumLease needs a QuorumStore")
        super().__init__(store, key, ttl, **options)

    @property
    def drift(self) -> float:
        return self.ttl * 0.01 + 0.002

    @property
    def node_limit(self) -> float:
        """How long one round of requests may take: far below the TTL."""
        return max(0.05, min(self.store.settings.timeout, self.ttl / 10))

    def _valid_until(self, sent: float) -> float:
        return sent + self.ttl - self.drift

    # Acquisition

    def try_acquire(self, **event: object) -> Holder | None:
        store, majority = self.store, self.store.majority
        count = len(store.nodes)
        sent = time.monotonic()
        replies = store.eval_all(
            scripts.ACQUIRE,
            [self.lease_key, self.fence_key, self.runs_key, self.skips_key],
            # No event fields: "started" is recorded once the vote is won.
            [self.token, self.ttl_ms, json.dumps(self.details), STREAM_LENGTH],
            limit=self.node_limit,
            enough=lambda r: _decided(r, majority),
        )
        grants = [r for r in replies if _granted(r)]
        if len(grants) >= majority and time.monotonic() < self._valid_until(sent):
            fence = max(int(r[1]) for r in grants)
            if self._confirm(fence, sent, event):
                self.fence = fence
                self.since_ms = min(int(r[2]) for r in grants)
                self.deadline = self._valid_until(sent)
                self.lost_reason = None
                log.info("%s: acquired on %d of %d nodes (fence %d, ttl %s)",
                         self.key, len(grants), count, fence,
                         format_duration(self.ttl))
                return None

        self._clean_up()
        return self._verdict(replies, len(grants), sent)

    def _confirm(self, fence: int, sent: float, event: dict[str, object]) -> bool:
        """Raise every granting node's counter to ``fence``; True when a
        majority did so within the validity."""
        majority = self.store.majority
        replies = self.store.eval_all(
            scripts.QUORUM_CONFIRM,
            [self.lease_key, self.fence_key, self.runs_key],
            [self.token, fence, STREAM_LENGTH,
             *self._fields("started", ttl_ms=self.ttl_ms, **event)],
            limit=max(0.0, min(self.node_limit,
                               self._valid_until(sent) - time.monotonic())),
            enough=lambda r: sum(map(_granted, r)) >= majority,
        )
        confirmed = sum(map(_granted, replies))
        if confirmed >= majority and time.monotonic() < self._valid_until(sent):
            return True
        log.warning("%s: the fence was confirmed by %d nodes, %d needed in time",
                    self.key, confirmed, majority)
        return False

    def _clean_up(self) -> None:
        """Take this attempt's token off every node (a failed vote)."""
        self.store.eval_all(
            scripts.RELEASE,
            [self.lease_key, self.runs_key],
            [self.token, 0, STREAM_LENGTH],
            limit=self.node_limit,
        )

    def _verdict(self, replies: list[Reply], granted: int, sent: float) -> Holder:
        """Why an attempt failed: the holder seen most, or a store error."""
        majority, count = self.store.majority, len(self.store.nodes)
        held = [r for r in replies if _refused(r)]
        errors = [r for r in replies if isinstance(r, StoreError)]
        if granted + len(held) < majority:
            causes = "; ".join(str(e) for e in errors)
            raise QuorumUnavailable(
                f"only {granted + len(held)} of {count} quorum nodes answered, "
                f"{majority} are needed: {causes}",
                self.store.description,
            )
        if not held:
            raise QuorumUnavailable(
                f"{granted} of {count} quorum nodes granted the lease, but a "
                "majority did not confirm it within its validity "
                f"({format_duration(time.monotonic() - sent)} spent); a node may "
                "be slow",
                self.store.description,
            )
        tokens = Counter(str(_text(r[1])).partition(" ")[0] for r in held)
        top = tokens.most_common(1)[0][0]
        value, pttl = next((r[1], r[2]) for r in held
                           if str(_text(r[1])).startswith(top + " "))
        if granted:
            log.info("%s: split vote: %d of %d nodes granted, %d needed",
                     self.key, granted, count, majority)
        return Holder.parse(value, int(pttl))

    def acquire(
        self,
        wait: float = 0.0,
        give_up: Callable[[], bool] | None = None,
        **event: object,
    ) -> Holder | None:
        """Like ``Lease.acquire``, with a random pause between attempts, so
        contenders that split a vote do not split the next one too; with
        ``wait``, a quorum that cannot decide is tried again as well."""
        until = time.monotonic() + wait
        while True:
            failure: StoreError | None = None
            try:
                holder = self.try_acquire(**event)
            except StoreError as exc:
                holder, failure = None, exc
            if holder is None and failure is None:
                return None
            left = until - time.monotonic()
            if left <= 0 or (give_up is not None and give_up()):
                if failure is not None:
                    raise failure
                return holder
            pause = random.uniform(0.05, 0.3)
            if holder is not None:
                pause = min(pause, max(holder.ttl_left, 0.01))
            log.debug("%s: not acquired (%s); trying again in %s", self.key,
                      failure or holder, format_duration(pause))
            time.sleep(min(pause, left))

    # Keeping and giving back

    def _extend(self, sent: float) -> float:
        """Extend the lease on every node; it counts when a majority did."""
        majority, count = self.store.majority, len(self.store.nodes)
        replies = self.store.eval_all(
            scripts.RENEW, [self.lease_key], [self.token, self.ttl_ms],
            limit=self.node_limit,
        )
        extended = sum(1 for r in replies if r == 1)
        refused = sum(1 for r in replies if r == 0)
        if extended >= majority:
            log.debug("%s: extended on %d of %d nodes", self.key, extended, count)
            return self._valid_until(sent)
        if refused > count - majority:
            self._lose(f"{refused} of {count} nodes no longer hold it for this run")
            raise LeaseLost(self.key, self.lost_reason or "")
        causes = "; ".join(str(r) for r in replies if isinstance(r, StoreError))
        raise QuorumUnavailable(
            f"renewed on {extended} of {count} nodes, {majority} needed: {causes}",
            self.store.description,
        )

    def release(
        self, *, hold: float = 0.0, event: str = "finished", **fields: object
    ) -> float:
        self.deadline = None
        replies = self.store.eval_all(
            scripts.RELEASE,
            [self.lease_key, self.runs_key],
            [self.token, max(0, round(hold * 1000)), STREAM_LENGTH,
             *self._fields(event, fence=self.fence, **fields)],
            limit=self.node_limit,
        )
        lefts = [int(r[0]) for r in replies if isinstance(r, list) and r[0] >= 0]
        failed = [r for r in replies if isinstance(r, StoreError)]
        if failed:
            # Info, not a warning: with one node down for a day, every run
            # would mail it.  The majority still decides; doctor reports nodes.
            log.info("%s: %d of %d nodes did not answer the release; the lease "
                     "expires there by itself", self.key, len(failed), len(replies))
        if not lefts:
            log.info("%s: not released: it was no longer held by this run", self.key)
            return -1.0
        left_ms = max(lefts)
        if left_ms > 0:
            log.info("%s: held for %s more", self.key, format_duration(left_ms / 1000))
        else:
            log.info("%s: released on %d nodes", self.key, len(lefts))
        return left_ms / 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
