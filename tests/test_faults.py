"""The safety rules under real faults.

Every test here breaks something for real: it stops redis-server with SIGSTOP
or CLIENT PAUSE, kills and restarts it, freezes or kills cronguard, puts a
fault-injecting proxy between cronguard and Redis, or cuts a host off in a
network namespace.  The oracle is what a user relies on: when the command got
SIGTERM (the fixture job writes the moment down), cronguard's exit status,
and whose lease Redis holds afterwards.

Times are compared on one clock: the job's ``time.time_ns()`` and the Redis
server's clock (the ID of the run stream's ``started`` event), both this
machine's wall clock.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Cronguard
from faultproxy import FaultProxy
from servers import RedisServer, server_binary

# How late the command may get SIGTERM after the lease deadline: the
# supervisor's wake-up and the job's signal handler, on a busy 2-core machine.
MARGIN = 0.35

StartHost = Callable[..., tuple[subprocess.Popen[str], Path]]


def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def wait_file(path: Path, timeout: float = 10.0) -> str:
    until(lambda: path.exists() and path.stat().st_size > 0, timeout, str(path))
    return path.read_text()


def term_ns(path: Path, timeout: float = 10.0) -> int:
    """When the job wrote down its SIGTERM (``job.py on-term``)."""
    return int(wait_file(path, timeout).split()[2])


def acquired_ns(client: object, key: str, host: str | None = None) -> int:
    """Server time of the lease's acquisition, from its ``started`` event."""
    entries = client.xrange(f"cronguard:{{{key}}}:runs")  # type: ignore[attr-defined]
    for entry_id, fields in entries:
        if fields[b"event"] == b"started" and (
            host is None or fields[b"host"] == host.encode()
        ):
            return int(entry_id.split(b"-")[0]) * 1_000_000
    pytest.fail(f"no started event for {key} ({host or 'any host'})")


def lease_of(client: object, key: str) -> dict[str, object] | None:
    value = client.get(f"cronguard:{{{key}}}:lease")  # type: ignore[attr-defined]
    if value is None:
        return None
    return dict(json.loads(value.decode().partition(" ")[2]))


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie nobody has reaped yet counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rpartition(")")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


@pytest.fixture
def host_b(
    cronguard: Cronguard, job: list[str], tmp_path: Path
) -> Iterator[StartHost]:
    """Start a second host that waits for the lease and then runs for a while."""
    started: list[subprocess.Popen[str]] = []

    def start(key: str, url: str, *options: str) -> tuple[subprocess.Popen[str], Path]:
        ready = tmp_path / "b-ready"
        process = cronguard.start(
            "--key", key, "--ttl", "30s", "--wait", "20s", *options, "--",
            *job, "ready", str(ready), "sleep", "60",
            CRONGUARD_REDIS=url, CRONGUARD_HOST_ID="host-b",
        )
        started.append(process)
        return process, ready

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(20)


# 1. The store stops answering while the command runs.

def _sigstop(server: RedisServer, seconds: float) -> Callable[[], None]:
    server.pause()
    return server.resume


def _client_pause(server: RedisServer, seconds: float) -> Callable[[], None]:
    # CLIENT UNPAUSE would itself wait behind the pause, so the pause is given
    # its length up front and "resuming" means waiting for the server to answer.
    with server.client() as client:
        client.execute_command("CLIENT", "PAUSE", round(seconds * 1000), "ALL")

    def resumed() -> None:
        until(lambda: _answers(server), seconds + 10, "the pause to end")

    return resumed


def _answers(server: RedisServer) -> bool:
    try:
        with server.client(socket_timeout=0.2) as client:
            return bool(client.ping())
    except Exception:
        return False


@pytest.mark.parametrize("pause", [_sigstop, _client_pause],
                         ids=["sigstop", "client-pause"])
