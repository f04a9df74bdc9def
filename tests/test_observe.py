"""Administration and observability, end to end: real servers, real runs by
several simulated hosts (CRONGUARD_HOST_ID), and the installed command."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import Cronguard, wait_for
from prometheus_client.parser import text_string_to_metric_families
from servers import RedisServer

CHECK_LINE = re.compile(r"^CRONGUARD (OK|WARNING|CRITICAL|UNKNOWN) - \S.*$")


def run_as(
    cronguard: Cronguard, host: str, key: str, job: list[str], *steps: str,
    options: tuple[str, ...] = ("--release",),
) -> subprocess.CompletedProcess[str]:
    return cronguard("--key", key, *options, "--", *job, *steps,
                     CRONGUARD_HOST_ID=host)


def as_json(result: subprocess.CompletedProcess[str]) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def fleet(cronguard: Cronguard, key: str, job: list[str]) -> str:
    """A job that three hosts ran: web-1 ok, web-2 exit 3, web-3 ok and held
    (so web-1's next firing was skipped)."""
    assert run_as(cronguard, "web-1", key, job).returncode == 0
    assert run_as(cronguard, "web-2", key, job, "exit", "3").returncode == 3
    held = run_as(cronguard, "web-3", key, job, options=("--ttl", "60s"))
    assert held.returncode == 0
    skipped = run_as(cronguard, "web-1", key, job, "exit", "9")
    assert skipped.returncode == 0 and skipped.stderr == ""
    return key


# history


def test_history_json_carries_the_documented_fields(
    cronguard: Cronguard, fleet: str
) -> None:
    events = as_json(cronguard("history", fleet, "--json"))
    assert isinstance(events, list)
    assert [(e["event"], e["host"]) for e in events] == [
        ("started", "web-1"), ("finished", "web-1"),
        ("started", "web-2"), ("finished", "web-2"),
        ("started", "web-3"), ("finished", "web-3"),
    ]
    fences = [e["fence"] for e in events]
    assert fences == [1, 1, 2, 2, 3, 3]
    for event in events:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"])
        assert isinstance(event["pid"], int)
    finished = [e for e in events if e["event"] == "finished"]
    assert [e["status"] for e in finished] == [0, 3, 0]
    assert {e["reason"] for e in finished} == {"exited"}
    assert all(isinstance(e["duration_ms"], int) for e in finished)
    assert events[4]["ttl_ms"] == 60000


def test_history_limit_keeps_the_most_recent(cronguard: Cronguard, fleet: str) -> None:
    events = as_json(cronguard("history", fleet, "--json", "--limit", "2"))
    assert isinstance(events, list)
    assert [(e["event"], e["host"]) for e in events] == [
        ("started", "web-3"), ("finished", "web-3")]
    text = cronguard("history", fleet, "--since", "1h")
    assert text.returncode == 0
    assert len(text.stdout.splitlines()) == 6
    assert "web-2  finished" in text.stdout and "status=3" in text.stdout


def test_history_rejects_a_bad_duration(cronguard: Cronguard, key: str) -> None:
    result = cronguard("history", key, "--since", "soon")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("cronguard: error: --since (CRONGUARD_SINCE)")


# status


def test_status_shows_running_held_and_idle_jobs(
    cronguard: Cronguard, fleet: str, job: list[str], tmp_path: Path, key: str
) -> None:
    running_key = f"{key}-running"
    ready = tmp_path / "ready"
    process = cronguard.start("--key", running_key, "--", *job, "ready", str(ready),
                              "sleep", "60", CRONGUARD_HOST_ID="db-1")
    try:
        wait_for(ready.exists)
        idle_key = f"{key}-idle"
        assert run_as(cronguard, "web-2", idle_key, job).returncode == 0

        states = as_json(cronguard("status", fleet, running_key, idle_key, "--json"))
        assert isinstance(states, list)
        held, running, idle = states
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)

    assert held["key"] == fleet and held["state"] == "held"
    assert held["holder"]["host"] == "web-3" and held["holder"]["fence"] == 3
    assert 0 < held["holder"]["lease_left_s"] <= 60
    assert held["last_run"]["host"] == "web-3" and held["last_run"]["status"] == 0
    assert held["last_success"]["host"] == "web-3"
    assert 0 <= held["last_success_age_s"] < 60
    assert held["skips"] == {"web-1": 1}

    assert running["state"] == "running" and running["holder"]["host"] == "db-1"
    assert running["last_run"]["outcome"] == "running"
    assert running["last_success"] is None and running["last_success_age_s"] is None

    assert idle["state"] == "idle" and idle["holder"] is None
    assert idle["last_run"]["outcome"] == "ok"


