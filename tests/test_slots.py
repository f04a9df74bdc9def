"""Slot mode and standby takeover, with real servers and real processes.

Several hosts are simulated by cronguard processes with their own
``CRONGUARD_HOST_ID``.  Skew between hosts is injected without touching any
clock: each host's process is started at a moment chosen against the test
server's ``TIME``, less the measured start-up time of the command, so that
its claim reaches the server early or late by a known amount.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from conftest import Cronguard, away_from_boundary, server_ms
from servers import RedisServer

from cronguard.config import SlotSettings
from cronguard.schedule import CronSchedule, Interval, iso_utc
from cronguard.slots import SlotLease
from cronguard.store import Store, StoreSettings

SECOND = 1000


# Helpers


def wait_until(condition: Callable[[], Any], timeout: float = 15.0,
               what: str = "condition") -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout``."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        result = condition()
        if result:
            return result
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def clock_offset_ms(client: redis.Redis) -> float:
    """The server's clock minus this host's, in ms (best of a few samples)."""
    samples = []
    for _ in range(5):
        before = time.time()
        at = server_ms(client)
        after = time.time()
        samples.append((after - before, at - (before + after) / 2 * 1000))
    return min(samples)[1]


def events(client: redis.Redis, key: str) -> list[tuple[int, dict[str, str]]]:
    """The run stream: (server ms of the entry, fields) pairs."""
    entries = client.xrange(f"cronguard:{{{key}}}:runs")
    return [
        (int(entry_id.decode().split("-")[0]),
         {k.decode(): v.decode() for k, v in fields.items()})
        for entry_id, fields in entries
    ]


def slot_record(client: redis.Redis, key: str) -> dict[str, str]:
    raw = client.hgetall(f"cronguard:{{{key}}}:slot")
    return {k.decode(): v.decode() for k, v in raw.items()}


def read_env(path: Path) -> dict[str, str] | None:
    try:
        data: dict[str, str] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def process_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client()


# Many hosts, many short slots


def startup_ms(cronguard: Cronguard, client: redis.Redis, key: str,
               offset: float) -> float:
    """How long a cronguard process takes from start to its claim, in ms."""
    times = []
    for n in range(3):
        probe = f"{key}-probe{n}"
        started = time.time() * 1000
        result = cronguard("--every", "1h", "--key", probe, "--", "true")
        assert result.returncode == 0, result.stderr
        claimed = events(client, probe)[0][0]
        times.append(claimed - offset - started)
    return statistics.median(times)


def fire_hosts(
    cronguard: Cronguard,
    client: redis.Redis,
    key: str,
    tmp_path: Path,
    job: list[str],
    *,
    every_ms: int,
    offsets_ms: list[int],
    slots: int,
    extra: tuple[str, ...] = (),
) -> list[subprocess.Popen[str]]:
    """Fire one process per host per slot at boundary + its offset (server
    time), rotating the offsets so each host is early in some slots and late
    in others; wait for them all to end."""
    offset = clock_offset_ms(client)
    startup = startup_ms(cronguard, client, key, offset)
    first = (server_ms(client) // every_ms + 2) * every_ms
    firings = []
    for n in range(slots):
        boundary = first + n * every_ms
        for host in range(len(offsets_ms)):
            skew = offsets_ms[(host + n) % len(offsets_ms)]
            local = (boundary + skew - offset - startup) / 1000
            firings.append((local, host, n))
    firings.sort()
    processes = []
    for local, host, n in firings:
        delay = local - time.time()
        if delay > 0:
            time.sleep(delay)  # a schedule to keep, like cron's
        processes.append(cronguard.start(
            "-v", "--every", f"{every_ms}ms", "--key", key, *extra, "--",
            *job, "env", str(tmp_path / f"env-{host}-{n}.json"),
            CRONGUARD_HOST_ID=f"host{host}",
        ))
    for process in processes:
        process.wait(120)
    failed = [(p.returncode, p.stderr.read() if p.stderr else "")
              for p in processes if p.returncode]
    assert not failed, failed
    return processes


SLOT_SAID = re.compile(r"(?:claimed|skipped) slot (\d{4}-[-\dT:.]+Z)")
OVERLAP_SAID = "the previous run is still going"


def check_one_run_per_slot(
    client: redis.Redis, key: str, tmp_path: Path,
    processes: list[subprocess.Popen[str]],
) -> None:
    """Every slot that any host's claim landed in ran exactly once, unless the
    previous slot's run was still going then (a loaded machine can make a
    short run outlast a one-second slot); such a slot did not run at all."""
    history = events(client, key)
    started = [e for _, e in history if e["event"] == "started"]
    runs: dict[str, int] = {}
    for event in started:
        slot = iso_utc(int(event["slot_ms"]))
        runs[slot] = runs.get(slot, 0) + 1
    skipped = {iso_utc(int(e["slot_ms"])) for _, e in history
               if e["event"] == "skipped"}
    landed, overlapped = set(), set()
    for process in processes:
        assert process.stderr is not None
        text = process.stderr.read()
        said = SLOT_SAID.findall(text)
        assert len(said) == 1, text
        (overlapped if OVERLAP_SAID in text else landed).add(said[0])
    assert all(count == 1 for count in runs.values()), runs
    assert overlapped == skipped and not overlapped & set(runs)
    missed = landed - overlapped - set(runs)
    assert not missed, f"slots landed in but not run: {missed}"
    assert set(runs) <= landed

    envs = [e for p in sorted(tmp_path.glob("env-*.json")) if (e := read_env(p))]
    assert sorted(e["CRONGUARD_SLOT"] for e in envs) == sorted(runs)
    fences = [int(e["fence"]) for e in sorted(started, key=lambda e: e["slot_ms"])]
    assert fences == sorted(set(fences)), "fencing tokens must strictly increase"


def test_skewed_hosts_run_each_two_second_slot_exactly_once(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    processes = fire_hosts(
        cronguard, client, key, tmp_path, job, every_ms=2 * SECOND,
        offsets_ms=[-400, -100, 450], slots=5,
        extra=("--tolerance", "500ms", "--lease", "10s"),
    )
    assert all(p.returncode == 0 for p in processes)
    check_one_run_per_slot(client, key, tmp_path, processes)


def test_one_second_slots_with_default_tolerance(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    processes = fire_hosts(
        cronguard, client, key, tmp_path, job, every_ms=SECOND,
        offsets_ms=[-80, 30, 250], slots=5, extra=("--lease", "10s"),
    )
    assert all(p.returncode == 0 for p in processes)
    check_one_run_per_slot(client, key, tmp_path, processes)


def test_a_claim_within_the_tolerance_before_a_boundary_takes_the_coming_slot(
    redis_server: RedisServer, client: redis.Redis, key: str,
) -> None:
    """Host A's clock runs ahead: it claims 150 ms before the boundary by the
    server's clock; host B, on time, claims just after it.  Both land in the
    same slot, and only A runs it."""
    settings = SlotSettings(schedule=Interval(2), tolerance=0.4, lease=5.0,
                            overlap="skip", standby=0.0)
    store = Store(StoreSettings(url=redis_server.url))
    try:
        offset = clock_offset_ms(client)
        boundary = (server_ms(client) // 2000 + 1) * 2000
        if boundary - server_ms(client) < 400:
            boundary += 2000
        time.sleep((boundary - 150 - offset) / 1000 - time.time())
        early = SlotLease(store, key, settings).claim()
        arrived = server_ms(client)
        time.sleep(max(0.0, (boundary + 50 - offset) / 1000 - time.time()))
        on_time = SlotLease(store, key, settings).claim()
    finally:
        store.close()
    assert arrived < boundary + 250, "the early claim was too slow to test this"
    assert early.won and early.slot is not None
    assert early.slot.start_ms == boundary
    assert not on_time.won and on_time.slot == early.slot
    assert on_time.reason == "running"


# The command's environment, the record, the schedule


def test_the_command_learns_its_slot_and_fence(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    env_file = tmp_path / "env.json"
    result = cronguard("--schedule", "* * * * *", "--tz", "UTC", "--key", key,
                       "--", *job, "env", str(env_file), "exit", "3")
    assert result.returncode == 3
    assert result.stderr == ""
    env = read_env(env_file)
    assert env is not None
    (claimed, started), = [(at, e) for at, e in events(client, key)
                           if e["event"] == "started"]
    # The slot is the server's minute, counting the 5 s tolerance.
    slot = (claimed + 5000) // 60_000 * 60_000
    assert int(started["slot_ms"]) == slot
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(slot / 1000))
    assert env["CRONGUARD_SLOT"] == stamp
    assert env["CRONGUARD_FENCE"] == started["fence"]
    assert "CRONGUARD_TAKEOVER" not in env
    record = slot_record(client, key)
    assert record["state"] == "failed" and record["status"] == "3"

    again = cronguard("--schedule", "* * * * *", "--tz", "UTC", "--key", key,
                      "--", *job, "env", str(tmp_path / "again.json"))
    if (server_ms(client) + 5000) // 60_000 * 60_000 == slot:
        assert again.returncode == 0 and not (tmp_path / "again.json").exists()


def test_a_later_slot_runs_again_with_a_greater_fence(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    envs = []
    for n in range(2):
        path = tmp_path / f"env{n}.json"
        now = server_ms(client)
        time.sleep((500 - now % 500 + 60) / 1000)  # into the next slot
        assert cronguard("--every", "500ms", "--key", key, "--",
                         *job, "env", str(path)).returncode == 0
        envs.append(read_env(path))
    assert envs[0] and envs[1]
    # Whole seconds carry no fraction ("...:05Z" then "...:05.500Z"), so the
    # strings do not sort: compare the moments.
    slots = [datetime.fromisoformat(env["CRONGUARD_SLOT"]) for env in envs]
    assert slots[0] < slots[1]
    assert int(envs[0]["CRONGUARD_FENCE"]) < int(envs[1]["CRONGUARD_FENCE"])


def test_the_previous_run_still_going_skips_the_slot(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    ready = tmp_path / "ready"
    away_from_boundary(client, SECOND, 700)
    # The first run goes on until the test stops it.
    first = cronguard.start("--every", "1s", "--lease", "10s", "--key", key, "--",
                            *job, "ready", str(ready), "sleep", "60")
    wait_until(ready.exists, what="the first run")
    away_from_boundary(client, SECOND, 900)  # now in a later slot
    second = cronguard("-v", "--every", "1s", "--key", key, "--",
                       *job, "env", str(tmp_path / "second.json"))
    assert second.returncode == 0
    assert "the previous run is still going" in second.stderr
    assert not (tmp_path / "second.json").exists()
    first.send_signal(signal.SIGTERM)
    assert first.wait(20) == 128 + signal.SIGTERM
    skipped = [e for _, e in events(client, key) if e["event"] == "skipped"]
    assert skipped and skipped[0]["reason"] == "overlap"


def test_a_standby_claims_its_slot_once_the_previous_run_ends(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    every = 4 * SECOND
    ready, go = tmp_path / "ready", tmp_path / "go"
    away_from_boundary(client, every, 3 * SECOND)
    first = cronguard.start("--every", "4s", "--lease", "1s", "--key", key, "--",
                            *job, "ready", str(ready), "await", str(go))
    wait_until(ready.exists, what="the first run")
    away_from_boundary(client, every, every - 200)  # now in the next slot
    slot = iso_utc(server_ms(client) // every * every)
    second = cronguard.start("-v", "--every", "4s", "--lease", "1s", "--standby",
                             "3s", "--key", key, "--", *job, "env",
                             str(tmp_path / "second.json"), CRONGUARD_HOST_ID="b")
    wait_until(lambda: client.hexists(f"cronguard:{{{key}}}:skips", "b"),
               what="the standby to find the first run going")
    go.touch()  # the first run ends, well inside the second slot
    assert first.wait(20) == 0
    assert second.wait(20) == 0
    assert second.stderr is not None
    assert "waits for an earlier run" in second.stderr.read()
    ran = read_env(tmp_path / "second.json")
    assert ran is not None and ran["CRONGUARD_SLOT"] == slot
    assert "CRONGUARD_TAKEOVER" not in ran
    kinds = [e["event"] for _, e in events(client, key)]
    assert kinds == ["started", "finished", "started", "finished"]
    assert slot_record(client, key)["state"] == "done"


def test_a_retried_claim_or_takeover_keeps_what_its_first_attempt_won(
    redis_server: RedisServer, client: redis.Redis, key: str,
) -> None:
    """A request retried after its answer was lost finds its own token and
    wins again with the same fence, instead of losing to itself."""
    store = Store(StoreSettings(url=redis_server.url))
    try:
        settings = slot_settings(Interval(3600), lease=0.3)
        first = SlotLease(store, key, settings)
        claim = first.claim()
        assert claim.won and claim.slot is not None
        fence = first.fence
        again = first.claim()
        assert again.won and first.fence == fence

        lease = f"cronguard:{{{key}}}:lease"
        wait_until(lambda: not client.exists(lease), what="the lease to expire")
        standby = SlotLease(store, key, settings)
        assert standby.take_over(claim.slot)[0]
        fence = standby.fence
        assert standby.take_over(claim.slot)[0] and standby.fence == fence
        assert fence is not None and first.fence is not None and fence > first.fence
    finally:
        store.close()


def test_overlap_allow_runs_the_next_slot_alongside(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    ready, second = tmp_path / "ready", tmp_path / "second.json"
    away_from_boundary(client, SECOND, 700)
    first = cronguard.start("--every", "1s", "--overlap", "allow", "--lease", "10s",
                            "--key", key, "--", *job, "ready", str(ready),
                            "sleep", "60")
    wait_until(ready.exists, what="the first run")
    away_from_boundary(client, SECOND, 900)
    result = cronguard("--every", "1s", "--overlap", "allow", "--key", key, "--",
                       *job, "env", str(second))
    assert result.returncode == 0, result.stderr
    assert first.poll() is None, "the first run should still be going"
    assert read_env(second) is not None
    first.send_signal(signal.SIGTERM)
    assert first.wait(20) == 128 + signal.SIGTERM


# Standby and takeover


def start_winner(cronguard: Cronguard, client: redis.Redis, key: str,
                 tmp_path: Path, job: list[str], *extra: str
                 ) -> tuple[subprocess.Popen[str], int]:
    """A first host that claims the slot and runs a long command; returns its
    cronguard process and the command's pid."""
    away_from_boundary(client, 3600 * SECOND, 60 * SECOND)
    ready = tmp_path / "ready-a"
    winner = cronguard.start(
        "--every", "1h", "--lease", "1s", *extra, "--key", key, "--",
        *job, "env", str(tmp_path / "env-a.json"), "ready", str(ready),
        "sleep", "60", CRONGUARD_HOST_ID="a",
    )
    return winner, int(wait_until(lambda: ready.exists() and ready.read_text(),
                                  what="the winner's command"))


def kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("kill_command", [True, False],
                         ids=["cronguard-and-command", "cronguard-only"])
def test_a_standby_takes_over_when_the_winner_is_killed(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str], kill_command: bool,
) -> None:
    winner, command_pid = start_winner(cronguard, client, key, tmp_path, job)
    standbys = {
        host: cronguard.start(
            "--every", "1h", "--lease", "1s", "--standby", "20s", "--key", key,
            "--", *job, "env", str(tmp_path / f"env-{host}.json"), "sleep", "0.5",
            CRONGUARD_HOST_ID=host,
        )
        for host in ("b", "c")
    }
    skips = f"cronguard:{{{key}}}:skips"
    wait_until(lambda: client.hlen(skips) == 2, what="both standbys to lose")

    winner.kill()
    if kill_command:
        kill(command_pid)
    winner.wait()

    taken = wait_until(
        lambda: [h for h in standbys if (tmp_path / f"env-{h}.json").exists()],
        what="a takeover")
    # The lost holder's command was stopped before the slot ran again.
    assert process_gone(command_pid)
    for process in standbys.values():
        assert process.wait(20) == 0

    runs = {h: read_env(tmp_path / f"env-{h}.json") for h in ("a", "b", "c")}
    took = [h for h in ("b", "c") if runs[h] is not None]
    assert took == taken[:1] and len(took) == 1, "exactly one standby takes over"
    original, takeover = runs["a"], runs[took[0]]
    assert original is not None and takeover is not None
    assert takeover["CRONGUARD_TAKEOVER"] == "1"
    assert takeover["CRONGUARD_SLOT"] == original["CRONGUARD_SLOT"]
    assert int(takeover["CRONGUARD_FENCE"]) > int(original["CRONGUARD_FENCE"])

    kinds = [e["event"] for _, e in events(client, key)]
    assert kinds == ["started", "takeover", "finished"]
    record = slot_record(client, key)
    assert record["state"] == "done" and record["takeover"] == "1"


