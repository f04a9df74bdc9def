"""Fixtures: real Redis servers, the installed command, a clean environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from servers import RedisServer

JOB = str(Path(__file__).with_name("job.py"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server shared by the session; tests keep apart by their keys."""
    with RedisServer(tmp_path_factory.mktemp("redis"), unix_socket=True) as server:
        yield server


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, for tests that pause, kill or restart it."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def key(request: pytest.FixtureRequest) -> str:
    """A job key no other test uses."""
    name = request.node.name.replace("[", "-").replace("]", "")[:60]
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def cronguard_bin() -> str:
    """The installed ``cronguard`` command (next to this Python, else on PATH)."""
    beside = Path(sys.executable).with_name("cronguard")
    found = str(beside) if beside.exists() else shutil.which("cronguard")
    if not found:
        pytest.fail("the cronguard command is not installed: pip install -e '.[test]'")
    return found


@pytest.fixture
def env(redis_server: RedisServer) -> dict[str, str]:
    """The caller's environment without cronguard settings, pointed at the server."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CRONGUARD_") and k != "REDIS_URL"
    }
    clean["CRONGUARD_REDIS"] = redis_server.url
    # An empty file: no /etc/cronguard.toml of this machine leaks in.
    clean["CRONGUARD_CONFIG"] = os.devnull
    return clean


class Cronguard:
    """Runs the installed command the way cron does: a fresh process each time."""

    def __init__(self, binary: str, env: dict[str, str]) -> None:
        self.binary = binary
        self.env = env

    def __call__(
        self, *args: str, timeout: float = 60, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [self.binary, *args],
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )


@pytest.fixture
def cronguard(cronguard_bin: str, env: dict[str, str]) -> Cronguard:
    return Cronguard(cronguard_bin, env)


@pytest.fixture
def job() -> list[str]:
    """The fixture program, ready to follow ``--``."""
    return [sys.executable, JOB]


def wait_for(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout``."""
    import time

    assert callable(predicate)
    until = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > until:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def server_ms(client: redis.Redis) -> int:
    """The server's clock, in ms since the epoch."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def away_from_boundary(client: redis.Redis, every_ms: int, margin_ms: int) -> None:
    """Wait, if need be, until the current slot of ``every_ms`` has
    ``margin_ms`` left by the server's clock, so that runs started next all
    fall in one slot."""
    import time

    now = server_ms(client)
    left = every_ms - now % every_ms
    if left < margin_ms:
        time.sleep((left + 100) / 1000)
