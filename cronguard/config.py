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
from typing import TYPE_CHECKING, Any, NamedTuple

from .durations import parse_duration
from .errors import UsageError
from .store import DEFAULT_URL, StoreSettings, url_has_password

if TYPE_CHECKING:
    from .schedule import Schedule

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

    urls = settings.get("redis")
    urls = urls if isinstance(urls, list) else [urls]
    holds_secret = "redis-password" in settings or any(
        isinstance(url, str) and url_has_password(url) for url in urls
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


def store_urls(value: Any, environ: Mapping[str, str]) -> list[str]:
    """The store URLs given: one, or several for quorum mode.

    ``--redis`` may be repeated; the variable and the file may list several
    (space-separated, or a TOML array).
    """
    if isinstance(value, str):
        urls = value.split()
    elif isinstance(value, (list, tuple)):
        urls = [word for item in value for word in str(item).split()]
    else:
        urls = []
    return urls or [environ.get("REDIS_URL") or DEFAULT_URL]


def tls_file(option: str, value: Any) -> str | None:
    if not value:
        return None
    path = str(value)
    if not os.access(path, os.R_OK):
        raise UsageError(f"{describe(option)}: cannot read {path}; fix the path")
    return path


def store_settings(
    values: Mapping[str, Any], environ: Mapping[str, str]
) -> StoreSettings:
    """The store settings from option values (already merged with the file)."""
    urls = store_urls(values.get("redis"), environ)
    url = urls[0]
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
        nodes=tuple(urls) if len(urls) > 1 else (),
        sentinel_password=sentinel_password(values, environ),
        tls_ca=tls_file("tls-ca", values.get("tls-ca")),
        tls_cert=tls_file("tls-cert", values.get("tls-cert")),
        tls_key=tls_file("tls-key", values.get("tls-key")),
        min_replicas=integer("min-replicas", values.get("min-replicas") or 0, 0, 100),
    )
    settings.validate()
    return settings


def sentinel_password(
    values: Mapping[str, Any], environ: Mapping[str, str]
) -> str | None:
    """The sentinels' own password: a file, else ``CRONGUARD_SENTINEL_PASSWORD``."""
    if values.get("sentinel-password-file"):
        return read_password_file(values["sentinel-password-file"])
    return environ.get("CRONGUARD_SENTINEL_PASSWORD") or None


# Settings records are NamedTuples, not frozen dataclasses: every cron firing
# imports this module, and defining a frozen dataclass costs several times more.
class RunSettings(NamedTuple):
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
    slot: SlotSettings | None = None  # slot mode when set

    @classmethod
    def build(
        cls,
        command: list[str],
        values: Mapping[str, Any],
        environ: Mapping[str, str],
        given: Iterable[str] = (),
    ) -> RunSettings:
        """Check ``values``; ``given`` names the options set on the command
        line, which must not contradict the mode."""
        from .keys import derive_key, validate_key

        if not command:
            raise UsageError(
                "no command to run; put it after the options, as in "
                "cronguard --key KEY -- COMMAND [ARG...]"
            )
        given_key = values.get("key")
        key = validate_key(str(given_key)) if given_key else derive_key(command)
        settings = cls(
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
            slot=slot_settings(values, frozenset(given)),
        )
        settings.check_store_fits_mode()
        return settings

    def check_store_fits_mode(self) -> None:
        """Slot mode's scripts run on one server: quorum mode cannot vote on a
        slot claim."""
        if self.slot is None:
            return
        if self.store.nodes:
            raise UsageError(
                "slot mode (--every, --schedule) needs one store, not a quorum: "
                "a slot claimed on a minority of nodes could run twice; give "
                "--redis (CRONGUARD_REDIS) once"
            )


# Slot mode