def test_store_paused_past_the_lease_stops_the_command_by_the_deadline(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    private_redis: RedisServer, host_b: StartHost,
    pause: Callable[[RedisServer, float], Callable[[], None]],
) -> None:
    ttl = 2.0
    term, ready = tmp_path / "term", tmp_path / "ready"
    run = cronguard.start(
        "--key", key, "--ttl", f"{ttl}s", "--redis-timeout", "500ms", "--",
        *job, "on-term", str(term), "ready", str(ready), "sleep", "60",
        CRONGUARD_REDIS=private_redis.url, CRONGUARD_HOST_ID="host-a",
    )
    wait_file(ready)
    client = private_redis.client()
    acquired = acquired_ns(client, key)

    resume = pause(private_redis, ttl + 1.5)
    stopped = term_ns(term, timeout=ttl + 5)
    assert stopped - acquired <= (ttl + MARGIN) * 1e9, "stopped after the deadline"

    resume()
    second, second_ready = host_b(key, private_redis.url)
    wait_file(second_ready, timeout=25)
    assert run.wait(30) == 76
    assert "lease lost" in run.stderr.read()  # type: ignore[union-attr]
    holder = lease_of(client, key)
    assert holder is not None and holder["host"] == "host-b", holder
    assert client.pttl(f"cronguard:{{{key}}}:lease") > 25_000
    assert second.poll() is None, "the new holder was disturbed"


# 2. cronguard itself is frozen past its lease.

def test_frozen_cronguard_is_stopped_at_the_deadline_and_never_steals_back(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    private_redis: RedisServer, host_b: StartHost,
) -> None:
    ttl = 1.5
    term, ready = tmp_path / "term", tmp_path / "ready"
    run = cronguard.start(
        "--key", key, "--ttl", f"{ttl}s", "--", *job,
        "on-term", str(term), "ready", str(ready), "sleep", "60",
        CRONGUARD_REDIS=private_redis.url, CRONGUARD_HOST_ID="host-a",
    )
    wait_file(ready)
    client = private_redis.client()
    acquired = acquired_ns(client, key)

    os.kill(run.pid, signal.SIGSTOP)
    try:
        # Only the command's group keeps running; the watcher stops it once the
        # deadline passes, although cronguard cannot act.
        stopped = term_ns(term, timeout=ttl + 5)
        assert stopped - acquired <= (ttl + MARGIN) * 1e9
        second, second_ready = host_b(key, private_redis.url)
        wait_file(second_ready, timeout=25)
        assert stopped <= acquired_ns(client, key, "host-b"), "two holders overlapped"
        before = client.get(f"cronguard:{{{key}}}:lease")
        pttl_before = client.pttl(f"cronguard:{{{key}}}:lease")
    finally:
        os.kill(run.pid, signal.SIGCONT)

    assert run.wait(20) == 76, run.stderr.read()  # type: ignore[union-attr]
    after = client.get(f"cronguard:{{{key}}}:lease")
    assert after == before, "the old holder touched the new holder's lease"
    assert client.pttl(f"cronguard:{{{key}}}:lease") <= pttl_before, "renewed"
    assert second.poll() is None


# 3. The store restarts mid-run.

def test_restart_without_persistence_loses_the_lease_and_stops_the_command(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    private_redis: RedisServer,
) -> None:
    ttl = 3.0
    term, ready = tmp_path / "term", tmp_path / "ready"
    run = cronguard.start(
        "--key", key, "--ttl", f"{ttl}s", "--", *job,
        "on-term", str(term), "ready", str(ready), "sleep", "60",
        CRONGUARD_REDIS=private_redis.url,
    )
    wait_file(ready)
    acquired = acquired_ns(private_redis.client(), key)

    private_redis.kill()
    private_redis.start()
    stopped = term_ns(term, timeout=ttl + 5)
    assert stopped - acquired <= (ttl + MARGIN) * 1e9
    assert run.wait(20) == 76
    assert "another holder has it, or it expired" in run.stderr.read()  # type: ignore[union-attr]

    # Scripts go by EVAL, so a server that has never seen them runs them at once.
    again = cronguard("--key", key, "--", *job, "ready", str(tmp_path / "again"),
                      CRONGUARD_REDIS=private_redis.url)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again").exists()


def test_lease_survives_a_restart_with_aof_always(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path
) -> None:
    ttl = 3.0
    ready, done = tmp_path / "ready", tmp_path / "done"
    config = ["appendonly yes", "appendfsync always"]
    with RedisServer(tmp_path / "redis", config_lines=config) as server:
        run = cronguard.start(
            "--key", key, "--ttl", f"{ttl}s", "--release", "--", *job,
            "ready", str(ready), "sleep", str(ttl * 1.6), "finish", str(done),
            CRONGUARD_REDIS=server.url,
        )
        wait_file(ready)
        fence = lease_of(server.client(), key)
        server.kill()  # a crash: only what AOF fsynced comes back
        server.start()
        assert lease_of(server.client(), key) == fence

        assert run.wait(30) == 0, run.stderr.read()  # type: ignore[union-attr]
        assert done.exists(), "the command did not run to its end"
        again = cronguard("--key", key, "--", *job, "env", str(tmp_path / "env"),
                          CRONGUARD_REDIS=server.url)
        assert again.returncode == 0, again.stderr
        assert json.loads((tmp_path / "env").read_text())["CRONGUARD_FENCE"] == "2"


