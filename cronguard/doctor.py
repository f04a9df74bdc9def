"""``cronguard doctor``: is this store fit to hold leases?

Each check prints one line, ``ok``, ``warn`` or ``FAIL`` first; the command
exits 1 when any check warns or fails.  The checks, in order:

- reachable: PING answers, and how fast (the median of a few round trips);
- server: version, mode (standalone, cluster, sentinel) and role; a replica
  refuses the writes a lease needs, a Sentinel holds no data at all;
- permissions: the ACL user may run every command cronguard sends, on keys
  under the prefix.  ``ACL DRYRUN`` answers this without side effects where
  the server has it (Redis 7) and the user may call it; otherwise each
  command is tried for real on scratch keys under ``PREFIX:{cronguard-doctor}``
  that are deleted again, which is what a run would meet;
- clock: the host clock's offset from the Redis clock (``TIME``);
- eviction: a ``maxmemory-policy`` other than ``noeviction`` may evict a
  lease, all-keys policies any key, volatile ones exactly the keys with a TTL,
  which every lease is;
- persistence: with neither RDB snapshots nor AOF, a restart forgets every
  lease and fencing counter, so a window may run twice and fences restart.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from .durations import format_duration
from .store import Store

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "FAIL"
# Beyond this the host's cron and the Redis clock disagree about which
# minute it is near its edges; beyond the larger one slot tolerance is spent.
CLOCK_WARN, CLOCK_FAIL = 1.0, 5.0
_PINGS = 5


@dataclass(frozen=True)
class Finding:
    level: str
    check: str
    text: str

    def __str__(self) -> str:
        return f"{self.level:<4}  {self.check}: {self.text}"


# Commands a run sends, with arguments that exercise the key patterns: EVAL
# itself, and every command the lease scripts call.  The doctor's scratch
# key stands in for the job's keys.
def _run_commands(prefix: str) -> list[tuple[str, ...]]:
    key = f"{prefix}:{{cronguard-doctor}}"
    return [
        ("EVAL", "return 1", "0"),
        ("GET", f"{key}:lease"),
        ("SET", f"{key}:lease", "probe", "PX", "10000"),
        ("PEXPIRE", f"{key}:lease", "10000"),
        ("PTTL", f"{key}:lease"),
        ("INCR", f"{key}:fence"),
        ("XADD", f"{key}:runs", "MAXLEN", "~", "10", "*", "event", "doctor"),
        ("HINCRBY", f"{key}:skips", "doctor", "1"),
        ("TIME",),
        ("DEL", f"{key}:lease", f"{key}:fence", f"{key}:runs", f"{key}:skips"),
    ]


def _admin_commands(prefix: str) -> list[tuple[str, ...]]:
    key = f"{prefix}:{{cronguard-doctor}}"
    return [
        ("SCAN", "0", "MATCH", f"{prefix}:{{*}}:runs", "COUNT", "10"),
        ("XRANGE", f"{key}:runs", "-", "+", "COUNT", "1"),
        ("XREVRANGE", f"{key}:runs", "+", "-", "COUNT", "1"),
        ("HGETALL", f"{key}:skips"),
    ]


def _denied(exc: redis.RedisError) -> bool:
    return isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in str(exc)


def _command(client: Any, *args: str) -> Any:
    """One raw command; redis-py leaves ``execute_command`` untyped."""
    return client.execute_command(*args)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Doctor:
    """Runs the checks against ``store``; ``findings`` yields them one by one."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.client = store.client
        self.prefix = store.settings.prefix

    def findings(self) -> Iterator[Finding]:
        reachable = self.reachable()
        yield reachable
        if reachable.level == FAIL:
            return
        for check in (self.server, self.permissions, self.clock, self.eviction,
                      self.persistence):
            try:
                yield from check()
            except redis.RedisError as exc:
                name = check.__name__
                yield Finding(FAIL, name, f"could not check: {self.store.error(exc)}")

    # The checks

    def reachable(self) -> Finding:
        times = []
        try:
            for _ in range(_PINGS):
                sent = time.perf_counter()
                self.client.ping()
                times.append(time.perf_counter() - sent)
        except redis.RedisError as exc:
            return Finding(FAIL, "reachable", str(self.store.error(exc)))
        rtt = statistics.median(times)
        return Finding(OK, "reachable",
                       f"{self.store.description} answers PING in "
                       f"{rtt * 1000:.2f}ms (median of {_PINGS})")

    def server(self) -> Iterator[Finding]:
        info = self._info("server")
        version = info.get("valkey_version") or info.get("redis_version", "?")
        product = "Valkey" if "valkey_version" in info else "Redis"
        mode = str(info.get("redis_mode") or info.get("server_mode") or "standalone")
        if mode == "sentinel":
            scheme = ("rediss+sentinel" if self.store.settings.scheme == "rediss"
                      else "redis+sentinel")
            yield Finding(FAIL, "server",
                          f"{product} {version} is a Sentinel, which holds no "
                          f"data; use {scheme}://HOST:PORT/SERVICE in "
                          "--redis (CRONGUARD_REDIS)")
            return
        role = str(self._info("replication").get("role", "master"))
        role_name = "primary" if role == "master" else "replica"
        text = f"{product} {version}, {mode}, {role_name}"
        if role != "master":
            yield Finding(FAIL, "server",
                          f"{text}: a replica refuses the writes a lease needs; "
                          "point --redis (CRONGUARD_REDIS) at the primary")
            return
        yield Finding(OK, "server", text)

    def permissions(self) -> Iterator[Finding]:
        user = self._whoami()
        who = f"user {user}" if user else "this user"
        probe: Callable[[tuple[str, ...]], str | None]
        how = "ACL DRYRUN"
        if user and self._dryrun_works(user):
            def probe(command: tuple[str, ...]) -> str | None:
                return self._dryrun(user, command)
        else:
            how = "trying each command"
            probe = self._try
        for level, scope, commands in (
            (FAIL, "runs", _run_commands(self.prefix)),
            (WARN, "status, history, metrics", _admin_commands(self.prefix)),
        ):
            denied = [(command[0], reason) for command in commands
                      if (reason := probe(command)) is not None]
            names = ", ".join(sorted({command[0] for command in commands}))
            if not denied:
                yield Finding(OK, "permissions",
                              f"{who} may run {names} for {scope} ({how})")
                continue
            missing = " ".join(f"+{name.lower()}" for name, _ in denied)
            yield Finding(
                level, "permissions",
                f"{who} may not run {', '.join(n for n, _ in denied)} needed for "
                f"{scope}: {denied[0][1]}; grant them, e.g. ACL SETUSER "
                f"{user or 'USER'} {missing} ~{self.prefix}:*",
            )

    def clock(self) -> Iterator[Finding]:
        sent = time.time()
        seconds, micros = self.client.time()
        received = time.time()
        server = int(seconds) + int(micros) / 1_000_000
        offset = (sent + received) / 2 - server
        ahead = "ahead of" if offset >= 0 else "behind"
        text = (f"the host clock is {format_duration(abs(offset))} {ahead} the "
                f"Redis clock (within {format_duration((received - sent) / 2)})")
        if abs(offset) >= CLOCK_FAIL:
            yield Finding(FAIL, "clock", f"{text}; run NTP on this host")
        elif abs(offset) >= CLOCK_WARN:
            yield Finding(WARN, "clock", f"{text}; run NTP on this host")
        else:
            yield Finding(OK, "clock", text)

    def eviction(self) -> Iterator[Finding]:
        info = self._info("memory")
        policy = str(info.get("maxmemory_policy", "?"))
        limit = int(info.get("maxmemory", 0) or 0)
        when = (f"once maxmemory ({limit} bytes) is reached" if limit
                else "if maxmemory is ever set")
        if policy.startswith("allkeys-"):
            yield Finding(WARN, "eviction",
                          f"maxmemory-policy {policy} may evict any key {when}, "
                          "leases included; set maxmemory-policy noeviction")
        elif policy.startswith("volatile-"):
            yield Finding(WARN, "eviction",
                          f"maxmemory-policy {policy} evicts keys with a TTL {when}, "
                          "and every lease has one; set maxmemory-policy noeviction")
        else:
            yield Finding(OK, "eviction", f"maxmemory-policy {policy}")

    def persistence(self) -> Iterator[Finding]:
        aof = str(self._info("persistence").get("aof_enabled", "0")) == "1"
        save: str | None
        try:
            reply = self.client.config_get("save")
            save = _text(reply.get("save", "")) if isinstance(reply, dict) else None
        except redis.RedisError as exc:
            if not _denied(exc) and "unknown command" not in str(exc).lower():
                raise
            save = None  # CONFIG is often renamed or denied on managed servers
        if aof or save:
            kinds = [name for name, on in (("AOF", aof), (f"RDB save {save}", save))
                     if on]
            yield Finding(OK, "persistence", ", ".join(kinds))
        elif save is None:
            yield Finding(WARN, "persistence",
                          "AOF is off and CONFIG GET save is not allowed, so RDB "
                          "snapshots cannot be seen; make sure one is on")
        else:
            yield Finding(WARN, "persistence",
                          "neither RDB snapshots nor AOF: a restart forgets every "
                          "lease and fencing counter, so a window may run twice; "
                          "enable appendonly yes or save")

    # Helpers

    def _info(self, section: str) -> dict[str, Any]:
        info = self.client.info(section)
        return dict(info) if isinstance(info, dict) else {}

    def _whoami(self) -> str | None:
        try:
            return _text(_command(self.client, "ACL", "WHOAMI"))
        except redis.RedisError:
            # Not allowed to ask: the user the URL names, else the default one.
            from urllib.parse import urlsplit

            return urlsplit(self.store.settings.url).username or "default"

    def _dryrun(self, user: str, command: tuple[str, ...]) -> str | None:
        try:
            reply = _text(_command(self.client, "ACL", "DRYRUN", user, *command))
        except redis.ResponseError as exc:
            return str(exc)
        return None if reply == "OK" else reply

    def _dryrun_works(self, user: str) -> bool:
        try:
            _command(self.client, "ACL", "DRYRUN", user, "PING")
        except redis.RedisError:
            return False
        return True

    def _try(self, command: tuple[str, ...]) -> str | None:
        try:
            _command(self.client, *command)
        except redis.ResponseError as exc:
            if _denied(exc):
                return str(exc)
        return None
