"""Where settings come from, seen through what the installed command does."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Cronguard
from servers import RedisServer


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cronguard.toml"
    path.write_text('ttl = "7s"\nskip-exit = 4\n')
    return path


def acquired_ttl(result_stderr: str) -> str:
    line = next(x for x in result_stderr.splitlines() if "acquired" in x)
    return line.rsplit("ttl ", 1)[1].rstrip(")")


def test_flag_beats_environment_beats_file_beats_default(
    cronguard: Cronguard, key: str, config: Path
) -> None:
    def ttl_of(*args: str, **env: str) -> str:
        done = cronguard(
            "-v",
            "--key",
            f"{key}-{len(args)}-{len(env)}",
            "--release",
            *args,
            "--",
            "true",
            **env,
        )
        assert done.returncode == 0, done.stderr
        return acquired_ttl(done.stderr)

    assert ttl_of("--config", str(config)) == "7s"
    assert ttl_of(CRONGUARD_CONFIG=str(config)) == "7s"
    assert ttl_of(CRONGUARD_CONFIG=str(config), CRONGUARD_TTL="8s") == "8s"
    assert (
        ttl_of("--ttl", "9s", CRONGUARD_CONFIG=str(config), CRONGUARD_TTL="8s") == "9s"
    )
    assert ttl_of("--config", "/dev/null") == "55s"


def test_file_sets_the_skip_status(
    cronguard: Cronguard, key: str, config: Path
) -> None:
    cronguard("--key", key, "--", "true")
    skipped = cronguard("--key", key, "--config", str(config), "--", "true")
    assert skipped.returncode == 4


def test_store_url_falls_back_to_redis_url(
    cronguard: Cronguard, key: str, redis_server: RedisServer
) -> None:
    env = {k: v for k, v in cronguard.env.items() if k != "CRONGUARD_REDIS"}
    fallback = Cronguard(cronguard.binary, {**env, "REDIS_URL": redis_server.url})
    done = fallback("--key", key, "--", "true")
    assert done.returncode == 0, done.stderr
    assert redis_server.client().exists(f"cronguard:{{{key}}}:lease")


@pytest.fixture
def locked_redis(tmp_path: Path) -> RedisServer:
    server = RedisServer(
        tmp_path / "locked",
        config_lines=[
            "requirepass s3cret-pw",
            # A user that may do everything but run scripts.
            "user noscript on >n0pe ~* +@all -eval -evalsha",
        ],
    )
    return server


def test_password_sources_and_rejected_auth(
    cronguard: Cronguard, key: str, tmp_path: Path, locked_redis: RedisServer
) -> None:
    with locked_redis:
        host = f"127.0.0.1:{locked_redis.port}"
        in_url = cronguard(
            "--key",
            f"{key}-url",
            "--release",
            "--",
            "true",
            CRONGUARD_REDIS=f"redis://:s3cret-pw@{host}/0",
        )
        from_env = cronguard(
            "--key",
            f"{key}-env",
            "--release",
            "--",
            "true",
            CRONGUARD_REDIS=f"redis://{host}/0",
            CRONGUARD_REDIS_PASSWORD="s3cret-pw",
        )
        secret = tmp_path / "password"
        secret.write_text("s3cret-pw\n")
        from_file = cronguard(
            "--key",
            f"{key}-file",
            "--release",
            "--redis-password-file",
            str(secret),
            "--",
            "true",
            CRONGUARD_REDIS=f"redis://{host}/0",
        )
        wrong = cronguard(
            "--key", key, "--", "true", CRONGUARD_REDIS=f"redis://:wrong-pw@{host}/0"
        )
        denied = cronguard(
            "--key",
            key,
            "--",
            "true",
            CRONGUARD_REDIS=f"redis://noscript:n0pe@{host}/0",
        )
        typed = cronguard(
            "--redis",
            f"redis://:s3cret-pw@{host}/0",
            "--key",
            f"{key}-typed",
            "--release",
            "--",
            "true",
        )

    assert [in_url.returncode, from_env.returncode, from_file.returncode] == [0, 0, 0]
    assert wrong.returncode == 75
    assert "authentication failed" in wrong.stderr and "wrong-pw" not in wrong.stderr
    assert wrong.stderr.count("\n") == 1
    assert denied.returncode == 75
    assert "may not" in denied.stderr and "n0pe" not in denied.stderr
    assert typed.returncode == 0 and "visible to every user in ps" in typed.stderr
    assert "s3cret-pw" not in typed.stderr
