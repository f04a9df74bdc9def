"""Quorum mode (``--redis`` three times) on three real servers: nodes down,
taken, frozen; split votes; fences across majorities."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Cronguard, wait_for
from servers import RedisServer, free_port

from cronguard.quorum import QuorumLease
from cronguard.store import Store, StoreSettings, open_store

SUBSETS = [tuple(i for i in range(3) if mask >> i & 1) for mask in range(8)]
OTHER_TOKEN = "f" * 32


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def lease_key(key: str) -> str:
    return f"cronguard:{{{key}}}:lease"


def dead_url() -> str:
    """A server that is down: nothing listens there."""
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    base = tmp_path_factory.mktemp("quorum")
    servers = [RedisServer(base / f"node{n}") for n in range(3)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.kill()


def redis_args(urls: list[str]) -> list[str]:
    return [f"--redis={url}" for url in urls]


def occupy(server: RedisServer, key: str) -> None:
    holder = {"host": "other-host", "pid": 1, "fence": 99, "since": 0}
    server.client().set(lease_key(key), f"{OTHER_TOKEN} {json.dumps(holder)}",
                        px=30_000)


def values(nodes: list[RedisServer], key: str) -> list[str | None]:
    found = [n.client().get(lease_key(key)) for n in nodes]
    return [v.decode().partition(" ")[0] if v else None for v in found]


@pytest.mark.parametrize("down", SUBSETS, ids=lambda s: "down-" + "".join(map(str, s)))
def test_nodes_down(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    nodes: list[RedisServer], down: tuple[int, ...],
) -> None:
    runs = tmp_path / "runs"
    urls = [dead_url() if i in down else n.url for i, n in enumerate(nodes)]
    result = cronguard("--key", key, "--ttl", "10", "--skip-exit", "3",
                       *redis_args(urls), "--", *job, "record", str(runs))
    up = [n for i, n in enumerate(nodes) if i not in down]
    tokens = values(up, key)
    if len(down) <= 1:
        assert (result.returncode, result.stderr) == (0, "")
        assert len(lines(runs)) == 1
        assert len(set(tokens)) == 1 and None not in tokens, "held on every live node"
    else:
        assert result.returncode == 75
        assert f"only {3 - len(down)} of 3 quorum nodes answered" in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert not runs.exists()
        assert tokens == [None] * len(up), "a failed attempt left its token"


@pytest.mark.parametrize(
    "taken", SUBSETS, ids=lambda s: "taken-" + "".join(map(str, s))
)
def test_nodes_held_by_another(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    nodes: list[RedisServer], taken: tuple[int, ...],
) -> None:
    for index in taken:
        occupy(nodes[index], key)
    runs = tmp_path / "runs"
    result = cronguard("-v", "--key", key, "--ttl", "10", "--skip-exit", "3",
                       *redis_args([n.url for n in nodes]), "--",
                       *job, "record", str(runs))
    tokens = values(nodes, key)
    assert all(tokens[i] == OTHER_TOKEN for i in taken), "another's lease was touched"
    free = [tokens[i] for i in range(3) if i not in taken]
    if len(taken) <= 1:
        assert result.returncode == 0, result.stderr
        assert len(lines(runs)) == 1
        assert len(set(free)) == 1 and None not in free
    else:
        assert result.returncode == 3, result.stderr
        assert "skipped, held by other-host:1" in result.stderr
        assert not runs.exists()
        assert free == [None] * len(free), "a failed attempt left its token"


def test_one_down_one_taken_is_a_skip_and_leaves_nothing(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    nodes: list[RedisServer],
) -> None:
    occupy(nodes[0], key)
    runs = tmp_path / "runs"
    urls = [nodes[0].url, nodes[1].url, dead_url()]
    result = cronguard("-v", "--key", key, "--skip-exit", "3",
                       *redis_args(urls), "--", *job, "record", str(runs))
    assert result.returncode == 3, result.stderr
    assert "split vote" in result.stderr
    assert values(nodes[:2], key) == [OTHER_TOKEN, None]
    assert not runs.exists()


def test_a_frozen_node_does_not_delay_the_majority(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    nodes: list[RedisServer],
) -> None:
    runs = tmp_path / "runs"
    nodes[2].pause()
    try:
        started = time.monotonic()
        result = cronguard("--key", key, "--ttl", "10", "--release",
                           *redis_args([n.url for n in nodes]), "--",
                           *job, "record", str(runs))
        elapsed = time.monotonic() - started
    finally:
        nodes[2].resume()
    assert result.returncode == 0, result.stderr
    assert len(lines(runs)) == 1
    # Each round waits a tenth of the TTL (1 s) at most for the frozen node,
    # far less than its socket timeout and retries would take.
    assert elapsed < 8, elapsed
    assert values(nodes[:2], key) == [None, None], "released on the live nodes"


def test_two_frozen_nodes_mean_no_lease_within_the_bound(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    nodes: list[RedisServer],
) -> None:
    runs = tmp_path / "runs"
    nodes[1].pause()
    nodes[2].pause()
    try:
        started = time.monotonic()
        result = cronguard("--key", key, "--ttl", "10",
                           *redis_args([n.url for n in nodes]), "--",
                           *job, "record", str(runs))
        elapsed = time.monotonic() - started
    finally:
        nodes[1].resume()
        nodes[2].resume()
    assert result.returncode == 75, result.stderr
    assert not runs.exists()
    assert elapsed < 8, elapsed
    assert values(nodes[:1], key) == [None]


@pytest.mark.parametrize(("frozen", "status"), [(1, 0), (2, 76)])
def test_renewal_counts_only_with_a_majority(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    nodes: list[RedisServer], frozen: int, status: int,
) -> None:
    runs, started, done = tmp_path / "runs", tmp_path / "started", tmp_path / "done"
    ttl = 2.0
    run = cronguard.start("--key", key, "--ttl", f"{ttl}s", "--release",
                          "--kill-after", "200ms", *redis_args([n.url for n in nodes]),
                          "--", *job, "ready", str(started), "await", str(done),
                          "record", str(runs))
    wait_for(started.exists, what="the job to start")
    frozen_at = time.monotonic()
    for node in nodes[:frozen]:
        node.pause()
    try:
        if status == 0:
            # Two TTLs on, the lease is still held: renewals reach two nodes.
            wait_for(lambda: time.monotonic() - frozen_at > 2 * ttl, what="2 TTLs")
            assert run.poll() is None
            done.touch()
            assert run.wait(20) == 0
            assert len(lines(runs)) == 1
        else:
            assert run.wait(20) == 76
            assert time.monotonic() - frozen_at < ttl + 2.0
            assert not runs.exists()
    finally:
        for node in nodes[:frozen]:
            node.resume()
        done.touch()


def test_two_contenders_at_once_never_both_hold(
    cronguard_bin: str, env: dict[str, str], job: list[str], key: str,
    tmp_path: Path, nodes: list[RedisServer],
) -> None:
    # One node down makes split votes possible: each live node may pick a
    # different contender.
    urls = [nodes[0].url, nodes[1].url, dead_url()]
    for round_ in range(6):
        runs = tmp_path / f"runs{round_}"
        command = [cronguard_bin, "--key", f"{key}-{round_}", "--ttl", "10",
                   "--skip-exit", "3", *redis_args(urls), "--", *job, "record",
                   str(runs)]

        def fire(_: int, command: list[str] = command) -> int:
            return subprocess.run(command, env=env, capture_output=True,
                                  timeout=60).returncode

        with ThreadPoolExecutor(2) as pool:
            statuses = sorted(pool.map(fire, range(2)))
        # 75 when a live node was too slow to answer on a loaded machine.
        assert statuses.count(0) <= 1 and set(statuses) <= {0, 3, 75}, statuses
        assert len(lines(runs)) == statuses.count(0)
        if 0 not in statuses:
            assert values(nodes[:2], f"{key}-{round_}") == [None, None]


def quorum_store(urls: list[str]) -> Store:
    return open_store(StoreSettings(url=urls[0], nodes=tuple(urls), timeout=0.5))


def test_a_split_vote_is_cleaned_up_and_the_other_side_can_win(
    key: str, nodes: list[RedisServer]
) -> None:
    urls = [nodes[0].url, nodes[1].url, dead_url()]
    store_a, store_b = quorum_store(urls), quorum_store(urls)
    a = QuorumLease(store_a, key, 5)
    b = QuorumLease(store_b, key, 5)
    # B's request reached node 0 first; A's reaches node 1 first.
    granted = {**b.details, "fence": 1, "since": 0}
    nodes[0].client().set(lease_key(key), f"{b.token} {json.dumps(granted)}",
                          px=5000)
    holder = a.try_acquire()
    assert holder is not None and a.fence is None, "a false acquisition"
    assert values(nodes[:2], key) == [b.token, None], "A's token was left behind"
    assert b.try_acquire() is None
    assert values(nodes[:2], key) == [b.token, b.token]
    assert b.fence is not None
    b.release()


def test_fences_increase_across_different_majorities(
    key: str, nodes: list[RedisServer]
) -> None:
    fence_key = f"cronguard:{{{key}}}:fence"
    for node, count in zip(nodes, (10, 3, 3), strict=True):
        node.client().set(fence_key, count)
    a = QuorumLease(quorum_store([nodes[0].url, nodes[1].url, dead_url()]), key, 5)
    assert a.try_acquire() is None
    assert a.fence == 11
    a.release()
    b = QuorumLease(quorum_store([dead_url(), nodes[1].url, nodes[2].url]), key, 5)
    assert b.try_acquire() is None
    assert b.fence is not None and b.fence > a.fence
    b.release()
    # The fence in the holder details is the chosen one, on every node.
    assert int(nodes[1].client().get(fence_key)) >= b.fence


def test_wait_retries_a_vote_until_the_holder_releases(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    nodes: list[RedisServer],
) -> None:
    runs, started, done = tmp_path / "runs", tmp_path / "started", tmp_path / "done"
    urls = redis_args([n.url for n in nodes])
    first = cronguard.start("--key", key, "--release", *urls, "--", *job,
                            "ready", str(started), "await", str(done),
                            "record", str(runs))
    wait_for(started.exists, what="the first run")
    second = cronguard.start("--key", key, "--release", "--wait", "20s", *urls,
                             "--", *job, "record", str(runs))
    done.touch()
    assert first.wait(20) == 0
    assert second.wait(30) == 0
    assert len(lines(runs)) == 2


@pytest.mark.parametrize("source", ["environment", "file"])
def test_quorum_from_the_environment_or_the_file(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    nodes: list[RedisServer], source: str,
) -> None:
    runs = tmp_path / "runs"
    urls = [n.url for n in nodes]
    if source == "environment":
        extra = {"CRONGUARD_REDIS": " ".join(urls)}
    else:
        config = tmp_path / "cronguard.toml"
        config.write_text(f"redis = {json.dumps(urls)}\n")
        extra = {"CRONGUARD_CONFIG": str(config), "CRONGUARD_REDIS": ""}
    result = cronguard("--key", key, "--", *job, "record", str(runs), **extra)
    assert (result.returncode, result.stderr) == (0, "")
    tokens = values(nodes, key)
    assert len(set(tokens)) == 1 and None not in tokens, "held on all three nodes"


def test_release_removes_a_stuck_quorum_lease_from_every_node(
    cronguard: Cronguard, key: str, nodes: list[RedisServer],
) -> None:
    urls = redis_args([n.url for n in nodes])
    assert cronguard("--key", key, "--ttl", "1h", *urls, "--", "true").returncode == 0
    assert None not in values(nodes, key)
    config_urls = " ".join(n.url for n in nodes)
    released = cronguard("release", key, CRONGUARD_REDIS=config_urls)
    assert released.returncode == 0, released.stderr
    assert values(nodes, key) == [None, None, None]
    again = cronguard("--key", key, "--skip-exit", "3", *urls, "--", "true")
    assert again.returncode == 0
