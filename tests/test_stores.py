"""Stores other than one plain server: TLS, Sentinel, Cluster, ACL users,
--min-replicas.  Each topology is real, started once per module."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import Cronguard, away_from_boundary, wait_for
from servers import Certificates, Cluster, RedisServer, SentinelSet, TlsServer

from cronguard.lease import Holder

SENTINEL_SECRET = "sentinel-secret"
DATA_SECRET = "data-secret"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def lease_key(key: str) -> str:
    return f"cronguard:{{{key}}}:lease"


# Bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--redis", "redis://127.0.0.1:1/0", "--redis", "redis://127.0.0.1:2/0"],
            "quorum mode needs three or more independent servers",
        ),
        (["--redis", "redis+sentinel://127.0.0.1:26379"], "names no service"),
        (["--redis", "redis+sentinel://h:x/jobs"], "is not HOST:PORT"),
        (["--redis", "redis+cluster://127.0.0.1:7000/3"], "database 0 only"),
        *[
            (
                ["--redis", url, "--tls-ca", os.devnull],
                "apply to TLS stores only; change --redis (CRONGUARD_REDIS) to "
                "rediss://, rediss+sentinel:// or rediss+cluster://",
            )
            for url in ("redis://127.0.0.1:1/0", "redis+sentinel://127.0.0.1:1/jobs",
                        "redis+cluster://127.0.0.1:1")
        ],
        *[
            (
                ["--redis", url, "--tls-cert", os.devnull],
                "give both --tls-cert (CRONGUARD_TLS_CERT) and --tls-key",
            )
            for url in ("rediss://127.0.0.1:1/0", "rediss+sentinel://127.0.0.1:1/jobs",
                        "rediss+cluster://127.0.0.1:1")
        ],
        (
            ["--redis", "rediss+sentinel://127.0.0.1:26379"],
            "names no service; use rediss+sentinel://HOST:PORT",
        ),
        (["--redis", "rediss+cluster://127.0.0.1:7000/3"], "database 0 only"),
        (
            ["--redis", "redis://127.0.0.1:1/0 rediss+sentinel://127.0.0.1:2/jobs "
             "redis://127.0.0.1:3/0"],
            "give each as redis://, rediss:// or unix://",
        ),
        (
            ["--redis", "rediss://127.0.0.1:1/0", "--tls-ca", "/nonexistent/ca.pem"],
            "--tls-ca (CRONGUARD_TLS_CA): cannot read /nonexistent/ca.pem",
        ),
        (
            ["--min-replicas", "1", *[f"--redis=redis://127.0.0.1:{p}/0"
                                      for p in (1, 2, 3)]],
            "does not apply to quorum mode",
        ),
        (["--min-replicas", "-1"], "--min-replicas (CRONGUARD_MIN_REPLICAS): -1"),
        (
            ["--every", "10s", *[f"--redis=redis://127.0.0.1:{p}/0"
                                 for p in (1, 2, 3)]],
            "slot mode (--every, --schedule) needs one store, not a quorum",
        ),
        (
            ["--every", "10s", "--min-replicas", "1",
             *[f"--redis=redis://127.0.0.1:{p}/0" for p in (1, 2, 3)]],
            "does not apply to quorum mode",
        ),
        (
            ["--redis", "redis://127.0.0.1:1/0 redis+cluster://127.0.0.1:2 "
             "redis://127.0.0.1:3/0"],
            "give each as redis://, rediss:// or unix://",
        ),
    ],
)
def test_bad_store_settings_exit_2_with_the_fix(
    cronguard: Cronguard, args: list[str], message: str
) -> None:
    result = cronguard(*args, "--", "true")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("cronguard: error: ")
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


# TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[TlsServer]:
    server = TlsServer(tmp_path_factory.mktemp("tls"), certs, client_certs=True)
    with server:
        yield server


def test_tls_with_ca_and_client_certificate(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    tls_server: TlsServer, certs: Certificates,
) -> None:
    runs = tmp_path / "runs"
    result = cronguard(
        "--key", key, "--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert),
        "--tls-key", str(certs.client_key), "--", *job, "record", str(runs),
        CRONGUARD_REDIS=tls_server.tls_url,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert len(lines(runs)) == 1
    assert tls_server.client().exists(lease_key(key))


def test_tls_options_come_from_the_environment_too(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    tls_server: TlsServer, certs: Certificates,
) -> None:
    runs = tmp_path / "runs"
    result = cronguard(
        "--key", key, "--", *job, "record", str(runs),
        CRONGUARD_REDIS=tls_server.tls_url, CRONGUARD_TLS_CA=str(certs.ca),
        CRONGUARD_TLS_CERT=str(certs.client_cert),
        CRONGUARD_TLS_KEY=str(certs.client_key),
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert len(lines(runs)) == 1


@pytest.mark.parametrize("ca", ["system", "other"])
def test_tls_refuses_a_server_whose_certificate_it_cannot_verify(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    tls_server: TlsServer, certs: Certificates, ca: str,
) -> None:
    runs = tmp_path / "runs"
    given = [] if ca == "system" else ["--tls-ca", str(certs.other_ca)]
    result = cronguard(
        "--key", key, *given, "--tls-cert", str(certs.client_cert),
        "--tls-key", str(certs.client_key), "--", *job, "record", str(runs),
        CRONGUARD_REDIS=tls_server.tls_url,
    )
    assert result.returncode == 75
    assert "certificate verify failed" in result.stderr, result.stderr
    assert "--tls-ca (CRONGUARD_TLS_CA)" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not runs.exists()


def test_tls_without_the_client_certificate_the_server_asks_for(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    tls_server: TlsServer, certs: Certificates,
) -> None:
    runs = tmp_path / "runs"
    result = cronguard("--key", key, "--tls-ca", str(certs.ca), "--", *job, "record",
                       str(runs), CRONGUARD_REDIS=tls_server.tls_url)
    assert result.returncode == 75, result.stderr
    assert result.stderr.count("\n") == 1
    assert "client certificate" in result.stderr and "--tls-cert" in result.stderr
    assert not runs.exists()


# TLS to Sentinel and Cluster: every server, sentinel and link speaks TLS
# only and asks for a client certificate, so a run that succeeds has shown
# the CA and the certificate to the sentinels and the data servers alike.


@pytest.fixture(scope="module")
def tls_sentinels(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[SentinelSet]:
    topology = SentinelSet(tmp_path_factory.mktemp("tls-sentinel"), replicas=1,
                           tls=certs)
    with topology:
        yield topology


@pytest.fixture(scope="module")
def tls_cluster(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("tls-cluster"), replicas=0,
                 tls=certs) as topology:
        yield topology


def tls_options(certs: Certificates, ca: Path | None = None) -> list[str]:
    return ["--tls-ca", str(ca or certs.ca), "--tls-cert", str(certs.client_cert),
            "--tls-key", str(certs.client_key)]


def test_tls_sentinel_runs_once_on_the_primary(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    tls_sentinels: SentinelSet, certs: Certificates,
) -> None:
    runs = tmp_path / "runs"
    results = [
        cronguard("--key", key, "--ttl", "20", *tls_options(certs), "--", *job,
                  "record", str(runs), CRONGUARD_REDIS=tls_sentinels.url)
        for _ in range(2)
    ]
    assert [(r.returncode, r.stderr) for r in results] == [(0, "")] * 2
    assert len(lines(runs)) == 1
    assert tls_sentinels.current_primary().client().exists(lease_key(key))


def test_tls_cluster_runs_once_on_the_slots_primary(
    cronguard: Cronguard, job: list[str], tmp_path: Path, tls_cluster: Cluster,
    certs: Certificates,
) -> None:
    runs = tmp_path / "runs"
    keys = [f"tls-cluster-job-{n}" for n in range(4)]
    for key in keys:
        for _ in range(2):
            result = cronguard("--key", key, "--ttl", "20", "--", *job, "record",
                               str(runs), CRONGUARD_REDIS=tls_cluster.url,
                               CRONGUARD_TLS_CA=str(certs.ca),
                               CRONGUARD_TLS_CERT=str(certs.client_cert),
                               CRONGUARD_TLS_KEY=str(certs.client_key))
            assert (result.returncode, result.stderr) == (0, "")
    assert len(lines(runs)) == len(keys)
    shards = {tls_cluster.primary_for(lease_key(key)).port for key in keys}
    for key in keys:
        assert tls_cluster.primary_for(lease_key(key)).client().exists(lease_key(key))
    assert len(shards) > 1, "every key landed on one shard; the test proves little"


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
@pytest.mark.parametrize("ca", ["system", "other"])
def test_tls_topology_with_the_wrong_ca_exits_75_naming_the_certificate(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    certs: Certificates, request: pytest.FixtureRequest, topology: str, ca: str,
) -> None:
    url = request.getfixturevalue(f"tls_{topology}s" if topology == "sentinel"
                                  else "tls_cluster").url
    runs = tmp_path / "runs"
    given = tls_options(certs, certs.other_ca)[(2 if ca == "system" else 0):]
    result = cronguard("--key", key, *given, "--", *job, "record", str(runs),
                       CRONGUARD_REDIS=url)
    assert result.returncode == 75, result.stderr
    assert result.stderr.startswith(f"cronguard: error: {url}: "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "certificate verify failed" in result.stderr
    assert "--tls-ca (CRONGUARD_TLS_CA)" in result.stderr
    assert not runs.exists()


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_tls_topology_without_a_client_certificate_names_the_fix(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    certs: Certificates, request: pytest.FixtureRequest, topology: str,
) -> None:
    url = request.getfixturevalue(f"tls_{topology}s" if topology == "sentinel"
                                  else "tls_cluster").url
    runs = tmp_path / "runs"
    result = cronguard("--key", key, "--tls-ca", str(certs.ca), "--", *job,
                       "record", str(runs), CRONGUARD_REDIS=url)
    assert result.returncode == 75, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "client certificate" in result.stderr and "--tls-cert" in result.stderr
    assert not runs.exists()


def test_doctor_over_tls_sentinel_checks_the_primary(
    cronguard: Cronguard, tls_sentinels: SentinelSet, certs: Certificates,
) -> None:
    result = cronguard("doctor", *tls_options(certs),
                       CRONGUARD_REDIS=tls_sentinels.url)
    assert result.stderr == ""
    findings = [line.split(None, 1) for line in result.stdout.splitlines()]
    checks = [(text.split(":")[0], level) for level, text in findings]
    text = {text.split(":")[0]: text for _, text in findings}
    assert text["reachable"].startswith(f"reachable: {tls_sentinels.url} answers")
    assert text["server"].endswith(", standalone, primary"), text["server"]
    assert {check for check, _ in checks} == {
        "reachable", "server", "permissions", "clock", "eviction", "persistence"}
    # The test servers keep no data on disk; every other check passes.
    assert [check for check, level in checks if level != "ok"] == ["persistence"]
    assert result.returncode == 1


def test_doctor_pointed_at_a_tls_sentinel_names_the_tls_sentinel_scheme(
    cronguard: Cronguard, tls_sentinels: SentinelSet, certs: Certificates,
) -> None:
    sentinel = tls_sentinels.sentinels[0]
    result = cronguard("doctor", *tls_options(certs), CRONGUARD_REDIS=sentinel.url)
    assert result.returncode == 1
    server = next(line for line in result.stdout.splitlines()
                  if line.startswith("FAIL  server: "))
    assert "is a Sentinel" in server and "use rediss+sentinel://" in server


def test_doctor_over_tls_sentinel_with_the_wrong_ca_names_it(
    cronguard: Cronguard, tls_sentinels: SentinelSet, certs: Certificates,
) -> None:
    result = cronguard("doctor", *tls_options(certs, certs.other_ca),
                       CRONGUARD_REDIS=tls_sentinels.url)
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL  reachable: ")
    assert result.stdout.count("\n") == 1
    assert "certificate verify failed" in result.stdout


# Sentinel


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    topology = SentinelSet(tmp_path_factory.mktemp("sentinel"), replicas=1,
                           sentinel_password=SENTINEL_SECRET)
    with topology:
        yield topology


def test_sentinel_finds_the_primary_and_runs_once(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    runs = tmp_path / "runs"
    results = [
        cronguard("--key", key, "--ttl", "20", "--", *job, "record", str(runs),
                  CRONGUARD_REDIS=sentinels.url,
                  CRONGUARD_SENTINEL_PASSWORD=SENTINEL_SECRET)
        for _ in range(2)
    ]
    assert [(r.returncode, r.stderr) for r in results] == [(0, "")] * 2
    assert len(lines(runs)) == 1
    assert sentinels.current_primary().client().exists(lease_key(key))


def test_sentinel_password_from_a_file(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    secret = tmp_path / "sentinel-password"
    secret.write_text(SENTINEL_SECRET + "\n")
    runs = tmp_path / "runs"
    result = cronguard("--key", key, "--sentinel-password-file", str(secret), "--",
                       *job, "record", str(runs), CRONGUARD_REDIS=sentinels.url)
    assert (result.returncode, result.stderr) == (0, "")
    assert len(lines(runs)) == 1


def test_sentinel_without_its_password_exits_75_naming_the_fix(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    runs = tmp_path / "runs"
    result = cronguard("--key", key, "--", *job, "record", str(runs),
                       CRONGUARD_REDIS=sentinels.url)
    assert result.returncode == 75
    assert "CRONGUARD_SENTINEL_PASSWORD" in result.stderr, result.stderr
    assert SENTINEL_SECRET not in result.stderr
    assert not runs.exists()


def test_sentinel_secret_does_not_reach_the_command(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    seen = tmp_path / "env.json"
    result = cronguard("--key", key, "--", *job, "env", str(seen),
                       CRONGUARD_REDIS=sentinels.url,
                       CRONGUARD_SENTINEL_PASSWORD=SENTINEL_SECRET)
    assert result.returncode == 0, result.stderr
    assert SENTINEL_SECRET not in seen.read_text()


def test_a_replica_never_grants_a_lease(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    replica = next(s for s in sentinels.data_servers
                   if s is not sentinels.current_primary())
    runs = tmp_path / "runs"
    result = cronguard("--key", key, "--", *job, "record", str(runs),
                       CRONGUARD_REDIS=replica.url)
    assert result.returncode == 75
    assert "read-only replica" in result.stderr and "redis+sentinel://" in result.stderr
    assert not runs.exists()


def test_min_replicas_met(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    runs = tmp_path / "runs"
    result = cronguard("--key", key, "--min-replicas", "1", "--", *job, "record",
                       str(runs), CRONGUARD_REDIS=sentinels.url,
                       CRONGUARD_SENTINEL_PASSWORD=SENTINEL_SECRET)
    assert (result.returncode, result.stderr) == (0, "")
    assert len(lines(runs)) == 1
    replica = next(s for s in sentinels.data_servers
                   if s is not sentinels.current_primary())
    assert replica.client().exists(lease_key(key))


def test_min_replicas_the_topology_cannot_give_releases_and_exits_75(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    runs = tmp_path / "runs"
    result = cronguard("--key", key, "--min-replicas", "2", "--redis-timeout", "1s",
                       "--", *job, "record", str(runs),
                       CRONGUARD_REDIS=sentinels.url,
                       CRONGUARD_SENTINEL_PASSWORD=SENTINEL_SECRET)
    assert result.returncode == 75
    assert result.stderr.count("\n") == 1
    assert "only 1 connected replica" in result.stderr, result.stderr
    assert "--min-replicas (CRONGUARD_MIN_REPLICAS)" in result.stderr
    assert not runs.exists()
    # Given back at once: the next host is not kept out for a TTL.
    assert not sentinels.current_primary().client().exists(lease_key(key))
    # And shown as a run that did not start, not as one whose end is unknown.
    status = cronguard("status", "--json", key, CRONGUARD_REDIS=sentinels.url,
                       CRONGUARD_SENTINEL_PASSWORD=SENTINEL_SECRET)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)[0]["last_run"]["outcome"] == "not-started"


# --min-replicas in slot mode

HOUR_MS = 3600 * 1000


def slot_record(client: redis.Redis, key: str) -> dict[str, str]:
    raw = client.hgetall(f"cronguard:{{{key}}}:slot")
    return {k.decode(): v.decode() for k, v in raw.items()}


def history(cronguard: Cronguard, key: str, sentinels: SentinelSet
            ) -> list[dict[str, Any]]:
    result = cronguard("history", key, "--json", CRONGUARD_REDIS=sentinels.url,
                       CRONGUARD_SENTINEL_PASSWORD=SENTINEL_SECRET)
    assert result.returncode == 0, result.stderr
    events: list[dict[str, Any]] = json.loads(result.stdout)
    return events


def test_slot_mode_starts_the_command_once_a_replica_has_the_claim(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    replica = next(s for s in sentinels.data_servers
                   if s is not sentinels.current_primary())
    seen, env = tmp_path / "replica-lease", tmp_path / "env.json"
    result = cronguard("--every", "1h", "--key", key, "--min-replicas", "1", "--",
                       *job, "env", str(env), "peek", replica.url, lease_key(key),
                       str(seen), CRONGUARD_REDIS=sentinels.url,
                       CRONGUARD_SENTINEL_PASSWORD=SENTINEL_SECRET)
    assert (result.returncode, result.stderr) == (0, "")
    # The replica had this run's lease by the time the command started.
    fence = json.loads(env.read_text())["CRONGUARD_FENCE"]
    assert Holder.parse(seen.read_bytes(), 0).fence == int(fence)
    primary = sentinels.current_primary().client()
    assert slot_record(primary, key)["state"] == "done"
    assert [e["event"] for e in history(cronguard, key, sentinels)] == [
        "started", "finished"]


def test_slot_mode_unreplicated_claim_is_left_running_and_exits_75(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    runs = tmp_path / "runs"
    result = cronguard("--every", "1h", "--key", key, "--min-replicas", "2",
                       "--redis-timeout", "1s", "--", *job, "record", str(runs),
                       CRONGUARD_REDIS=sentinels.url,
                       CRONGUARD_SENTINEL_PASSWORD=SENTINEL_SECRET)
    assert result.returncode == 75
    assert result.stderr.count("\n") == 1
    assert "--min-replicas (CRONGUARD_MIN_REPLICAS)" in result.stderr
    assert "only 1 connected replica" in result.stderr, result.stderr
    assert not runs.exists()
    primary = sentinels.current_primary().client()
    assert not primary.exists(lease_key(key))
    assert slot_record(primary, key)["state"] == "running"
    events = history(cronguard, key, sentinels)
    assert [e["event"] for e in events] == ["started", "unreplicated"]
    assert events[1]["replicas"] == 1 and events[1]["fence"] == events[0]["fence"]


def test_an_unreplicated_slot_goes_to_a_standby_that_waits_for_replicas_too(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    sentinels: SentinelSet,
) -> None:
    primary = sentinels.current_primary().client()
    away_from_boundary(primary, HOUR_MS, 60 * 1000)  # all three in one slot
    runs, env = tmp_path / "runs", tmp_path / "env.json"

    def host(name: str, replicas: str, *steps: str) -> tuple[int, str]:
        standby = ("--standby", "10s") if name != "a" else ()
        result = cronguard("--every", "1h", "--key", key, *standby,
                           "--min-replicas", replicas, "--redis-timeout", "1s",
                           "--", *job, *steps, "record", str(runs),
                           CRONGUARD_HOST_ID=name, CRONGUARD_REDIS=sentinels.url,
                           CRONGUARD_SENTINEL_PASSWORD=SENTINEL_SECRET)
        return result.returncode, result.stderr

    status, stderr = host("a", "2")
    assert status == 75, stderr
    # b takes the slot over, but its takeover is not replicated either.
    status, stderr = host("b", "2")
    assert status == 75 and stderr.count("\n") == 1, stderr
    assert "--min-replicas (CRONGUARD_MIN_REPLICAS)" in stderr
    assert not primary.exists(lease_key(key))
    assert slot_record(primary, key)["state"] == "running"
    # c asks for no more replicas than there are: it takes over and runs.
    status, stderr = host("c", "1", "env", str(env))
    assert status == 0, stderr

    assert [line.split()[0] for line in lines(runs)] == ["c"]
    assert json.loads(env.read_text())["CRONGUARD_TAKEOVER"] == "1"
    events = history(cronguard, key, sentinels)
    assert [(e["event"], e["host"]) for e in events] == [
        ("started", "a"), ("unreplicated", "a"), ("takeover", "b"),
        ("unreplicated", "b"), ("takeover", "c"), ("finished", "c")]
    record = slot_record(primary, key)
    assert record["state"] == "done" and record["takeover"] == "1"


# Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as topology:
        yield topology


def test_cluster_runs_once_and_keeps_a_jobs_keys_in_one_slot(
    cronguard: Cronguard, job: list[str], tmp_path: Path, cluster: Cluster,
) -> None:
    runs = tmp_path / "runs"
    # Several keys, so that they land on different shards.
    keys = [f"cluster-job-{n}" for n in range(6)]
    for key in keys:
        for _ in range(2):
            result = cronguard("--key", key, "--ttl", "20", "--", *job, "record",
                               str(runs), CRONGUARD_REDIS=cluster.url)
            assert (result.returncode, result.stderr) == (0, "")
    assert len(lines(runs)) == len(keys)
    shards = set()
    for key in keys:
        node = cluster.primary_for(lease_key(key)).client()
        shards.add(node.execute_command("CLUSTER", "MYID"))
        for kind in ("lease", "fence", "runs"):
            assert node.exists(f"cronguard:{{{key}}}:{kind}"), (key, kind)
    assert len(shards) > 1, "every key landed on one shard; the test proves little"


def test_cluster_renews_while_a_long_job_runs(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path, cluster: Cluster,
) -> None:
    runs, past_ttl, done = tmp_path / "runs", tmp_path / "past-ttl", tmp_path / "done"
    first = cronguard.start("--key", key, "--ttl", "600ms", "--release", "--",
                            *job, "record", str(runs), "sleep", "1.2",
                            "ready", str(past_ttl), "await", str(done),
                            CRONGUARD_REDIS=cluster.url)
    wait_for(past_ttl.exists, what="the job to run past one TTL")
    second = cronguard("--key", key, "--skip-exit", "3", "--", *job, "record",
                       str(runs), CRONGUARD_REDIS=cluster.url)
    done.touch()
    assert second.returncode == 3, second.stderr
    assert first.wait(30) == 0
    assert len(lines(runs)) == 1


def test_cluster_min_replicas(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path, cluster: Cluster,
) -> None:
    runs = tmp_path / "runs"
    met = cronguard("--key", key, "--min-replicas", "1", "--release", "--", *job,
                    "record", str(runs), CRONGUARD_REDIS=cluster.url)
    assert (met.returncode, met.stderr) == (0, "")
    unmet = cronguard("--key", key, "--min-replicas", "2", "--redis-timeout", "1s",
                      "--", *job, "record", str(runs), CRONGUARD_REDIS=cluster.url)
    assert unmet.returncode == 75 and "only 1 connected replica" in unmet.stderr
    assert len(lines(runs)) == 1


def test_cluster_unreachable_exits_75(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
) -> None:
    from servers import free_port

    result = cronguard("--key", key, "--redis-timeout", "200ms", "--", *job,
                       CRONGUARD_REDIS=f"redis+cluster://127.0.0.1:{free_port()}")
    assert result.returncode == 75, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# ACL: the commands cronguard needs, and no more.

# The line README.md and cronguard(1) give, with the password filled in.
ACL_LINE = (
    "user cronguard on >{password} ~cronguard:* resetchannels -@all "
    "+eval +evalsha +ping +wait +info +select "
    "+get +set +pexpire +del +incr +time +pttl +xadd +hincrby "
    "+scan +type +mget +exists +xrange +xrevrange +hgetall"
)


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path_factory.mktemp("acl"),
        config_lines=[
            ACL_LINE.format(password=DATA_SECRET),
            # Can run scripts, but not record their events.
            "user recordless on >other ~cronguard:* -@all +eval +get +set +pexpire "
            "+del +incr +time +pttl +ping",
            "user scriptless on >other ~cronguard:* +@all -eval -evalsha",
        ],
    )
    with server:
        yield server


def test_acl_line_matches_the_readme() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert ACL_LINE.format(password="PASSWORD") in readme.replace("\n", " ")


@pytest.mark.parametrize("mode", ["hold", "release", "renew"])
def test_core_runs_as_the_restricted_user(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    acl_server: RedisServer, mode: str,
) -> None:
    runs = tmp_path / "runs"
    url = f"redis://cronguard@127.0.0.1:{acl_server.port}/0"
    options = {"hold": ["--ttl", "20"], "release": ["--release"],
               "renew": ["--ttl", "1s", "--release"]}[mode]
    steps = ["sleep", "2"] if mode == "renew" else []
    first = cronguard("--key", key, *options, "--", *job, "record", str(runs),
                      *steps, CRONGUARD_REDIS=url,
                      CRONGUARD_REDIS_PASSWORD=DATA_SECRET)
    assert (first.returncode, first.stderr) == (0, "")
    second = cronguard("--key", key, *options, "--", *job, "record", str(runs),
                       CRONGUARD_REDIS=url, CRONGUARD_REDIS_PASSWORD=DATA_SECRET)
    assert (second.returncode, second.stderr) == (0, "")
    assert len(lines(runs)) == (1 if mode == "hold" else 2)
    admin = acl_server.client()
    assert admin.xlen(f"cronguard:{{{key}}}:runs") >= 2
    assert admin.exists(lease_key(key)) == (mode == "hold")


def test_a_user_without_eval_gets_exit_75_and_the_grant_to_add(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    acl_server: RedisServer,
) -> None:
    runs = tmp_path / "runs"
    result = cronguard("--key", key, "--", *job, "record", str(runs),
                       CRONGUARD_REDIS=f"redis://scriptless@127.0.0.1:{acl_server.port}/0",
                       CRONGUARD_REDIS_PASSWORD="other")
    assert result.returncode == 75
    assert "may not do this" in result.stderr and "SECURITY" in result.stderr
    assert not runs.exists()


def test_a_user_who_cannot_record_still_runs_and_warns(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path,
    acl_server: RedisServer,
) -> None:
    runs = tmp_path / "runs"
    result = cronguard("--key", key, "--", *job, "record", str(runs),
                       CRONGUARD_REDIS=f"redis://recordless@127.0.0.1:{acl_server.port}/0",
                       CRONGUARD_REDIS_PASSWORD="other")
    assert result.returncode == 0
    assert "could not record" in result.stderr
    assert len(lines(runs)) == 1


def test_wrong_password_is_not_printed(
    cronguard: Cronguard, job: list[str], key: str, acl_server: RedisServer,
) -> None:
    result = cronguard("--key", key, "--", *job,
                       CRONGUARD_REDIS=f"redis://cronguard:wrong-one@127.0.0.1:"
                       f"{acl_server.port}/0")
    assert result.returncode == 75
    assert "authentication failed" in result.stderr
    assert "wrong-one" not in result.stderr


def test_the_man_page_and_readme_name_every_store_option() -> None:
    root = Path(__file__).parents[1]
    man = (root / "man" / "cronguard.1").read_text().replace("\\-", "-")
    readme = (root / "README.md").read_text()
    for option in ("--sentinel-password-file", "--tls-ca", "--tls-cert", "--tls-key",
                   "--min-replicas", "redis+sentinel://", "redis+cluster://",
                   "rediss+sentinel://", "rediss+cluster://",
                   "CRONGUARD_SENTINEL_PASSWORD"):
        assert option in man, option
        assert option in readme, option


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_status_and_release_reach_the_same_topologies(
    cronguard: Cronguard, key: str, topology: str, request: pytest.FixtureRequest,
) -> None:
    if topology == "sentinel":
        url = request.getfixturevalue("sentinels").url
        extra = {"CRONGUARD_SENTINEL_PASSWORD": SENTINEL_SECRET}
    else:
        url = request.getfixturevalue("cluster").url
        extra = {}
    assert cronguard("--key", key, "--", "true", CRONGUARD_REDIS=url,
                     **extra).returncode == 0
    status = cronguard("status", key, "--json", CRONGUARD_REDIS=url, **extra)
    assert status.returncode == 0, status.stderr
    assert '"held"' in status.stdout
    released = cronguard("release", key, CRONGUARD_REDIS=url, **extra)
    assert released.returncode == 0, released.stderr
    again = cronguard("--key", key, "--skip-exit", "3", "--", "true",
                      CRONGUARD_REDIS=url, **extra)
    assert again.returncode == 0


def test_admin_commands_take_the_tls_options(
    cronguard: Cronguard, key: str, tls_server: TlsServer, certs: Certificates,
) -> None:
    tls = ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert),
           "--tls-key", str(certs.client_key)]
    url = tls_server.tls_url
    ran = cronguard("--key", key, *tls, "--", "true", CRONGUARD_REDIS=url)
    assert ran.returncode == 0, ran.stderr
    status = cronguard("status", key, "--json", *tls, CRONGUARD_REDIS=url)
    assert status.returncode == 0, status.stderr
    assert '"held"' in status.stdout


def test_multi_host_urls_parse_and_never_show_the_password() -> None:
    from cronguard.store import MultiHostURL, redact

    url = "redis+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380,sen3/jobs/4"
    parsed = MultiHostURL.parse(url)
    assert parsed.username == "app" and parsed.password == "s@cret"
    assert parsed.hosts == (("10.0.0.1", 26379), ("::1", 26380), ("sen3", 26379))
    assert parsed.path == ("jobs", "4")
    shown = redact(url)
    assert "cret" not in shown and shown.startswith("redis+sentinel://app:***@")


def test_a_wrong_data_password_through_sentinel_is_not_printed(
    cronguard: Cronguard, key: str, sentinels: SentinelSet,
) -> None:
    hosts = sentinels.url.partition("://")[2]
    result = cronguard("--key", key, "--", "true",
                       CRONGUARD_REDIS=f"redis+sentinel://:not-the-one@{hosts}",
                       CRONGUARD_SENTINEL_PASSWORD=SENTINEL_SECRET)
    assert result.returncode == 75
    assert "not-the-one" not in result.stderr and "***" in result.stderr


def test_a_cluster_runs_as_the_restricted_user_with_the_slot_map_grants(
    cronguard: Cronguard, job: list[str], key: str, tmp_path: Path, cluster: Cluster,
) -> None:
    rules = ACL_LINE.format(password=DATA_SECRET).split()[1:]
    for node in cluster.nodes:  # ACLs are per node, even in a cluster
        node.client().acl_setuser(
            "cronguard", reset=True, enabled=True, passwords=[f"+{DATA_SECRET}"],
            keys=["cronguard:*"], commands=[*rules[5:], "+cluster|slots", "+command"],
        )
    runs = tmp_path / "runs"
    hosts = cluster.url.partition("://")[2]
    result = cronguard("--key", key, "--", *job, "record", str(runs),
                       CRONGUARD_REDIS=f"redis+cluster://cronguard@{hosts}",
                       CRONGUARD_REDIS_PASSWORD=DATA_SECRET)
    assert (result.returncode, result.stderr) == (0, "")
    assert len(lines(runs)) == 1
