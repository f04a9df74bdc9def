"""The lock store: a connection to Redis, the job's key names, and the errors
that a store can answer with, turned into messages an operator can act on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .errors import StoreError, UsageError
from .keys import redis_key

log = logging.getLogger(__name__)

def _has_module(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None


DEFAULT_URL = "redis://localhost:6379/0"
SCHEMES = ("redis", "rediss", "unix")

# Two retries after the first attempt, 0.2 s and 0.4 s apart: enough to ride
# out a restart or a dropped connection, few enough that a dead store costs a
# cron slot at most about three times --redis-timeout.
RETRIES = 2
_BACKOFF = ExponentialBackoff(cap=0.4, base=0.1)

# No CLIENT SETINFO in the handshake: every firing on every host opens a fresh
# connection, and each command there is one more round trip.  redis-py 7.1 and
# later take driver_info=None; earlier versions take lib_name/lib_version.
QUIET_HANDSHAKE: dict[str, Any] = (
    {"driver_info": None}
    if hasattr(redis, "DriverInfo") or _has_module("redis.driver_info")
    else {"lib_name": None, "lib_version": None}
)


def redact(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}" if ":" in userinfo else netloc
    return f"{scheme}://{netloc}{slash}{path}"


def url_has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return False


@dataclass(frozen=True)
class StoreSettings:
    """Where the lock store is and how patiently to talk to it."""

    url: str = DEFAULT_URL
    password: str | None = None
    timeout: float = 2.0
    prefix: str = "cronguard"

    def validate(self) -> None:
        scheme = self.url.partition("://")[0].lower() if "://" in self.url else ""
        if scheme not in SCHEMES:
            raise UsageError(
                f"--redis: {redact(self.url)!r} is not a store URL; use "
                "redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH"
            )
        try:
            urlsplit(self.url).port  # noqa: B018 - parses and checks the port
        except ValueError as exc:
            raise UsageError(f"--redis: {redact(self.url)!r}: {exc}") from None


class Store:
    """A Redis deployment that holds leases, and the names of a job's keys.

    All of one job's keys share the hash tag ``{KEY}``, so in a Redis Cluster
    they live in one slot and a script may touch all of them.
    """

    def __init__(self, settings: StoreSettings) -> None:
        settings.validate()
        self.settings = settings
        self.description = redact(settings.url)
        self.client: redis.Redis = redis.Redis.from_url(
            settings.url,
            password=settings.password,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            retry=Retry(_BACKOFF, RETRIES),
            retry_on_error=[redis.exceptions.BusyLoadingError],
            # RESP2 needs no HELLO (redis-py 8 would send one for RESP3): on a
            # slow link the handshake is lease time lost, since the deadline
            # starts before the connection is made.
            protocol=2,
            **QUIET_HANDSHAKE,
        )

    def key(self, job: str, kind: str) -> str:
        return redis_key(self.settings.prefix, job, kind)

    def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` once; translate any failure into a ``StoreError``."""
        try:
            return self.client.eval(script, len(keys), *keys, *args)
        except redis.RedisError as exc:
            raise self.error(exc) from exc

    def error(self, exc: BaseException) -> StoreError:
        """Describe ``exc`` as the store's failure, with the fix for it."""
        where = self.description
        limit = f"{self.settings.timeout:g}s"
        if isinstance(exc, redis.AuthenticationError):
            text = (
                f"{where}: authentication failed ({exc}); check the password "
                "given by the URL, CRONGUARD_REDIS_PASSWORD or --redis-password-file"
            )
        elif isinstance(exc, redis.exceptions.NoPermissionError):
            text = (
                f"{where}: the Redis user may not do this ({exc}); grant it the "
                "commands listed under SECURITY in cronguard(1)"
            )
        elif isinstance(exc, redis.exceptions.ReadOnlyError):
            text = (
                f"{where} is a read-only replica; point --redis (CRONGUARD_REDIS) "
                "at the primary, or use redis+sentinel://"
            )
        elif isinstance(exc, redis.TimeoutError):
            text = (
                f"{where}: no answer within {limit} (after {RETRIES} retries); the "
                "server may be paused, overloaded or unreachable "
                "(--redis-timeout / CRONGUARD_REDIS_TIMEOUT sets the limit)"
            )
        elif isinstance(exc, redis.ConnectionError):
            cause = str(exc).rstrip(".") or type(exc).__name__
            text = (
                f"cannot connect to {where}: {cause}; check that Redis runs there "
                "or point --redis (CRONGUARD_REDIS) at it"
            )
        else:
            text = f"{where}: {type(exc).__name__}: {exc}"
        return StoreError(text, where)

    def close(self) -> None:
        self.client.close()
