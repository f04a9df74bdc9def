"""One firing of a guarded cron line: take the lease, run, give it back.

The exit status is decided here, from the outcome alone: what happens to the
lease after the command has ended is logged, never allowed to change it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from .config import RunSettings
from .errors import (
    CommandNotExecutable,
    CommandNotFound,
    StoreError,
)
from .lease import Lease
from .store import Store, open_store
from .supervise import Outcome, SignalRelay, Supervisor

log = logging.getLogger(__name__)

# cronguard's own secrets never reach the command.
_SECRET_VARIABLES = (
    "CRONGUARD_REDIS_PASSWORD",
    "CRONGUARD_REDIS_PASSWORD_FILE",
    "CRONGUARD_SENTINEL_PASSWORD",
    "CRONGUARD_SENTINEL_PASSWORD_FILE",
)


def command_environment(
    environ: Mapping[str, str], lease: Lease | None
) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k not in _SECRET_VARIABLES}
    if "CRONGUARD_REDIS" in env and "@" in env["CRONGUARD_REDIS"]:
        del env["CRONGUARD_REDIS"]
    if lease is not None:
        env["CRONGUARD_KEY"] = lease.key
        env["CRONGUARD_FENCE"] = str(lease.fence)
        env["CRONGUARD_HOLDER"] = lease.holder_id
    return env


def run(settings: RunSettings, environ: Mapping[str, str] | None = None) -> int:
    """Run ``settings.command`` under the lease; return cronguard's exit status."""
    environ = os.environ if environ is None else environ
    relay = SignalRelay()
    relay.install()
    store = open_store(settings.store)
    try:
        return _run(settings, environ, store, relay)
    finally:
        relay.restore()
        store.close()


def _run(
    settings: RunSettings, environ: Mapping[str, str], store: Store, relay: SignalRelay
) -> int:
    if settings.slot is not None:
        from .slots import run_slot

        return run_slot(settings, environ, store, relay)
    key = settings.key
    lease = _lease_class(store)(store, key, settings.ttl, renew=settings.renew)
    try:
        holder = lease.acquire(settings.wait, give_up=lambda: bool(relay.received))
    except StoreError as exc:
        return on_store_error(settings, environ, relay, exc)

    if holder is not None:
        log.info("%s: skipped, held by %s", key, holder)
        return settings.skip_exit
    if relay.first is not None:
        log.info("%s: interrupted by signal %d before the command started", key,
                 relay.first)
        _give_back(lease, release=True, event="interrupted", signal=relay.first)
        return 128 + relay.first

    try:
        outcome = supervise(settings, command_environment(environ, lease), relay, lease)
    except (CommandNotFound, CommandNotExecutable) as exc:
        _give_back(lease, release=True, event="failed", status=exc.exit_status)
        raise
    if lease.lost_silently:
        # The store stopped answering for a whole lease: the lease has expired
        # there, and another round of retries would only delay the exit.
        return outcome.status
    _give_back(
        lease,
        release=settings.release or outcome.reason == "lost",
        status=outcome.returncode,
        reason=outcome.reason,
        duration_ms=round(outcome.duration * 1000),
    )
    return outcome.status


def _lease_class(store: Store) -> type[Lease]:
    """``Lease``, or the quorum variant when the store is several servers."""
    if not store.settings.nodes:
        return Lease
    from .quorum import QuorumLease

    return QuorumLease


def on_store_error(
    settings: RunSettings,
    environ: Mapping[str, str],
    relay: SignalRelay,
    error: StoreError,
) -> int:
    """Apply --on-error to a store that failed before the command started."""
    if settings.on_error == "fail":
        raise error
    if settings.on_error == "skip":
        log.warning("%s: skipped, the store failed: %s", settings.key, error)
        return settings.skip_exit
    log.warning("%s: running without a lease, the store failed: %s",
                settings.key, error)
    env = command_environment(environ, None)
    return supervise(settings, env, relay, None).status


def supervise(
    settings: RunSettings,
    env: Mapping[str, str],
    relay: SignalRelay,
    lease: Lease | None,
) -> Outcome:
    """Run the command with ``env`` under ``lease`` (none: unguarded)."""
    supervisor = Supervisor(
        settings.command,
        env,
        relay=relay,
        lease=lease,
        timeout=settings.timeout,
        kill_after=settings.kill_after,
        on_lost=settings.on_lost,
    )
    outcome = supervisor.run()
    log.info("%s: command ended with status %d after %.3fs (%s)", settings.key,
             outcome.returncode, outcome.duration, outcome.reason)
    return outcome


def _give_back(
    lease: Lease, *, release: bool, event: str = "finished", **fields: object
) -> None:
    """Release the lease or shorten it to its minimum hold, and record how the
    run ended; a failure here is logged and never changes the exit status."""
    try:
        lease.release(hold=0.0 if release else lease.ttl, event=event, **fields)
    except StoreError as exc:
        log.warning("%s: could not give the lease back, it expires by itself: %s",
                    lease.key, exc)