# 4. Latency, resets and black holes between cronguard and Redis.

@pytest.fixture
def proxy(private_redis: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", private_redis.port)) as faulty:
        yield faulty


@pytest.mark.parametrize("mode", ["blackhole", "reset"])
def test_unreachable_store_at_start_exits_75_in_bounded_time(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    proxy: FaultProxy, private_redis: RedisServer, mode: str,
) -> None:
    timeout = 0.5
    proxy.set(mode)
    began = time.monotonic()
    result = cronguard("--key", key, "--redis-timeout", f"{timeout}s", "--", *job,
                       "ready", str(tmp_path / "ran"), CRONGUARD_REDIS=proxy.url,
                       timeout=30)
    elapsed = time.monotonic() - began

    assert result.returncode == 75, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cronguard: error: "), lines
    assert "CRONGUARD_REDIS" in lines[0]
    assert not (tmp_path / "ran").exists()
    # Three attempts of --redis-timeout each, the backoff, and start-up.
    assert elapsed < 3 * timeout + 2.0, f"took {elapsed:.2f}s"
    assert lease_of(private_redis.client(), key) is None


def test_latency_below_the_limit_is_ridden_out(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path, proxy: FaultProxy
) -> None:
    proxy.set("delay", delay_ms=150)
    result = cronguard("--key", key, "--ttl", "1s", "--redis-timeout", "1s", "--",
                       *job, "sleep", "1.5", "ready", str(tmp_path / "done"),
                       CRONGUARD_REDIS=proxy.url)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "done").exists()


def test_connections_reset_once_mid_run_are_ridden_out(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path, proxy: FaultProxy
) -> None:
    ready, done = tmp_path / "ready", tmp_path / "done"
    run = cronguard.start("--key", key, "--ttl", "1.5s", "--", *job,
                          "ready", str(ready), "sleep", "3", "ready", str(done),
                          CRONGUARD_REDIS=proxy.url)
    wait_file(ready)
    proxy.set("reset")
    proxy.set("pass")
    assert run.wait(30) == 0, run.stderr.read()  # type: ignore[union-attr]
    assert done.exists()


@pytest.mark.parametrize(("mode", "delay_ms"),
                         [("blackhole", 0), ("reset", 0), ("delay", 3000)])
def test_store_lost_mid_run_gives_76_within_the_lease(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    proxy: FaultProxy, private_redis: RedisServer, mode: str, delay_ms: int,
) -> None:
    ttl, timeout = 2.0, 0.5
    term, ready = tmp_path / "term", tmp_path / "ready"
    run = cronguard.start(
        "--key", key, "--ttl", f"{ttl}s", "--redis-timeout", f"{timeout}s", "--",
        *job, "on-term", str(term), "ready", str(ready), "sleep", "60",
        CRONGUARD_REDIS=proxy.url,
    )
    wait_file(ready)
    acquired = acquired_ns(private_redis.client(), key)
    proxy.set(mode, delay_ms=delay_ms)

    stopped = term_ns(term, timeout=ttl + 5)
    assert stopped - acquired <= (ttl + MARGIN) * 1e9
    # The exit waits at most for one attempt to record the loss.
    assert run.wait(3 * timeout + 3) == 76


# 5. A host cut off from the network.

def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"cgprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"ip netns does not work here: {exc}"
    _ip("netns", "delete", probe)
    return None