def test_status_without_keys_finds_every_job(
    cronguard: Cronguard, fleet: str, job: list[str]
) -> None:
    other = f"{fleet}-other"
    assert run_as(cronguard, "web-1", other, job, "exit", "4").returncode == 4
    states = as_json(cronguard("status", "--json"))
    assert isinstance(states, list)
    keys = [state["key"] for state in states]
    assert fleet in keys and other in keys
    assert keys == sorted(keys)

    table = cronguard("status")
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith(other))
    assert "idle" in row and "web-1" in row and "never" in row


def test_status_keeps_apart_jobs_of_another_prefix(
    cronguard: Cronguard, key: str, job: list[str], tmp_path: Path
) -> None:
    # A config file written for runs (ttl) also serves status (prefix).
    config = tmp_path / "cronguard.toml"
    config.write_text('prefix = "elsewhere"\nttl = "30s"\n')
    assert cronguard("--key", key, "--release", "--", *job,
                     CRONGUARD_CONFIG=str(config)).returncode == 0
    mine = as_json(cronguard("status", "--json", CRONGUARD_CONFIG=str(config)))
    assert isinstance(mine, list)
    assert [state["key"] for state in mine] == [key]
    others = as_json(cronguard("status", "--json"))
    assert isinstance(others, list)
    assert key not in [state["key"] for state in others]


# check


def test_check_exit_codes_follow_the_last_success(
    cronguard: Cronguard, fleet: str, job: list[str]
) -> None:
    ok = cronguard("check", fleet, "--max-age", "1h")
    warning = cronguard("check", fleet, "--max-age", "1h", "--warn-age", "1ms")
    critical = cronguard("check", fleet, "--max-age", "1ms")
    never = f"{fleet}-never"
    assert run_as(cronguard, "web-2", never, job, "exit", "5").returncode == 5
    failing = cronguard("check", never, "--max-age", "1h")

    for result, code, word in ((ok, 0, "OK"), (warning, 1, "WARNING"),
                               (critical, 2, "CRITICAL"), (failing, 2, "CRITICAL")):
        assert result.returncode == code, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1 and CHECK_LINE.match(lines[0]), result.stdout
        assert lines[0].startswith(f"CRONGUARD {word} - ")
        assert result.stderr == ""
    for result in (ok, warning, critical):
        assert "web-3" in result.stdout and " ago" in result.stdout
    assert "no successful run" in failing.stdout


def test_check_is_unknown_when_the_store_cannot_be_read(
    cronguard: Cronguard, private_redis: RedisServer, key: str
) -> None:
    private_redis.kill()
    result = cronguard("check", key, "--max-age", "1h", "--redis-timeout", "200ms",
                       CRONGUARD_REDIS=private_redis.url)
    assert result.returncode == 3
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("CRONGUARD UNKNOWN - ")
    assert "cannot connect" in lines[0]


def test_check_without_max_age_is_a_usage_error(cronguard: Cronguard, key: str) -> None:
    result = cronguard("check", key)
    assert result.returncode == 2
    assert result.stderr.startswith("cronguard: error: check needs --max-age "
                                    "(CRONGUARD_MAX_AGE)")
    assert result.stderr.count("\n") == 1


# release


def test_release_removes_a_stuck_lease_and_records_it(
    cronguard: Cronguard, key: str, job: list[str], tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    ready = tmp_path / "ready"
    process = cronguard.start("--key", key, "--ttl", "5m", "--", *job,
                              "ready", str(ready), "sleep", "60",
                              CRONGUARD_HOST_ID="web-7")
    wait_for(ready.exists)
    process.kill()  # SIGKILL: the lease stays behind, stuck for five minutes
    process.wait(10)
    stuck = run_as(cronguard, "web-8", key, job, "exit", "9")
    assert stuck.returncode == 0  # skipped: the lease is still held

    mismatch = cronguard("release", key, "--if-fence", "99")
    assert mismatch.returncode == 1 and "fence 1" in mismatch.stdout
    result = cronguard("release", key, "--if-fence", "1", CRONGUARD_HOST_ID="ops-1")
    assert result.returncode == 0, result.stderr
    assert "removed the lease of web-7:" in result.stdout and "fence 1" in result.stdout
    with redis_server.client() as client:
        assert client.exists(f"cronguard:{{{key}}}:lease") == 0

    events = as_json(cronguard("history", key, "--json"))
    assert isinstance(events, list)
    released = events[-1]
    assert released["event"] == "released" and released["host"] == "ops-1"
    assert released["fence"] == 1 and json.loads(released["holder"])["host"] == "web-7"
    assert run_as(cronguard, "web-8", key, job, "exit", "9").returncode == 9

    again = cronguard("release", key)
    assert again.returncode == 0 and "nothing to release" in again.stdout


# timeline


def test_timeline_svg_is_valid_and_names_each_host(
    cronguard: Cronguard, fleet: str, tmp_path: Path
) -> None:
    path = tmp_path / "chart.svg"
    result = cronguard("timeline", fleet, "--svg", str(path), COLUMNS="100")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[0].strip(): line for line in result.stdout.splitlines()
            if "│" in line}
    assert set(rows) == {"web-1", "web-2", "web-3"}
    assert "X" in rows["web-2"] and "█" in rows["web-1"]

    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    hosts = [t.text for t in root.iter(f"{ns}text") if t.get("class") == "host"]
    assert hosts == ["web-1", "web-2", "web-3"]
    outcomes = [r.get("data-outcome") for r in root.iter(f"{ns}rect")
                if r.get("class") == "run"]
    assert sorted(outcomes) == ["failed", "ok", "ok"]