def test_standbys_exit_quietly_when_the_winner_finishes(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    winner, _ = start_winner(cronguard, client, key, tmp_path, job)
    standby = cronguard.start(
        "--every", "1h", "--lease", "1s", "--standby", "60s", "--key", key, "--",
        *job, "env", str(tmp_path / "b.json"), CRONGUARD_HOST_ID="b")
    wait_until(lambda: client.hexists(f"cronguard:{{{key}}}:skips", "b"),
               what="the standby to lose")
    # The winner's run ends (stopped, so failed: it ran all the same).
    winner.send_signal(signal.SIGTERM)
    assert winner.wait(20) == 128 + signal.SIGTERM
    assert standby.wait(20) == 0
    assert standby.stderr is not None and standby.stderr.read() == ""
    assert not (tmp_path / "b.json").exists()
    assert [e["event"] for _, e in events(client, key)] == ["started", "finished"]
    assert slot_record(client, key)["state"] == "failed"


def test_without_a_standby_a_killed_slot_is_skipped_not_run_twice(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    winner, command_pid = start_winner(cronguard, client, key, tmp_path, job)
    winner.kill()
    kill(command_pid)
    winner.wait()
    lease = f"cronguard:{{{key}}}:lease"
    wait_until(lambda: not client.exists(lease), what="the lease to expire")

    for host in ("b", "c"):
        late = cronguard("-v", "--every", "1h", "--lease", "1s", "--key", key,
                         "--", *job, "env", str(tmp_path / f"env-{host}.json"),
                         CRONGUARD_HOST_ID=host)
        assert late.returncode == 0
        assert "claimed by a:" in late.stderr
        assert not (tmp_path / f"env-{host}.json").exists()
    assert [e["event"] for _, e in events(client, key)] == ["started"]
    assert slot_record(client, key)["state"] == "running"


def test_a_standby_does_not_take_over_while_the_holder_renews(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    winner, _ = start_winner(cronguard, client, key, tmp_path, job)
    # Several lease lengths of standing by, and none of them a takeover.
    standby = cronguard("-v", "--every", "1h", "--lease", "1s", "--standby", "3s",
                        "--key", key, "--", *job, "env", str(tmp_path / "b.json"),
                        CRONGUARD_HOST_ID="b")
    assert standby.returncode == 0
    assert "standby ended; slot" in standby.stderr
    assert not (tmp_path / "b.json").exists()
    assert winner.poll() is None
    winner.send_signal(signal.SIGTERM)
    assert winner.wait(20) == 128 + signal.SIGTERM


# Bad input


@pytest.mark.parametrize("args, words", [
    (["--every", "10s", "--ttl", "30s"], "--lease"),
    (["--every", "10s", "--wait", "5s"], "--standby"),
    (["--every", "10s", "--release"], "--release"),
    (["--every", "10s", "--schedule", "* * * * *"], "keep one"),
    (["--standby", "30s"], "--every"),
    (["--lease", "5s"], "--every"),
    (["--every", "10s", "--tz", "UTC"], "--tz"),
    (["--schedule", "* * *"], "five fields"),
    (["--schedule", "* * * * *", "--tz", "Nowhere/City"], "IANA"),
    (["--every", "2s", "--tolerance", "1s"], "half a slot"),
    (["--every", "soon"], "CRONGUARD_EVERY"),
    (["--every", "10s", "--overlap", "queue"], "CRONGUARD_OVERLAP"),
])
def test_contradictory_or_bad_slot_options_are_usage_errors(
    cronguard: Cronguard, client: redis.Redis, key: str, job: list[str],
    args: list[str], words: str,
) -> None:
    result = cronguard(*args, "--key", key, "--", *job)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cronguard: error: ")
    assert words in lines[0]
    assert not client.keys(f"cronguard:{{{key}}}:*")


def test_slot_options_come_from_the_environment_and_the_config_file(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    config = tmp_path / "cronguard.toml"
    config.write_text('every = "1h"\nlease = "7s"\n')
    env_file = tmp_path / "env.json"
    # A TTL-mode default from the environment does not get in the way.
    result = cronguard("--key", key, "--", *job, "env", str(env_file),
                       CRONGUARD_CONFIG=str(config), CRONGUARD_TTL="30s",
                       CRONGUARD_TOLERANCE="2s")
    assert result.returncode == 0, result.stderr
    (_, started), = [x for x in events(client, key) if x[1]["event"] == "started"]
    assert started["ttl_ms"] == "7000"
    assert int(started["slot_ms"]) % 3_600_000 == 0
    override = cronguard("--key", key + "x", "--", *job, "env", str(env_file),
                         CRONGUARD_CONFIG=str(config), CRONGUARD_LEASE="2s")
    assert override.returncode == 0
    (_, started), = [x for x in events(client, key + "x")
                     if x[1]["event"] == "started"]
    assert started["ttl_ms"] == "2000"


# Documentation


@pytest.mark.parametrize("option", ["--every", "--schedule", "--tz", "--tolerance",
                                    "--lease", "--overlap", "--standby"])
def test_slot_options_are_documented(cronguard: Cronguard, option: str) -> None:
    root = Path(__file__).resolve().parent.parent
    man = (root / "man" / "cronguard.1").read_text()
    readme = (root / "README.md").read_text()
    assert option.replace("-", "\\-") in man
    assert f"`{option}" in readme
    assert option in cronguard("run", "--help").stdout
    variable = "CRONGUARD_" + option[2:].upper()
    assert variable in readme


# In-process: the library's slot lease


def slot_settings(schedule: Interval | CronSchedule, **changes: Any) -> SlotSettings:
    fields: dict[str, Any] = {"schedule": schedule, "tolerance": 0.0, "lease": 5.0,
                              "overlap": "skip", "standby": 0.0, **changes}
    return SlotSettings(**fields)


def test_a_host_clock_far_off_still_claims_the_servers_slot(
    redis_server: RedisServer, client: redis.Redis, key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cron boundaries a host sends cover its own clock; when that clock
    is ten minutes fast, the server says so and the host asks again."""
    import cronguard.slots

    real_time = time.time
    monkeypatch.setattr(cronguard.slots.time, "time", lambda: real_time() + 600)
    schedule = CronSchedule("* * * * *", ZoneInfo("UTC"))
    store = Store(StoreSettings(url=redis_server.url))
    try:
        claim = SlotLease(store, key, slot_settings(schedule)).claim()
    finally:
        store.close()
    assert claim.won and claim.slot is not None
    assert claim.slot == schedule.slot_at(server_ms(client))


def test_renewals_keep_the_slot_record_while_the_run_outlasts_it(
    redis_server: RedisServer, client: redis.Redis, key: str,
) -> None:
    store = Store(StoreSettings(url=redis_server.url))
    try:
        lease = SlotLease(store, key, slot_settings(Interval(3600)))
        assert lease.claim().won
        record = f"cronguard:{{{key}}}:slot"
        client.pexpire(record, 200)  # as if the run had outlasted its slot
        lease.renew()
        assert client.pttl(record) > 50_000
        lease.finish("done", 0)
    finally:
        store.close()
    assert slot_record(client, key)["state"] == "done"
    assert not client.exists(f"cronguard:{{{key}}}:lease")


def test_a_signal_before_the_command_starts_leaves_the_slot_to_a_standby(
    redis_server: RedisServer, client: redis.Redis, key: str, job: list[str],
) -> None:
    from cronguard.config import RunSettings
    from cronguard.slots import run_slot
    from cronguard.supervise import SignalRelay

    values = {"every": "1h", "lease": "5s", "key": key, "redis": redis_server.url}
    settings = RunSettings.build([*job], values, {})
    relay = SignalRelay()
    relay.received.append(signal.SIGTERM)  # as if it came during the claim
    store = Store(settings.store)
    try:
        assert run_slot(settings, {}, store, relay) == 128 + signal.SIGTERM
    finally:
        store.close()
    assert [e["event"] for _, e in events(client, key)] == ["started", "interrupted"]
    assert slot_record(client, key)["state"] == "running"
    assert not client.exists(f"cronguard:{{{key}}}:lease")


def test_a_command_that_is_not_found_fails_the_slot(
    cronguard: Cronguard, client: redis.Redis, key: str,
) -> None:
    result = cronguard("--every", "1h", "--key", key, "--", "/nonexistent/job")
    assert result.returncode == 127
    assert [e["event"] for _, e in events(client, key)] == ["started", "failed"]
    assert slot_record(client, key)["state"] == "failed"
    assert not client.exists(f"cronguard:{{{key}}}:lease")


def test_a_standby_stopped_by_a_signal_exits_with_128_plus_it(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    winner, command_pid = start_winner(cronguard, client, key, tmp_path, job)
    standby = cronguard.start("--every", "1h", "--lease", "1s", "--standby", "60s",
                              "--key", key, "--", *job, CRONGUARD_HOST_ID="b")
    wait_until(lambda: client.hexists(f"cronguard:{{{key}}}:skips", "b"),
               what="the standby to lose")
    standby.send_signal(signal.SIGTERM)
    assert standby.wait(10) == 128 + signal.SIGTERM
    winner.send_signal(signal.SIGTERM)
    assert winner.wait(20) == 128 + signal.SIGTERM
    assert process_gone(command_pid)


@pytest.mark.parametrize("on_error, status", [("fail", 75), ("skip", 0)])
def test_a_standby_whose_store_stops_answering_gives_up(
    cronguard_bin: str, env: dict[str, str], private_redis: RedisServer, key: str,
    tmp_path: Path, job: list[str], on_error: str, status: int,
) -> None:
    cronguard = Cronguard(cronguard_bin, {**env, "CRONGUARD_REDIS": private_redis.url})
    client = private_redis.client()
    winner, _ = start_winner(cronguard, client, key, tmp_path, job)
    standby = cronguard.start(
        "--every", "1h", "--lease", "1s", "--standby", "60s", "--key", key,
        "--redis-timeout", "200ms", "--on-error", on_error, "--",
        *job, "env", str(tmp_path / "b.json"), CRONGUARD_HOST_ID="b")
    wait_until(lambda: client.hexists(f"cronguard:{{{key}}}:skips", "b"),
               what="the standby to lose")
    private_redis.pause()
    try:
        assert standby.wait(20) == status
    finally:
        private_redis.resume()
    assert standby.stderr is not None
    assert ("error" if on_error == "fail" else "warning") in standby.stderr.read()
    assert not (tmp_path / "b.json").exists()
    winner.send_signal(signal.SIGTERM)
    winner.wait(20)


def test_a_run_longer_than_its_lease_is_kept_alive_by_renewals(
    cronguard: Cronguard, client: redis.Redis, key: str, tmp_path: Path,
    job: list[str],
) -> None:
    # Each renewal must reach the watcher too, or it would stop the command
    # at the first lease's deadline.
    done = cronguard("--every", "10s", "--lease", "0.6s", "--key", key, "--",
                     *job, "sleep", "2", "exit", "7")
    assert done.returncode == 7, done.stderr
    record = client.hgetall(f"cronguard:{{{key}}}:slot")
    assert record[b"state"] == b"failed" and record[b"status"] == b"7"
