"""Failovers under a running job: Sentinel (forced, and a killed primary) and
Cluster (CLUSTER FAILOVER, and a killed primary).  Each test breaks a
topology of its own.

The documented outcomes: when the lease reached the replica that takes over,
the run goes on and ends with the command's status while other hosts skip;
when the failover outlasts the lease, the command is stopped and cronguard
exits 76 before anyone else can take the lease.  Never two holders at once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Cronguard, wait_for
from servers import Cluster, RedisServer, SentinelSet

SKIP = 3


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def lease_key(key: str) -> str:
    return f"cronguard:{{{key}}}:lease"


def is_primary(server: RedisServer) -> bool:
    return str(server.client(decode_responses=True).info("replication")["role"]) == (
        "master"
    )


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    with SentinelSet(tmp_path / "sentinel", replicas=1) as topology:
        yield topology


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster") as topology:
        yield topology


class GuardedJob:
    """A run that holds the lease until told to finish, and a contender."""

    def __init__(self, cronguard: Cronguard, job: list[str], key: str, url: str,
                 directory: Path, ttl: str) -> None:
        self.cronguard, self.job, self.key, self.url = cronguard, job, key, url
        self.started, self.done = directory / "started", directory / "done"
        self.runs = directory / "runs"
        self.process = cronguard.start(
            "--key", key, "--ttl", ttl, "--release", "--kill-after", "500ms",
            "--", *job, "ready", str(self.started), "await", str(self.done),
            "record", str(self.runs), CRONGUARD_REDIS=url,
        )
        wait_for(self.started.exists, timeout=20, what="the guarded job to start")

    def contend(self) -> int:
        """Another host fires now; its status (SKIP when it finds the lease)."""
        result = self.cronguard("--key", self.key, "--skip-exit", str(SKIP), "--",
                                *self.job, "record", str(self.runs),
                                CRONGUARD_REDIS=self.url)
        return result.returncode

    def finish(self) -> int:
        self.done.touch()
        return self.process.wait(30)

    def check_one_holder(self) -> tuple[int, int]:
        """Contend, then finish; assert no two holders; return both statuses."""
        before = self.process.poll()
        contender = self.contend()
        status = self.finish()
        if contender == 0:
            # The contender ran: only allowed once the first had been stopped.
            assert before == 76, f"two holders: the first was still running ({before})"
            assert len(lines(self.runs)) == 1
        else:
            assert contender == SKIP
            assert status == 0, self.process.stderr and self.process.stderr.read()
            assert len(lines(self.runs)) == 1
        return status, contender


def test_sentinel_forced_failover_during_a_run(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    old = sentinels.current_primary()
    run = GuardedJob(cronguard, job, key, sentinels.url, tmp_path, ttl="3s")
    sentinels.sentinel_client().execute_command("SENTINEL", "FAILOVER",
                                                sentinels.service)
    wait_for(lambda: sentinels.current_primary() is not old
             and is_primary(sentinels.current_primary()), timeout=20,
             what="the failover")
    # A forced failover waits for the replica to catch up: the lease survives,
    # the run goes on and the contender skips.
    assert run.check_one_holder() == (0, SKIP)
    assert not sentinels.current_primary().client().exists(lease_key(key))


def test_sentinel_primary_killed_during_a_run(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    old = sentinels.current_primary()
    run = GuardedJob(cronguard, job, key, sentinels.url, tmp_path, ttl="6s")
    old.kill()
    wait_for(lambda: sentinels.current_primary() is not old
             and is_primary(sentinels.current_primary()), timeout=30,
             what="the sentinels to promote the replica")
    status, _ = run.check_one_holder()
    assert status in (0, 76)


@pytest.mark.parametrize("failover", ["forced", "killed"])
def test_sentinel_failover_during_acquisitions_with_min_replicas(
    cronguard_bin: str, env: dict[str, str], job: list[str], key: str,
    tmp_path: Path, sentinels: SentinelSet, failover: str,
) -> None:
    """Pairs of hosts race for fresh keys while the primary changes: each key
    runs at most once, and every lease that counted survives the failover."""
    old = sentinels.current_primary()

    def fire(round_: int) -> int:
        command = [cronguard_bin, "--key", f"{key}-{round_}", "--ttl", "30",
                   "--min-replicas", "1", "--redis-timeout", "500ms",
                   "--skip-exit", str(SKIP), "--redis", sentinels.url, "--",
                   *job, "record", str(tmp_path / f"runs{round_}")]
        return subprocess.run(command, env=env, capture_output=True,
                              timeout=60).returncode

    won: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        for round_ in range(6):
            if round_ == 2 and failover == "forced":
                sentinels.sentinel_client().execute_command(
                    "SENTINEL", "FAILOVER", sentinels.service)
            elif round_ == 2:
                old.kill()
            statuses = list(pool.map(fire, [round_, round_]))
            runs = lines(tmp_path / f"runs{round_}")
            assert len(runs) == statuses.count(0) <= 1, statuses
            assert set(statuses) <= {0, SKIP, 75}, statuses
            if 0 in statuses:
                won.append(round_)
    assert won, "no round ran at all"
    wait_for(lambda: sentinels.current_primary() is not old
             and is_primary(sentinels.current_primary()), timeout=30,
             what="the new primary")
    primary = sentinels.current_primary().client()
    for round_ in won:
        assert primary.exists(lease_key(f"{key}-{round_}")), f"round {round_} lost"


def test_cluster_manual_failover_during_a_run(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path, cluster: Cluster,
) -> None:
    primary = cluster.primary_for(lease_key(key))
    replica = cluster.replica_of(primary)
    run = GuardedJob(cronguard, job, key, cluster.url, tmp_path, ttl="3s")
    replica.client().execute_command("CLUSTER", "FAILOVER")
    wait_for(lambda: cluster.primary_for(lease_key(key)) is replica, timeout=20,
             what="the replica to take the slot over")
    assert run.check_one_holder() == (0, SKIP)


def test_cluster_primary_killed_during_a_run(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path, cluster: Cluster,
) -> None:
    primary = cluster.primary_for(lease_key(key))
    replica = cluster.replica_of(primary)
    run = GuardedJob(cronguard, job, key, cluster.url, tmp_path, ttl="6s")
    primary.kill()

    def promoted() -> bool:
        try:
            return cluster.primary_for(lease_key(key)) is replica
        except RuntimeError:  # the slot is between primaries
            return False

    wait_for(promoted, timeout=30, what="the replica to be promoted")
    status, _ = run.check_one_holder()
    assert status in (0, 76)