def test_timeline_svg_to_an_unwritable_path_is_a_usage_error(
    cronguard: Cronguard, fleet: str, tmp_path: Path
) -> None:
    result = cronguard("timeline", fleet, "--svg", str(tmp_path / "no" / "x.svg"))
    assert result.returncode == 2
    assert result.stderr.startswith("cronguard: error: --svg (CRONGUARD_SVG)")


# metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_parse_and_carry_the_right_values(
    cronguard: Cronguard, fleet: str
) -> None:
    result = cronguard("metrics", fleet)
    assert result.returncode == 0, result.stderr
    samples = _samples(result.stdout)
    job = (("job", fleet),)
    assert samples[("cronguard_store_up", ())] == 1
    assert samples[("cronguard_last_run_exit_status", job)] == 0
    assert samples[("cronguard_runs", (("job", fleet), ("outcome", "ok")))] == 2
    assert samples[("cronguard_runs", (("job", fleet), ("outcome", "failed")))] == 1
    assert samples[("cronguard_skips_total", (("host", "web-1"), ("job", fleet)))] == 1
    assert samples[("cronguard_lease_held", job)] == 1
    assert samples[("cronguard_running", job)] == 0

    events = as_json(cronguard("history", fleet, "--json"))
    assert isinstance(events, list)
    last_end = int(events[-1]["id"].split("-")[0]) / 1000
    assert samples[("cronguard_last_success_timestamp_seconds", job)] == last_end
    duration = events[-1]["duration_ms"] / 1000
    assert samples[("cronguard_last_run_duration_seconds", job)] == duration


def test_metrics_textfile_is_written_whole(
    cronguard: Cronguard, fleet: str, tmp_path: Path
) -> None:
    path = tmp_path / "cronguard.prom"
    path.write_text("stale\n")
    result = cronguard("metrics", "--textfile", str(path))
    assert result.returncode == 0 and result.stdout == ""
    assert os.listdir(tmp_path) == ["cronguard.prom"]  # no temporary file left
    samples = _samples(path.read_text())
    assert samples[("cronguard_runs", (("job", fleet), ("outcome", "ok")))] == 2


def test_metrics_textfile_reports_an_unreachable_store(
    cronguard: Cronguard, private_redis: RedisServer, tmp_path: Path
) -> None:
    private_redis.kill()
    path = tmp_path / "cronguard.prom"
    result = cronguard("metrics", "--textfile", str(path), "--redis-timeout", "200ms",
                       CRONGUARD_REDIS=private_redis.url)
    assert result.returncode == 75
    assert result.stderr.startswith("cronguard: error: cannot connect")
    assert _samples(path.read_text())[("cronguard_store_up", ())] == 0


# doctor


def _doctor(cronguard: Cronguard, url: str) -> tuple[int, dict[str, list[str]]]:
    result = cronguard("doctor", CRONGUARD_REDIS=url)
    lines: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        level, _, rest = line.partition("  ")
        lines.setdefault(rest.strip().split(":")[0], []).append(level.strip())
        lines.setdefault("text", []).append(line)
    return result.returncode, lines


def test_doctor_passes_a_fit_store(tmp_path: Path, cronguard: Cronguard) -> None:
    with RedisServer(tmp_path / "aof", config_lines=["appendonly yes"]) as server:
        status, lines = _doctor(cronguard, server.url)
    assert status == 0, lines["text"]
    for check in ("reachable", "server", "permissions", "clock", "eviction",
                  "persistence"):
        assert lines[check] and set(lines[check]) == {"ok"}, lines["text"]


