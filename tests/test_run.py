"""The installed command, end to end, against a real Redis."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Cronguard, wait_for
from servers import RedisServer


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_twenty_hosts_firing_at_once_run_the_command_once(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"

    def fire(host: int) -> subprocess.CompletedProcess[str]:
        return cronguard(
            "--key",
            key,
            "--ttl",
            "30",
            "--",
            *job,
            "record",
            str(runs),
            CRONGUARD_HOST_ID=f"host-{host}",
        )

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(fire, range(20)))

    assert len(lines(runs)) == 1
    assert [r.returncode for r in results] == [0] * 20
    assert all(r.stdout == "" and r.stderr == "" for r in results), "not silent"


def test_lease_is_held_for_the_ttl_after_a_short_command(
    cronguard: Cronguard,
    job: list[str],
    key: str,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    runs = tmp_path / "runs"
    first = cronguard("--key", key, "--ttl", "20", "--", *job, "record", str(runs))
    second = cronguard("--key", key, "--ttl", "20", "--", *job, "record", str(runs))

    assert (first.returncode, second.returncode) == (0, 0)
    assert len(lines(runs)) == 1
    left = redis_server.client().pttl(f"cronguard:{{{key}}}:lease")
    assert 15_000 < left <= 20_000


def test_release_gives_the_lease_back_when_the_command_ends(
    cronguard: Cronguard,
    job: list[str],
    key: str,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    runs = tmp_path / "runs"
    for _ in range(3):
        done = cronguard("--key", key, "--release", "--", *job, "record", str(runs))
        assert done.returncode == 0
    assert len(lines(runs)) == 3
    assert not redis_server.client().exists(f"cronguard:{{{key}}}:lease")


def test_fence_grows_with_every_acquisition_and_reaches_the_command(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    for _ in range(3):
        cronguard("--key", key, "--release", "--", *job, "record", str(runs))
    fences = [int(line.split()[2]) for line in lines(runs)]
    assert fences == sorted(fences) and len(set(fences)) == 3


def test_command_environment(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path
) -> None:
    dump = tmp_path / "env.json"
    done = cronguard(
        "--key",
        key,
        "--",
        *job,
        "env",
        str(dump),
        CRONGUARD_HOST_ID="web-7",
        CRONGUARD_REDIS_PASSWORD="",
    )
    assert done.returncode == 0, done.stderr
    env = json.loads(dump.read_text())
    assert env["CRONGUARD_KEY"] == key
    assert int(env["CRONGUARD_FENCE"]) >= 1
    assert env["CRONGUARD_HOLDER"].startswith("web-7:")
    assert "CRONGUARD_REDIS_PASSWORD" not in env


def test_renewal_keeps_a_competitor_out_of_a_long_job(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path
) -> None:
    ready, runs, ends = tmp_path / "ready", tmp_path / "runs", tmp_path / "ends"
    ttl = 0.6
    holder = cronguard.start(
        "--key",
        key,
        "--ttl",
        str(ttl),
        "--",
        *job,
        "ready",
        str(ready),
        "record",
        str(runs),
        "sleep",
        "2.5",
        "finish",
        str(ends),
    )
    wait_for(ready.exists, what="the job to start")
    started = time.monotonic()
    attempts_after_ttl = 0
    while holder.poll() is None:
        other = cronguard(
            "--key", key, "--ttl", str(ttl), "--", *job, "record", str(runs)
        )
        assert other.returncode == 0
        if time.monotonic() - started > 2 * ttl:
            attempts_after_ttl += 1
    assert holder.wait() == 0
    assert attempts_after_ttl > 0, "no competitor fired after the first TTL"
    # The loop's last competitor may have started after the long job ended.
    first_end = int(lines(ends)[0].split()[2])
    starts = [int(line.split()[3]) for line in lines(runs)]
    assert [t for t in starts if t < first_end] == starts[:1]


@pytest.mark.parametrize("theft", ["deleted", "stolen"])
def test_lease_taken_away_mid_run_stops_the_command_with_76(
    cronguard: Cronguard,
    job: list[str],
    key: str,
    tmp_path: Path,
    redis_server: RedisServer,
    theft: str,
) -> None:
    ready, trapped = tmp_path / "ready", tmp_path / "signals"
    holder = cronguard.start(
        "--key",
        key,
        "--ttl",
        "1",
        "--kill-after",
        "1",
        "--",
        *job,
        "trap",
        str(trapped),
        "ready",
        str(ready),
        "sleep",
        "30",
    )
    wait_for(ready.exists, what="the job to start")
    lease = f"cronguard:{{{key}}}:lease"
    client = redis_server.client()
    if theft == "deleted":
        client.delete(lease)
    else:
        client.set(lease, "0" * 32 + ' {"host":"thief","pid":1}', px=30_000)
    started = time.monotonic()
    # The job traps SIGTERM and goes on, so SIGKILL after --kill-after ends it.
    status = holder.wait(timeout=30)
    assert status == 76
    assert "SIGTERM" in lines(trapped)
    assert time.monotonic() - started < 1 + 1 + 2
    if theft == "stolen":
        assert client.get(lease).startswith(b"0" * 32), "the thief's lease was touched"
    assert "lease lost" in holder.stderr.read()


def test_paused_redis_stops_the_command_at_the_lease_deadline(
    cronguard: Cronguard,
    job: list[str],
    key: str,
    tmp_path: Path,
    private_redis: RedisServer,
) -> None:
    ready = tmp_path / "ready"
    holder = cronguard.start(
        "--key",
        key,
        "--ttl",
        "1",
        "--redis-timeout",
        "0.2",
        "--kill-after",
        "1",
        "--",
        *job,
        "ready",
        str(ready),
        "sleep",
        "30",
        CRONGUARD_REDIS=private_redis.url,
    )
    wait_for(ready.exists, what="the job to start")
    private_redis.pause()
    paused = time.monotonic()
    try:
        status = holder.wait(timeout=20)
    finally:
        private_redis.resume()
    assert status == 76
    # The lease was at most one TTL from expiry; SIGTERM ends the sleep at once.
    assert time.monotonic() - paused < 1 + 1.5


def test_paused_redis_at_start_exits_75_within_the_bound(
    cronguard: Cronguard, job: list[str], key: str, private_redis: RedisServer
) -> None:
    private_redis.pause()
    started = time.monotonic()
    try:
        done = cronguard(
            "--key",
            key,
            "--redis-timeout",
            "0.3",
            "--",
            *job,
            CRONGUARD_REDIS=private_redis.url,
        )
    finally:
        private_redis.resume()
    assert done.returncode == 75
    assert time.monotonic() - started < 3 * 0.3 + 0.6 + 2
    assert done.stderr.count("\n") == 1 and "no answer within 0.3s" in done.stderr


def test_refused_connection_exits_75_with_one_line(
    cronguard: Cronguard, job: list[str], key: str, private_redis: RedisServer
) -> None:
    url = private_redis.url
    private_redis.stop()
    done = cronguard("--key", key, "--", *job, CRONGUARD_REDIS=url)
    assert done.returncode == 75
    assert done.stderr.startswith("cronguard: error: cannot connect to")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_on_error_skip_and_run(
    cronguard: Cronguard,
    job: list[str],
    key: str,
    tmp_path: Path,
    private_redis: RedisServer,
) -> None:
    url = private_redis.url
    private_redis.stop()
    runs = tmp_path / "runs"
    skipped = cronguard(
        "--key",
        key,
        "--on-error",
        "skip",
        "--skip-exit",
        "3",
        "--",
        *job,
        "record",
        str(runs),
        CRONGUARD_REDIS=url,
    )
    ran = cronguard(
        "--key",
        key,
        "--on-error",
        "run",
        "--",
        *job,
        "record",
        str(runs),
        "exit",
        "5",
        CRONGUARD_REDIS=url,
    )
    assert skipped.returncode == 3 and "warning" in skipped.stderr
    assert ran.returncode == 5 and "without a lease" in ran.stderr
    assert len(lines(runs)) == 1


def test_wait_takes_the_lease_once_the_holder_releases_it(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path
) -> None:
    ready, runs = tmp_path / "ready", tmp_path / "runs"
    holder = cronguard.start(
        "--key", key, "--release", "--", *job, "ready", str(ready), "sleep", "1"
    )
    wait_for(ready.exists, what="the first job to start")
    waiter = cronguard(
        "--key", key, "--release", "--wait", "20s", "--", *job, "record", str(runs)
    )
    assert holder.wait() == 0
    assert waiter.returncode == 0 and len(lines(runs)) == 1


def test_forwarded_signals_reach_the_command(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path
) -> None:
    ready, trapped = tmp_path / "ready", tmp_path / "signals"
    holder = cronguard.start(
        "--key",
        key,
        "--release",
        "--",
        *job,
        "trap",
        str(trapped),
        "ready",
        str(ready),
        "sleep",
        "30",
    )
    wait_for(ready.exists, what="the job to start")
    names = ["SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGINT", "SIGTERM"]
    for number, name in enumerate(names, 1):
        holder.send_signal(getattr(signal, name))
        wait_for(lambda n=number: len(lines(trapped)) == n, what=f"{name} to arrive")
    assert lines(trapped) == names
    os.kill(int(ready.read_text()), signal.SIGKILL)
    assert holder.wait(timeout=10) == 128 + signal.SIGKILL


def test_a_word_after_the_separator_is_always_the_command(
    cronguard: Cronguard, key: str, tmp_path: Path
) -> None:
    program = tmp_path / "status"
    program.write_text("#!/bin/sh\necho ran-status\nexit 9\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    path = f"{tmp_path}:{os.environ['PATH']}"
    implied = cronguard("--key", key, "--release", "--", "status", PATH=path)
    explicit = cronguard("run", "--key", key, "--release", "--", "status", PATH=path)
    assert (implied.returncode, implied.stdout) == (9, "ran-status\n")
    assert (explicit.returncode, explicit.stdout) == (9, "ran-status\n")


@pytest.mark.parametrize(
    ("steps", "options", "status"),
    [
        (["exit", "3"], [], 3),
        (["exit", "0"], [], 0),
        (["sleep", "30"], ["--timeout", "0.3"], 124),
    ],
)
def test_exit_status_of_a_run(
    cronguard: Cronguard,
    job: list[str],
    key: str,
    steps: list[str],
    options: list[str],
    status: int,
) -> None:
    done = cronguard("--key", key, "--release", *options, "--", *job, *steps)
    assert done.returncode == status


def test_a_command_killed_by_a_signal_gives_128_plus_n(
    cronguard: Cronguard, key: str
) -> None:
    done = cronguard("--key", key, "--release", "--", "sh", "-c", "kill -USR1 $$")
    assert done.returncode == 128 + signal.SIGUSR1


def test_timeout_escalates_to_sigkill_after_kill_after(
    cronguard: Cronguard, job: list[str], key: str
) -> None:
    started = time.monotonic()
    done = cronguard(
        "--key",
        key,
        "--timeout",
        "0.3",
        "--kill-after",
        "0.5",
        "--",
        *job,
        "ignore-term",
        "sleep",
        "30",
    )
    assert done.returncode == 124
    assert time.monotonic() - started < 10


def test_skip_has_its_own_status(
    cronguard: Cronguard, job: list[str], key: str
) -> None:
    cronguard("--key", key, "--ttl", "30", "--", *job)
    skipped = cronguard("--key", key, "--skip-exit", "42", "--", *job)
    assert (skipped.returncode, skipped.stderr) == (42, "")
    told = cronguard("-v", "--key", key, "--", *job)
    assert "skipped, held by" in told.stderr


@pytest.mark.parametrize(
    ("argv", "status"),
    [(["/nonexistent/program"], 127), (["/etc/hostname"], 126), (["/tmp"], 126)],
)
def test_a_command_that_cannot_start_gives_the_lease_back_at_once(
    cronguard: Cronguard,
    key: str,
    redis_server: RedisServer,
    argv: list[str],
    status: int,
) -> None:
    done = cronguard("--key", key, "--ttl", "60", "--", *argv)
    assert done.returncode == status
    assert done.stderr.count("\n") == 1
    assert not redis_server.client().exists(f"cronguard:{{{key}}}:lease")


def test_processes_left_in_the_group_do_not_outlive_the_run(
    cronguard: Cronguard, key: str, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    done = cronguard(
        "--key",
        key,
        "--kill-after",
        "1",
        "--",
        "sh",
        "-c",
        f"sleep 300 & echo $! > {pid_file}",
    )
    assert done.returncode == 0
    orphan = int(pid_file.read_text())
    wait_for(lambda: not _alive(orphan), timeout=5, what="the orphan to end")


def test_on_lost_ignore_keeps_the_command_running(
    cronguard: Cronguard,
    job: list[str],
    key: str,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    ready = tmp_path / "ready"
    holder = cronguard.start(
        "--key",
        key,
        "--ttl",
        "0.5",
        "--on-lost",
        "ignore",
        "--",
        *job,
        "ready",
        str(ready),
        "sleep",
        "1.5",
        "exit",
        "4",
    )
    wait_for(ready.exists, what="the job to start")
    redis_server.client().delete(f"cronguard:{{{key}}}:lease")
    assert holder.wait(timeout=20) == 4
    assert "lease lost" in holder.stderr.read()


def test_unix_socket_store(
    cronguard: Cronguard,
    job: list[str],
    key: str,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    runs = tmp_path / "runs"
    done = cronguard(
        "--key",
        key,
        "--",
        *job,
        "record",
        str(runs),
        CRONGUARD_REDIS=redis_server.unix_url,
    )
    assert done.returncode == 0, done.stderr
    assert redis_server.client().exists(f"cronguard:{{{key}}}:lease")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie awaiting its reaper counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
