"""Settings: the configuration file, and checking every value once.

Every run option has three sources besides its default, in this order of
precedence: the flag, the ``CRONGUARD_<NAME>`` environment variable (both
handled by the command line), and a key of the same name in the TOML file
given by ``--config`` or ``CRONGUARD_CONFIG``, else ``/etc/cronguard.toml``
when it exists.  The file's keys are the long option names: ``ttl``,
``redis-timeout``, ``no-renew``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .durations import parse_duration
from .errors import UsageError
from .store import DEFAULT_URL, StoreSettings, url_has_password

DEFAULT_PATH = "/etc/cronguard.toml"
_SECRET_KEYS = ("redis", "redis-password")


def env_name(option: str) -> str:
    """``redis-timeout`` -> ``CRONGUARD_REDIS_TIMEOUT``."""
    return "CRONGUARD_" + option.replace("-", "_").upper()


def describe(option: str) -> str:
    """How to name an option in a message: the flag and the variable."""
    return f"--{option} ({env_name(option)})"


def find_file(given: str | None) -> str | None:
    """The configuration file to read: the one given, else the default if any."""
    if given:
        return given
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None


def load_file(path: str, known: Iterable[str]) -> dict[str, Any]:
    """Read ``path`` and return its settings keyed by long option name."""
    import tomllib  # only when there is a file to read

    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = tomllib.load(handle)
    except OSError as exc:
        raise UsageError(
            f"cannot read config file {path}: {exc.strerror}; fix the path given "
            "by --config (CRONGUARD_CONFIG)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None

    allowed = set(known)
    settings: dict[str, Any] = {}
    for raw_name, value in data.items():
        name = raw_name.replace("_", "-")
        if name not in allowed:
            raise UsageError(
                f"config file {path}: unknown setting {raw_name!r}; settings are "
                "long option names such as ttl, redis or redis-timeout"
            )
        settings[name] = value

    holds_secret = "redis-password" in settings or (
        isinstance(settings.get("redis"), str) and url_has_password(settings["redis"])
    )
    if holds_secret and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"config file {path} holds a password but others may read it "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    return settings


# Checking values


def duration(option: str, value: Any, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UsageError(f"{describe(option)}: {value!r} is not a duration")
    try:
        seconds = parse_duration(str(value))
    except ValueError as exc:
        raise UsageError(f"{describe(option)}: {exc}") from None
    if seconds < minimum:
        raise UsageError(
            f"{describe(option)}: {value!r} is too short; give at least "
            f"{minimum * 1000:g}ms"
        )
    return seconds


def optional_duration(option: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    seconds = duration(option, value)
    return seconds or None


def integer(option: str, value: Any, low: int, high: int) -> int:
    try:
        number = int(value)
        if isinstance(value, bool) or str(number) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise UsageError(
            f"{describe(option)}: {value!r} is not a whole number"
        ) from None
    if not low <= number <= high:
        raise UsageError(
            f"{describe(option)}: {number} is not between {low} and {high}"
        )
    return number


def choice(option: str, value: Any, choices: tuple[str, ...]) -> str:
    text = str(value).lower()
    if text not in choices:
        raise UsageError(
            f"{describe(option)}: {value!r} is not one of {', '.join(choices)}"
        )
    return text


def flag(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise UsageError(f"{describe(option)}: {value!r} is not true or false")


def read_password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.read().rstrip("\r\n")
    except OSError as exc:
        raise UsageError(
            f"cannot read password file {path}: {exc.strerror}; fix "
            f"{describe('redis-password-file')}"
        ) from None
    if not password:
        raise UsageError(f"password file {path} is empty")
    return password


def store_settings(
    values: Mapping[str, Any], environ: Mapping[str, str]
) -> StoreSettings:
    """The store settings from option values (already merged with the file)."""
    url = values.get("redis") or environ.get("REDIS_URL") or DEFAULT_URL
    password = values.get("redis-password") or environ.get("CRONGUARD_REDIS_PASSWORD")
    if values.get("redis-password-file"):
        password = read_password_file(values["redis-password-file"])
    prefix = str(values.get("prefix") or "cronguard")
    from .keys import validate_key

    validate_key(prefix, "--prefix")
    settings = StoreSettings(
        url=str(url),
        password=password or None,
        timeout=duration("redis-timeout", values.get("redis-timeout", "2s"),
                         minimum=0.001),
        prefix=prefix,
    )
    settings.validate()
    return settings


@dataclass(frozen=True)
class RunSettings:
    """Everything one run needs, checked."""

    command: list[str]
    key: str
    ttl: float
    release: bool
    renew: bool
    wait: float
    timeout: float | None
    kill_after: float
    on_lost: str
    on_error: str
    skip_exit: int
    store: StoreSettings
    key_given: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        command: list[str],
        values: Mapping[str, Any],
        environ: Mapping[str, str],
    ) -> RunSettings:
        from .keys import derive_key, validate_key

        if not command:
            raise UsageError(
                "no command to run; put it after the options, as in "
                "cronguard --key KEY -- COMMAND [ARG...]"
            )
        given_key = values.get("key")
        key = validate_key(str(given_key)) if given_key else derive_key(command)
        return cls(
            command=list(command),
            key=key,
            ttl=duration("ttl", values.get("ttl", "55s"), minimum=0.01),
            release=flag("release", values.get("release", False)),
            renew=not flag("no-renew", values.get("no-renew", False)),
            wait=duration("wait", values.get("wait", 0)),
            timeout=optional_duration("timeout", values.get("timeout")),
            kill_after=duration("kill-after", values.get("kill-after", "10s")),
            on_lost=choice(
                "on-lost", values.get("on-lost", "term"), ("term", "ignore")
            ),
            on_error=choice(
                "on-error", values.get("on-error", "fail"), ("fail", "skip", "run")
            ),
            skip_exit=integer("skip-exit", values.get("skip-exit", 0), 0, 255),
            store=store_settings(values, environ),
            key_given=bool(given_key),
        )