@pytest.fixture
def partitionable(tmp_path: Path) -> Iterator[tuple[str, str, str, str]]:
    """Two namespaces joined by a veth pair on 169.254.77.0/30.

    The store side holds Redis and the second host; the first host's side is
    the one that gets cut off.  Yields (store ns, host ns, store address, host
    veth name).
    """
    reason = _netns_usable()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    store_ns, host_ns = f"cgstore{tag}", f"cghost{tag}"
    store_if, host_if = f"cgs{tag}", f"cgh{tag}"
    _ip("netns", "add", store_ns)
    _ip("netns", "add", host_ns)
    try:
        _ip("-n", store_ns, "link", "add", store_if, "type", "veth",
            "peer", "name", host_if, "netns", host_ns)
        _ip("-n", store_ns, "addr", "add", "169.254.77.1/30", "dev", store_if)
        _ip("-n", host_ns, "addr", "add", "169.254.77.2/30", "dev", host_if)
        for ns, dev in ((store_ns, store_if), (host_ns, host_if),
                        (store_ns, "lo"), (host_ns, "lo")):
            _ip("-n", ns, "link", "set", dev, "up")
        yield store_ns, host_ns, "169.254.77.1", host_if
    finally:
        for ns in (store_ns, host_ns):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def test_partitioned_host_is_stopped_and_another_takes_over(
    cronguard_bin: str, env: dict[str, str], job: list[str], key: str,
    tmp_path: Path, partitionable: tuple[str, str, str, str],
) -> None:
    store_ns, host_ns, address, host_if = partitionable
    port = 6390
    directory = tmp_path / "redis"
    directory.mkdir()
    config = directory / "redis.conf"
    config.write_text("\n".join([
        f"bind {address}", f"port {port}", f"dir {directory}", 'save ""',
        "appendonly no", "protected-mode no", f"logfile {directory / 'redis.log'}",
    ]) + "\n")
    server = subprocess.Popen(["ip", "netns", "exec", store_ns, server_binary(),
                               str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"redis://{address}:{port}/0"
    hosts: list[subprocess.Popen[str]] = []

    def start(ns: str, host: str, *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, cronguard_bin, "--key", key, *args],
            env={**env, "CRONGUARD_REDIS": url, "CRONGUARD_HOST_ID": host},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        hosts.append(process)
        return process

    try:
        probe = tmp_path / "probe"
        until(lambda: start(store_ns, "probe", "--release", "--", *job, "ready",
                            str(probe)).wait(10) == 0 and probe.exists(),
              10, "the store in its namespace")
        ttl = 2.0
        term, ready = tmp_path / "term", tmp_path / "ready"
        first = start(host_ns, "host-a", "--ttl", f"{ttl}s", "--redis-timeout",
                      "500ms", "--", *job, "on-term", str(term), "ready", str(ready),
                      "record", str(tmp_path / "runs"), "sleep", "60")
        wait_file(ready)

        _ip("-n", host_ns, "link", "set", host_if, "down")  # the partition
        cut = time.time_ns()
        second = start(store_ns, "host-b", "--ttl", "30s", "--wait", "20s", "--",
                       *job, "record", str(tmp_path / "runs"), "ready",
                       str(tmp_path / "b-ready"), "sleep", "60")
        stopped = term_ns(term, timeout=ttl + 5)
        assert stopped - cut <= (ttl + MARGIN) * 1e9
        wait_file(tmp_path / "b-ready", timeout=25)
        b_start = int((tmp_path / "runs").read_text().splitlines()[1].split()[3])
        assert stopped <= b_start, "the partitioned host overlapped the new holder"
        assert first.wait(20) == 76
        assert second.poll() is None
    finally:
        for process in hosts:
            if process.poll() is None:
                process.terminate()
                process.wait(20)
        server.terminate()
        server.wait(10)


# 6. cronguard is killed outright.

def test_sigkill_of_cronguard_leaves_no_process_of_the_group(
    cronguard: Cronguard, key: str, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    run = cronguard.start(
        "--key", key, "--", "sh", "-c", f'sleep 300 & echo "$$ $!" > {pids}; wait'
    )
    shell, sleeper = map(int, wait_file(pids).split())
    run.kill()
    run.wait(10)
    until(lambda: not alive(sleeper) and not alive(shell), 15,
          "the command's processes to be stopped")


def test_parent_death_signal_reaches_the_command_without_the_watcher(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path
) -> None:
    term, ready = tmp_path / "term", tmp_path / "ready"
    run = cronguard.start("--key", key, "--", *job, "on-term", str(term),
                          "ready", str(ready), "sleep", "60")
    command = int(wait_file(ready))
    watchers = [pid for pid in children(run.pid) if pid != command]
    assert len(watchers) == 1, children(run.pid)

    os.kill(watchers[0], signal.SIGKILL)  # only the kernel can tell it now
    run.kill()
    run.wait(10)
    term_ns(term, timeout=10)
    until(lambda: not alive(command), 10, "the command to exit")