def test_doctor_warns_of_an_eviction_policy_that_evicts_leases(
    private_redis: RedisServer, cronguard: Cronguard
) -> None:
    for policy in ("allkeys-lru", "volatile-ttl"):
        with private_redis.client() as client:
            client.config_set("maxmemory-policy", policy)
        status, lines = _doctor(cronguard, private_redis.url)
        assert status == 1
        assert lines["eviction"] == ["warn"]
        assert any(policy in line and "noeviction" in line for line in lines["text"])
    # The test servers run without persistence, which is warned about too.
    assert lines["persistence"] == ["warn"]


@pytest.mark.parametrize("rules", ["+@all -xadd", "+@all -acl -xadd"],
                         ids=["dryrun", "trying"])
def test_doctor_finds_a_denied_command(
    private_redis: RedisServer, cronguard: Cronguard, rules: str
) -> None:
    with private_redis.client() as client:
        client.execute_command("ACL", "SETUSER", "jobs", "on", ">s3cret",
                               "~cronguard:*", *rules.split())
    url = f"redis://jobs:s3cret@127.0.0.1:{private_redis.port}/0"
    status, lines = _doctor(cronguard, url)
    assert status == 1
    assert lines["permissions"][0] == "FAIL"
    denied = next(line for line in lines["text"] if "may not run" in line)
    assert "user jobs may not run XADD" in denied and "+xadd" in denied
    assert ("ACL DRYRUN" in " ".join(lines["text"])) == (rules == "+@all -xadd")
    assert "s3cret" not in " ".join(lines["text"])


def test_doctor_reports_an_unreachable_store(
    private_redis: RedisServer, cronguard: Cronguard
) -> None:
    private_redis.kill()
    status, lines = _doctor(cronguard, private_redis.url)
    assert status == 1
    assert lines["reachable"] == ["FAIL"] and len(lines["text"]) == 1


# syslog


def test_syslog_receives_the_run_facility_cron(
    cronguard: Cronguard, key: str, job: list[str], tmp_path: Path
) -> None:
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(15)
        result = cronguard("--key", key, "--release", "--syslog",
                           "--syslog-socket", path, "--", *job)
        assert result.returncode == 0 and result.stderr == ""
        first = listener.recv(4096).decode()
    cron_info = 9 * 8 + 6  # LOG_CRON, LOG_INFO
    assert first.startswith(f"<{cron_info}>cronguard[")
    assert f"{key}: acquired" in first


def test_syslog_without_a_socket_fails_before_taking_the_lease(
    cronguard: Cronguard, key: str, job: list[str], tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    missing = str(tmp_path / "nothing-here")
    result = cronguard("--key", key, "--", *job, CRONGUARD_SYSLOG="1",
                       CRONGUARD_SYSLOG_SOCKET=missing)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("cronguard: error: --syslog (CRONGUARD_SYSLOG)")
    assert "--syslog-socket (CRONGUARD_SYSLOG_SOCKET)" in result.stderr
    with redis_server.client() as client:
        assert client.exists(f"cronguard:{{{key}}}:lease") == 0


# Docs


@pytest.mark.parametrize("name", ["status", "history", "timeline", "check",
                                  "release", "doctor", "metrics", "run"])
def test_every_option_has_help_an_env_var_and_docs(name: str) -> None:
    import typer

    from cronguard.cli_admin import app

    root = Path(__file__).parent.parent
    man = (root / "man" / "cronguard.1").read_text().replace("\\-", "-")
    readme = (root / "README.md").read_text()
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    if name != "run":
        assert f"cronguard {name}" in man.replace("\\fB", "").replace("\\fP", "")
        assert f"cronguard {name}" in readme and f"**{name}**" in readme
    for param in command.params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        flag = max(param.opts, key=len)
        assert param.help, f"{name} {flag} has no help"
        assert param.envvar == "CRONGUARD_" + flag[2:].replace("-", "_").upper()
        assert flag in man, f"{flag} is missing from man/cronguard.1"
        assert f"`{flag}" in readme, f"{flag} is missing from README.md"


def test_a_reader_that_goes_away_ends_the_output_quietly(
    cronguard: Cronguard, key: str
) -> None:
    cronguard("--key", key, "--", "true")
    reader = subprocess.Popen(
        [cronguard.binary, "status", "--json"],
        env=cronguard.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.close()  # like head, gone before the table is written
    status = reader.wait(30)
    assert (status, reader.stderr.read()) == (141, "")
