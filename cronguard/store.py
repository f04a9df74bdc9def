"""The lock store: a connection to Redis, the job's key names, and the errors
that a store can answer with, turned into messages an operator can act on.

One interface, several deployments, chosen by the URL's scheme in
``open_store``:

- ``redis://``, ``rediss://`` (TLS) and ``unix://``: one server (``Store``).
- ``redis+sentinel://H:P[,H:P...]/SERVICE[/DB]``, or ``rediss+sentinel://``
  for TLS to the sentinels and the data servers alike: the primary that
  Sentinel names (``SentinelStore``).  A primary that was demoted answers
  writes with READONLY; redis-py turns that into a connection error, asks
  Sentinel again and the request is retried on the new primary.  A lease is
  never taken on a replica: a replica refuses the acquire script's first
  write, so the script fails as a whole and the caller sees a
  ``StoreError``.
- ``redis+cluster://H:P[,H:P...]``, or ``rediss+cluster://`` for TLS to every
  node: a Redis Cluster (``ClusterStore``).  Every key of a job carries the
  hash tag ``{KEY}``, so each script touches one slot and redis-py sends it to
  that slot's primary, following MOVED and ASK.
- ``--redis`` three or more times: independent primaries voting on each
  lease (``quorum.QuorumStore``, driven by ``quorum.QuorumLease``).

TLS schemes verify the servers' certificates, against ``--tls-ca`` or else
the system's CAs, and present ``--tls-cert`` to servers that ask for one.

``--min-replicas N`` adds a ``WAIT`` after a won acquisition, behind a write
on the same connection (see ``Store.acknowledged_replicas``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import scripts
from .errors import StoreError, UsageError
from .keys import redis_key

log = logging.getLogger(__name__)

def _has_module(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None


DEFAULT_URL = "redis://localhost:6379/0"
SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
ALL_SCHEMES = (*SCHEMES, *SENTINEL_SCHEMES, *CLUSTER_SCHEMES)
TLS_SCHEMES = ("rediss", "rediss+sentinel", "rediss+cluster")

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


# An OpenSSL failure as Python's ssl module words it inside redis-py's message:
# "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ... (_ssl.c:1006)".
_SSL_FAILURE = re.compile(r"\[SSL: (\w+)\] ([^(]+)")


# What the ssl module says when the peer closes the connection without a TLS
# close: a server that wants a client certificate does so right after the
# handshake, and the client may be writing then rather than reading the alert.
_SSL_EOF = "EOF occurred in violation of protocol"


def _tls_failure(message: str) -> str | None:
    """The TLS problem named in ``message`` and its fix, or None if none is."""
    found = _SSL_FAILURE.search(message)
    if not found and _SSL_EOF in message:
        return (f"the server ended the TLS session at once ({_SSL_EOF}), as it "
                "does when it wants a client certificate it trusts; give one by "
                "--tls-cert (CRONGUARD_TLS_CERT) and --tls-key (CRONGUARD_TLS_KEY)")
    if not found:
        return None
    code, reason = found[1], found[2].strip().rstrip(".")
    if code == "CERTIFICATE_VERIFY_FAILED" and "mismatch" in reason:
        fix = ("give --redis (CRONGUARD_REDIS) the host names or addresses that "
               "the server certificates name")
    elif code == "CERTIFICATE_VERIFY_FAILED":
        fix = ("give the CA that signed the server certificates by --tls-ca "
               "(CRONGUARD_TLS_CA)")
    elif any(alert in code for alert in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE",
                                         "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")):
        fix = ("the server asks for a client certificate it trusts; give one by "
               "--tls-cert (CRONGUARD_TLS_CERT) and --tls-key (CRONGUARD_TLS_KEY)")
    else:
        fix = "check --tls-ca, --tls-cert and --tls-key against the server's TLS set-up"
    return f"TLS handshake failed ({reason}); {fix}"


def url_has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return False


class StoreSettings(NamedTuple):
    """Where the lock store is and how patiently to talk to it."""

    url: str = DEFAULT_URL
    password: str | None = None
    timeout: float = 2.0
    prefix: str = "cronguard"
    # Quorum mode: every node's URL (three or more), ``url`` being the first.
    nodes: tuple[str, ...] = ()
    sentinel_password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    min_replicas: int = 0

    @property
    def scheme(self) -> str:
        return scheme_of(self.url)

    def validate(self) -> None:
        for url in self.nodes or (self.url,):
            _validate_url(url, quorum=bool(self.nodes))
        if self.nodes and len(self.nodes) < 3:
            raise UsageError(
                f"--redis (CRONGUARD_REDIS) given {len(self.nodes)} times: quorum "
                "mode needs three or more independent servers, because a "
                "majority of two is both, so losing either one would stop every "
                "job; give one URL, or three or more"
            )
        if self.nodes and self.min_replicas:
            raise UsageError(
                "--min-replicas (CRONGUARD_MIN_REPLICAS) does not apply to quorum "
                "mode, whose nodes are independent primaries; drop one of them"
            )
        tls = [f for f in (self.tls_ca, self.tls_cert, self.tls_key) if f]
        if tls and not all(scheme_of(u) in TLS_SCHEMES
                           for u in self.nodes or (self.url,)):
            raise UsageError(
                "--tls-ca, --tls-cert and --tls-key apply to TLS stores only; "
                "change --redis (CRONGUARD_REDIS) to rediss://, rediss+sentinel:// "
                "or rediss+cluster://"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UsageError(
                "a client certificate needs its key: give both --tls-cert "
                "(CRONGUARD_TLS_CERT) and --tls-key (CRONGUARD_TLS_KEY)"
            )


def scheme_of(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def _validate_url(url: str, *, quorum: bool) -> None:
    scheme = scheme_of(url)
    if scheme not in ALL_SCHEMES:
        raise UsageError(
            f"--redis: {redact(url)!r} is not a store URL; use "
            "redis://HOST:PORT/DB, unix:///PATH, "
            "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] or "
            "redis+cluster://HOST:PORT[,HOST:PORT...]; for TLS rediss://, "
            "rediss+sentinel:// or rediss+cluster://"
        )
    if quorum and scheme not in SCHEMES:
        raise UsageError(
            f"--redis: {redact(url)!r}: quorum mode votes among independent "
            "servers; give each as redis://, rediss:// or unix://"
        )
    if scheme in (*SENTINEL_SCHEMES, *CLUSTER_SCHEMES):
        path = MultiHostURL.parse(url).path
        if scheme in SENTINEL_SCHEMES and (
            not 1 <= len(path) <= 2 or not (path[1:] or ["0"])[0].isdigit()
        ):
            raise UsageError(
                f"--redis: {redact(url)!r} names no service; use "
                f"{scheme}://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
            )
        if scheme in CLUSTER_SCHEMES and path not in ((), ("0",)):
            raise UsageError(
                f"--redis: {redact(url)!r}: a cluster has database 0 only; "
                "drop the path from the URL"
            )
        return
    try:
        urlsplit(url).port  # noqa: B018 - parses and checks the port
    except ValueError as exc:
        raise UsageError(f"--redis: {redact(url)!r}: {exc}") from None


class MultiHostURL(NamedTuple):
    """A Sentinel or Cluster URL: credentials, several hosts, then a path.

    ``urllib`` cannot parse a comma-separated host list, so this does.
    """

    scheme: str
    username: str | None
    password: str | None
    hosts: tuple[tuple[str, int], ...]
    path: tuple[str, ...]

    @classmethod
    def parse(cls, url: str) -> MultiHostURL:
        from urllib.parse import unquote

        scheme, _, rest = url.partition("://")
        netloc, _, path = rest.partition("/")
        path = path.partition("?")[0]
        userinfo, _, hostlist = netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        default_port = 26379 if scheme.lower() in SENTINEL_SCHEMES else 6379
        hosts = []
        for item in hostlist.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon:
                host, port = port, str(default_port)
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UsageError(
                    f"--redis: {redact(url)!r}: {item!r} is not HOST:PORT; list "
                    "the servers as HOST:PORT,HOST:PORT"
                )
            hosts.append((host, int(port)))
        return cls(
            scheme=scheme.lower(),
            username=unquote(user) or None,
            password=unquote(password) or None,
            hosts=tuple(hosts),
            path=tuple(unquote(p) for p in path.split("/") if p),
        )


class Store:
    """A Redis deployment that holds leases, and the names of a job's keys.

    All of one job's keys share the hash tag ``{KEY}``, so in a Redis Cluster
    they live in one slot and a script may touch all of them.
    """

    # Retries after a failed request; quorum nodes make none (see quorum).
    retries = RETRIES

    def __init__(self, settings: StoreSettings) -> None:
        settings.validate()
        self.settings = settings
        self.description = redact(settings.url)
        self.client: redis.Redis = self._connect()

    def _connect(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.settings.url,
            password=self.settings.password,
            retry=Retry(_BACKOFF, self.retries),
            **self._connection_options(),
        )

    def _connection_options(self) -> dict[str, Any]:
        """Options of every connection to a data server, whatever the topology."""
        settings = self.settings
        return {
            "socket_timeout": settings.timeout,
            "socket_connect_timeout": settings.timeout,
            "retry_on_error": [redis.exceptions.BusyLoadingError],
            "protocol": 2,  # RESP3 would cost a HELLO round trip per connection
            **QUIET_HANDSHAKE,
            **self._tls_options(),
        }

    def _tls_options(self) -> dict[str, Any]:
        """TLS for every connection of a TLS scheme, none for the others.

        redis-py verifies the certificate and the host name by default: the
        options name the CA (else the system's) and the client certificate.
        A ``rediss://`` URL alone makes ``from_url`` use TLS, and an ``ssl``
        beside it would reach the connection class as an unknown argument;
        Sentinel and Cluster clients take ``ssl=True``, with which Sentinel's
        pool makes ``SentinelManagedSSLConnection`` objects.
        """
        settings = self.settings
        if settings.scheme not in TLS_SCHEMES:
            return {}
        options: dict[str, Any] = {} if settings.scheme == "rediss" else {"ssl": True}
        if settings.tls_ca:
            options["ssl_ca_certs"] = settings.tls_ca
        if settings.tls_cert:
            options["ssl_certfile"] = settings.tls_cert
            options["ssl_keyfile"] = settings.tls_key
        return options

    def key(self, job: str, kind: str) -> str:
        return redis_key(self.settings.prefix, job, kind)

    def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` once; translate any failure into a ``StoreError``."""
        try:
            return self.client.eval(script, len(keys), *keys, *args)
        except redis.RedisError as exc:
            raise self.error(exc) from exc

    def acknowledged_replicas(self, key: str, token: str) -> int:
        """How many replicas have the lease ``key`` held with ``token``.

        WAIT counts the replicas that have every write of *its own
        connection*, and the acquisition may have used another one (a pool,
        a retry, a reconnection).  So a write that changes nothing,
        ``scripts.TOUCH``, goes first on the same connection, in one pipeline
        with the WAIT: replicas that acknowledge it have the lease too.  If
        the lease is not this holder's any more, no replica counts.
        """
        timeout = self.settings.timeout
        pipe = self._node_client(key).pipeline(transaction=False)
        pipe.eval(scripts.TOUCH, 1, key, token)
        # Answered before the socket timeout, which is the same limit.
        pipe.execute_command(  # type: ignore[no-untyped-call]
            "WAIT", self.settings.min_replicas, max(1, round(timeout * 800))
        )
        try:
            touched, acked = pipe.execute()
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise self.error(exc) from exc
        return int(acked) if touched else 0

    def connected_replicas(self, key: str) -> int | None:
        """How many replicas the primary that holds ``key`` has, if it says."""
        try:
            info = self._node_client(key).info("replication")
        except redis.RedisError:
            return None
        return int(info.get("connected_slaves", 0))

    def _node_client(self, key: str) -> redis.Redis:
        return self.client

    def error(self, exc: BaseException) -> StoreError:
        """Describe ``exc`` as the store's failure, with the fix for it."""
        where = self.description
        limit = f"{self.settings.timeout:g}s"
        tls = _tls_failure(str(exc))
        if tls:
            text = f"{where}: {tls}"
        elif isinstance(exc, redis.AuthenticationError):
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
        elif isinstance(exc, redis.sentinel.MasterNotFoundError):
            # redis-py's message lists every sentinel client's repr: too long
            # for one line, so only its verdict is kept.
            if "AuthenticationError" in str(exc) or "NOAUTH" in str(exc):
                text = (
                    f"{where}: the sentinels refused the password; give theirs "
                    "by CRONGUARD_SENTINEL_PASSWORD or --sentinel-password-file"
                )
            else:
                text = (
                    f"{where}: no sentinel answered with a primary for the "
                    "service; check that the sentinels run and that the service "
                    "name in --redis (CRONGUARD_REDIS) is theirs"
                )
        elif isinstance(exc, (redis.exceptions.ClusterDownError,
                              redis.exceptions.RedisClusterException)):
            text = (
                f"{where}: the cluster cannot serve the job's slot ({exc}); a "
                "shard may be failing over or the nodes in --redis "
                "(CRONGUARD_REDIS) are not reachable"
            )
        elif isinstance(exc, redis.TimeoutError):
            text = (
                f"{where}: no answer within {limit} (after {self.retries} "
                "retries); the server may be paused, overloaded or unreachable "
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


class SentinelStore(Store):
    """The primary of a Sentinel-managed service, found and followed by redis-py.

    The URL's password is the data servers' password.  Sentinels often have
    one of their own (``requirepass`` in sentinel.conf): it comes from
    ``CRONGUARD_SENTINEL_PASSWORD`` or ``--sentinel-password-file``.  TLS
    (``rediss+sentinel://``) is all or nothing: the sentinels and the data
    servers are reached with the same CA and client certificate, as they are
    set up with ``tls-port`` and ``tls-replication yes`` on every one.

    WARNING: after a forced failover the old primary goes on accepting writes
    until the sentinels demote it, seconds later.  A holder whose connection
    stays open to it would renew there while its lease ages out on the new
    primary, and another host would win it::

        holder   |--renew on old--|--renew on old--|        (believes it holds)
        new      |--lease copy, TTL running down--|  other host acquires

    So every request after the first asks a sentinel where the primary is
    (one round trip to a sentinel, paid by renewals and the release, not by
    the acquisition of a fresh process, which has just asked) and drops the
    connection when the answer has changed.
    """

    _asked = False

    def error(self, exc: BaseException) -> StoreError:
        return super().error(self._sentinels_cause(exc))

    def _sentinels_cause(self, exc: BaseException) -> BaseException:
        """What hid behind "no sentinel answered", if it was TLS.

        redis-py's ``MasterNotFoundError`` lists each sentinel's failure, but
        redis-py 8 shows an exception by its class alone, which hides a
        certificate that did not verify.  So one sentinel is asked once more,
        on this failure path only, and its error is the cause when it names
        a TLS problem.  Not when any sentinel timed out: asking again could
        cost another --redis-timeout.
        """
        listed = str(exc)
        if (not isinstance(exc, redis.sentinel.MasterNotFoundError)
                or self.settings.scheme not in TLS_SCHEMES
                or _tls_failure(listed) or "ConnectionError" not in listed
                or "TimeoutError" in listed):
            return exc
        pool: Any = self.client.connection_pool  # a SentinelConnectionPool
        try:
            pool.sentinel_manager.sentinels[0].ping()
        except redis.ConnectionError as cause:
            if _tls_failure(str(cause)):
                return cause
        except redis.RedisError:
            pass
        return exc

    def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if self._asked:
            self._follow_primary()
        self._asked = True
        return super().eval(script, keys, args)

    def _follow_primary(self) -> None:
        pool: Any = self.client.connection_pool  # a SentinelConnectionPool
        try:
            # Disconnects idle connections when the primary has moved.
            pool.get_master_address()
        except redis.RedisError as exc:
            # The primary may well be fine; if it was demoted meanwhile, it
            # refuses writes with READONLY and the request fails safely.
            log.debug("%s: no sentinel answered (%s); using the last primary",
                      self.description, exc)

    def _connect(self) -> redis.Redis:
        from redis.sentinel import Sentinel

        parsed = MultiHostURL.parse(self.settings.url)
        if not parsed.path or len(parsed.path) > 2:
            raise UsageError(
                f"--redis: {self.description!r} names no service; use "
                f"{parsed.scheme}://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
            )
        service = parsed.path[0]
        db = parsed.path[1] if len(parsed.path) > 1 else "0"
        if not db.isdigit():
            raise UsageError(
                f"--redis: {self.description!r}: {db!r} is not a database number"
            )
        options = self._connection_options()
        sentinel_options = {
            key: options[key]
            for key in ("socket_timeout", "socket_connect_timeout", "protocol",
                        *QUIET_HANDSHAKE, *self._tls_options())
        }
        # No retries per sentinel: asking the next sentinel is the retry, and
        # redis-py's default would retry even a refused password with backoff.
        sentinel_options["retry"] = Retry(_BACKOFF, 0)
        if self.settings.sentinel_password:
            sentinel_options["password"] = self.settings.sentinel_password
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(parsed.hosts), sentinel_kwargs=sentinel_options
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            service,
            username=parsed.username,
            password=self.settings.password or parsed.password,
            db=int(db),
            retry=Retry(_BACKOFF, self.retries),
            **options,
        )
        return client


class ClusterStore(Store):
    """A Redis Cluster.  A job's keys share one slot, so every script goes to
    one shard's primary; redis-py follows MOVED/ASK and refreshes the slot map
    after a shard fails over.

    The client is made on first use: making it asks the cluster for its slot
    map, and a failure then is the store's failure like any other.
    """

    def __init__(self, settings: StoreSettings) -> None:
        settings.validate()
        self.settings = settings
        self.description = redact(settings.url)
        self._cluster: Any = None

    @property
    def client(self) -> Any:
        if self._cluster is None:
            self._cluster = self._connect_cluster()
        return self._cluster

    @client.setter
    def client(self, value: Any) -> None:
        self._cluster = value

    def _connect_cluster(self) -> Any:
        from redis.cluster import ClusterNode, RedisCluster

        parsed = MultiHostURL.parse(self.settings.url)
        if parsed.path and parsed.path != ("0",):
            raise UsageError(
                f"--redis: {self.description!r}: a cluster has database 0 only; "
                "drop the path from the URL"
            )
        options = self._connection_options()
        try:
            return RedisCluster(
                startup_nodes=[
                    ClusterNode(host, port)  # type: ignore[no-untyped-call]
                    for host, port in parsed.hosts
                ],
                username=parsed.username,
                password=self.settings.password or parsed.password,
                retry=Retry(_BACKOFF, self.retries + 1),
                **options,
            )
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise self.error(exc) from exc

    def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self.client.eval(script, len(keys), *keys, *args)
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise self.error(exc) from exc

    def _node_client(self, key: str) -> redis.Redis:
        node = self.client.get_node_from_key(key)
        client: redis.Redis = self.client.get_redis_connection(node)
        return client

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()


def open_store(settings: StoreSettings) -> Store:
    """The store for ``settings``: one server, Sentinel, Cluster or a quorum."""
    settings.validate()
    if settings.nodes:
        from .quorum import QuorumStore

        return QuorumStore(settings)
    if settings.scheme in SENTINEL_SCHEMES:
        return SentinelStore(settings)
    if settings.scheme in CLUSTER_SCHEMES:
        return ClusterStore(settings)
    return Store(settings)
