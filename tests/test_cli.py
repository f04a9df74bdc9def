"""Parsing, configuration and messages, in process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cronguard import __version__
from cronguard.cli import app, main
from cronguard.config import load_file
from cronguard.errors import UsageError
from cronguard.keys import derive_key, validate_key
from cronguard.store import redact

runner = CliRunner()


def fail_with(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``main`` as the command would; return its status and its stderr."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return int(stopped.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--ttl", "5x", "--", "true"],
            "--ttl (CRONGUARD_TTL): '5x' is not a duration",
        ),
        (["--key", "bad key", "--", "true"], "--key 'bad key' contains ' '"),
        (["--key", "k" * 201, "--", "true"], "is 201 characters long"),
        (["--redis", "http://h", "--", "true"], "is not a store URL"),
        (["--skip-exit", "300", "--", "true"], "300 is not between 0 and 255"),
        (["--on-lost", "maybe", "--", "true"], "'maybe' is not one of term, ignore"),
        (["--kye", "x", "--", "true"], "No such option: --kye"),
        (["--key", "x"], "no command to run"),
        (["--log-format", "xml", "--", "true"], "is not text or json"),
        (
            ["--redis-password-file", "/nonexistent", "--", "true"],
            "cannot read password file /nonexistent",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = fail_with(["--config", os.devnull, *argv], capsys)
    assert status == 2
    assert err.startswith("cronguard: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_version_and_help() -> None:
    version = runner.invoke(app, ["--version"])
    assert (version.exit_code, version.stdout) == (0, f"cronguard {__version__}\n")
    helped = runner.invoke(app, ["run", "--help"])
    assert helped.exit_code == 0
    for option in (
        "--key",
        "--ttl",
        "--release",
        "--no-renew",
        "--wait",
        "--timeout",
        "--kill-after",
        "--on-lost",
        "--on-error",
        "--skip-exit",
        "--redis",
        "--redis-timeout",
        "--redis-password-file",
        "--prefix",
        "--config",
        "--log-format",
        "CRONGUARD_TTL",
    ):
        assert option in helped.stdout


def test_config_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("tll = 5\n")
    status, err = fail_with(["--config", str(unknown), "--", "true"], capsys)
    assert status == 2 and "unknown setting 'tll'" in err

    broken = tmp_path / "broken.toml"
    broken.write_text("ttl = \n")
    status, err = fail_with(["--config", str(broken), "--", "true"], capsys)
    assert status == 2 and "is not valid TOML" in err

    secret = tmp_path / "secret.toml"
    secret.write_text('redis = "redis://:hunter2@localhost:6379/0"\n')
    secret.chmod(0o644)
    status, err = fail_with(["--config", str(secret), "--", "true"], capsys)
    assert status == 2 and "chmod 600" in err and "hunter2" not in err
    secret.chmod(0o600)
    assert load_file(str(secret), ["redis"])["redis"].endswith("@localhost:6379/0")


def test_keys() -> None:
    assert validate_key("reports/daily@eu-1:v2+x.y_z") == "reports/daily@eu-1:v2+x.y_z"
    for bad in ("", "a b", "{tag}", "k" * 201, "é"):
        with pytest.raises(UsageError):
            validate_key(bad)
    line = ["php", "artisan", "invoices:send"]
    assert derive_key(line) == derive_key(list(line))
    assert derive_key(line) != derive_key(["php", "artisan", "invoices:sent"])
    assert derive_key(["/usr/bin/my job"]).startswith("my_job-")
    validate_key(derive_key(["/usr/bin/my job", "--x=ü"]))


def test_passwords_are_redacted() -> None:
    assert redact("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"
    assert redact("unix:///run/redis.sock") == "unix:///run/redis.sock"