# Options that only TTL-window mode has, with what to use in slot mode instead.
_TTL_ONLY = {
    "ttl": "slot mode holds a running lease of --lease (CRONGUARD_LEASE)",
    "wait": "slot mode waits for the winner with --standby (CRONGUARD_STANDBY)",
    "release": "slot mode always releases its lease when COMMAND ends",
    "no-renew": "slot mode always renews its lease while COMMAND runs",
}
_SLOT_ONLY = ("tz", "tolerance", "lease", "overlap", "standby")
MAX_DEFAULT_LEASE = 30.0
MIN_DEFAULT_LEASE = 1.0


class SlotSettings(NamedTuple):
    """The settings of slot mode (``--every`` or ``--schedule``), checked."""

    schedule: Schedule
    tolerance: float
    lease: float
    overlap: str
    standby: float


def default_lease(interval: float) -> float:
    """A slot's running lease: a slot long, within 1 to 30 seconds.

    A standby takes over within one lease after the holder dies, and a
    crashed run blocks later slots (``--overlap skip``) as long; shorter is
    quicker, but renewals come every third of it, so a store that stalls
    for longer than the lease costs the run.
    """
    return min(max(interval, MIN_DEFAULT_LEASE), MAX_DEFAULT_LEASE)


def slot_settings(
    values: Mapping[str, Any], given: frozenset[str]
) -> SlotSettings | None:
    """Slot mode's settings, or None in TTL-window mode.

    Options of the other mode are refused when given on the command line;
    from the environment or the configuration file they are defaults shared
    by many lines, and are ignored where they do not apply.
    """
    every, expression = values.get("every"), values.get("schedule")
    if every in (None, "") and expression in (None, ""):
        for option in _SLOT_ONLY:
            if option in given:
                raise UsageError(
                    f"--{option} applies to slot mode only; add --every DURATION "
                    "(CRONGUARD_EVERY) or --schedule 'CRON EXPR' (CRONGUARD_SCHEDULE)"
                )
        return None
    for option, instead in _TTL_ONLY.items():
        if option in given:
            raise UsageError(
                f"--{option} cannot be combined with --every or --schedule: "
                f"{instead}; drop --{option}"
            )
    if every not in (None, "") and expression not in (None, ""):
        raise UsageError(
            "--every (CRONGUARD_EVERY) and --schedule (CRONGUARD_SCHEDULE) "
            "both given; keep one of them"
        )

    from . import schedule as slots

    zone = values.get("tz")
    chosen: Schedule
    if every not in (None, ""):
        if zone not in (None, "") and "tz" in given:
            raise UsageError(
                "--tz applies to --schedule only: --every counts slots from the "
                "Unix epoch in UTC; drop --tz"
            )
        try:
            chosen = slots.Interval(duration("every", every))
        except ValueError as exc:
            raise UsageError(f"{describe('every')}: {every!r} {exc}") from None
    else:
        try:
            tz = slots.zone_named(str(zone)) if zone not in (None, "") else None
        except ValueError as exc:
            raise UsageError(
                f"{describe('tz')}: {exc}; give an IANA name such as "
                "Europe/Berlin or UTC"
            ) from None
        try:
            chosen = slots.CronSchedule(str(expression), tz)
        except ValueError as exc:
            raise UsageError(
                f"{describe('schedule')}: {str(expression)!r} {exc}; write five "
                "fields such as '*/5 * * * *', or @hourly"
            ) from None

    interval = chosen.shortest
    tolerance = (
        duration("tolerance", values["tolerance"])
        if values.get("tolerance") not in (None, "")
        else slots.default_tolerance(interval)
    )
    if tolerance >= interval / 2:
        raise UsageError(
            f"{describe('tolerance')}: {tolerance:g}s is not shorter than half a "
            f"slot ({interval / 2:g}s); give a smaller tolerance"
        )
    lease = (
        duration("lease", values["lease"], minimum=0.01)
        if values.get("lease") not in (None, "")
        else default_lease(interval)
    )
    return SlotSettings(
        schedule=chosen,
        tolerance=tolerance,
        lease=lease,
        overlap=choice("overlap", values.get("overlap") or "skip", ("skip", "allow")),
        standby=duration("standby", values.get("standby") or 0),
    )
