"""The ``cronguard`` command line: a thin layer over the library.

``cronguard [OPTIONS] [--] COMMAND`` is short for ``cronguard run ...``: when
the first word is not a subcommand, ``run`` is implied, so every crontab line
keeps its natural form.  A word after ``--`` is always the command.
"""

# No "from __future__ import annotations" here: typer reads these signatures
# on every run, and string annotations would cost a round of eval() each time.
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Annotated, Any, NoReturn

import typer
from typer import _click as click  # the copy of click that typer carries
from typer._click.core import ParameterSource
from typer.core import TyperGroup

from . import __version__
from . import log as logsetup
from .config import RunSettings, env_name, find_file, load_file
from .errors import EXIT_USAGE, CronguardError
from .store import url_has_password

log = logging.getLogger("cronguard")

EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in cronguard


_GROUP_OPTIONS = (
    "--help",
    "-h",
    "--version",
    "--install-completion",
    "--show-completion",
)


# The group's subcommands, known without importing cli_admin, where they are
# defined (a test keeps the two in step).
SUBCOMMANDS = (
    "run",
    "status",
    "history",
    "timeline",
    "check",
    "release",
    "doctor",
    "metrics",
)


def _names_group(word: str) -> bool:
    """Is ``word`` a subcommand or an option of the group, not of ``run``?"""
    return word in SUBCOMMANDS or word in _GROUP_OPTIONS


def group_command() -> Any:
    """The whole command group, with the administrative subcommands."""
    from . import cli_admin  # noqa: F401 - registers the subcommands on app

    return typer.main.get_command(app)


class _ImpliedRun(TyperGroup):
    """A group whose default subcommand is ``run``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not _names_group(args[0]):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def shell_complete(
        self, ctx: click.Context, incomplete: str
    ) -> list[click.shell_completion.CompletionItem]:
        """Offer run's options too at the first word, where ``run`` is implied.

        Once a word is typed, parse_args above has already routed completion
        to ``run``; only the first word is completed against the group.
        """
        items = super().shell_complete(ctx, incomplete)
        run = self.commands.get("run")
        if run is not None and incomplete.startswith("-"):
            seen = {item.value for item in items}
            items += [
                item
                for item in run.shell_complete(ctx, incomplete)
                if item.value not in seen
            ]
        return items


app = typer.Typer(
    cls=_ImpliedRun,
    name="cronguard",
    help=(
        "Run a cron job on exactly one host of a fleet, under a Redis lease.\n\n"
        "cronguard [RUN OPTIONS] [--] COMMAND [ARG...] is short for "
        "cronguard run ...; see cronguard run --help."
    ),
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"cronguard {__version__}")
        raise typer.Exit()


@app.callback()
def _group(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_show_version,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    pass


def _option(*names: str, help: str, env: str | None = None, **kwargs: Any) -> Any:
    """A typer option whose variable is CRONGUARD_<LONG NAME>."""
    long_name = next(n for n in names if n.startswith("--"))
    variable = env or env_name(long_name[2:])
    return typer.Option(*names, help=help, envvar=variable, show_envvar=True, **kwargs)


# Store options, shared by every subcommand that talks to Redis.
Redis = Annotated[
    str | None,
    _option(
        "--redis",
        metavar="URL",
        help="Lock store: redis:// or unix:// URL, "
        "redis+sentinel://H:P[,H:P...]/SERVICE[/DB] or redis+cluster://H:P[,...]; "
        "rediss://, rediss+sentinel://, rediss+cluster:// for TLS "
        "[default: REDIS_URL, else redis://localhost:6379/0].",
    ),
]
# The run command takes --redis more than once: three or more servers vote.
RedisNodes = Annotated[
    list[str] | None,
    _option(
        "--redis",
        metavar="URL",
        help="Lock store: redis:// or unix:// URL, "
        "redis+sentinel://H:P[,H:P...]/SERVICE[/DB] or "
        "redis+cluster://H:P[,H:P...]; rediss://, rediss+sentinel://, "
        "rediss+cluster:// for TLS; three or more times for a quorum "
        "[default: REDIS_URL, else redis://localhost:6379/0].",
    ),
]
RedisTimeout = Annotated[
    str,
    _option(
        "--redis-timeout",
        metavar="DURATION",
        help="Limit for each store request; failed requests are tried twice more.",
    ),
]
RedisPasswordFile = Annotated[
    str | None,
    _option(
        "--redis-password-file",
        metavar="FILE",
        help="Read the store password from FILE (or set CRONGUARD_REDIS_PASSWORD).",
    ),
]
SentinelPasswordFile = Annotated[
    str | None,
    _option(
        "--sentinel-password-file",
        metavar="FILE",
        help="Read the sentinels' own password from FILE "
        "(or set CRONGUARD_SENTINEL_PASSWORD).",
    ),
]
TlsCa = Annotated[
    str | None,
    _option(
        "--tls-ca",
        metavar="FILE",
        help="CA certificates (PEM) to verify the servers of a rediss://, "
        "rediss+sentinel:// or rediss+cluster:// store [default: the system's].",
    ),
]
TlsCert = Annotated[
    str | None,
    _option(
        "--tls-cert",
        metavar="FILE",
        help="Client certificate (PEM) for TLS servers that ask for one.",
    ),
]
TlsKey = Annotated[
    str | None,
    _option("--tls-key", metavar="FILE", help="Private key (PEM) of --tls-cert."),
]
Prefix = Annotated[str, _option("--prefix", help="Prefix of every Redis key.")]
Config = Annotated[
    str | None,
    _option(
        "--config",
        metavar="FILE",
        help=f"TOML file of option defaults [default: {'/etc/cronguard.toml'}"
        " if it exists].",
    ),
]
Verbose = Annotated[
    int,
    _option(
        "-v",
        "--verbose",
        count=True,
        help="Say what happened (-v), add debug detail (-vv).",
    ),
]
Quiet = Annotated[bool, _option("-q", "--quiet", help="Print errors only.")]
LogFormat = Annotated[
    str, _option("--log-format", metavar="text|json", help="Format of log lines.")
]
Debug = Annotated[bool, _option("--debug", help="Show tracebacks of errors.")]
Syslog = Annotated[
    bool, _option("--syslog", help="Also log to the local syslog, facility cron.")
]
SyslogSocket = Annotated[
    str,
    _option("--syslog-socket", metavar="PATH", help="The syslog socket for --syslog."),
]


def run_command(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="[--] COMMAND [ARG...]", show_default=False),
    ] = None,
    key: Annotated[
        str | None,
        _option(
            "-k",
            "--key",
            help="Job name shared by every host [default: derived from COMMAND].",
        ),
    ] = None,
    ttl: Annotated[
        str,
        _option(
            "--ttl",
            metavar="DURATION",
            help="Lease length: held at least this long from acquisition.",
        ),
    ] = "55s",
    release: Annotated[
        bool,
        _option("--release", help="Release the lease when COMMAND ends (a mutex)."),
    ] = False,
    no_renew: Annotated[
        bool,
        _option(
            "--no-renew",
            help="Do not renew: the lease expires after --ttl even if COMMAND runs on.",
        ),
    ] = False,
    wait: Annotated[
        str,
        _option(
            "--wait",
            metavar="DURATION",
            help="Keep trying for the lease this long before skipping.",
        ),
    ] = "0",
    timeout: Annotated[
        str | None,
        _option(
            "--timeout",
            metavar="DURATION",
            help="Stop COMMAND after this long; exit 124.",
        ),
    ] = None,
    kill_after: Annotated[
        str,
        _option(
            "--kill-after",
            metavar="DURATION",
            help="Send SIGKILL this long after SIGTERM when stopping COMMAND.",
        ),
    ] = "10s",
    on_lost: Annotated[
        str,
        _option(
            "--on-lost",
            metavar="term|ignore",
            help="When the lease is lost mid-run: stop COMMAND and exit 76, "
            "or only log.",
        ),
    ] = "term",
    on_error: Annotated[
        str,
        _option(
            "--on-error",
            metavar="fail|skip|run",
            help="When the store fails at start: exit 75, skip, or run unguarded.",
        ),
    ] = "fail",
    skip_exit: Annotated[
        str,
        _option(
            "--skip-exit",
            metavar="N",
            help="Exit status when another host holds the lease.",
        ),
    ] = "0",
    min_replicas: Annotated[
        str,
        _option(
            "--min-replicas",
            metavar="N",
            help="Count the lease, or in slot mode the claim, only once N "
            "replicas have it (WAIT, up to --redis-timeout); else give it back "
            "and exit 75 without starting COMMAND.",
        ),
    ] = "0",
    every: Annotated[
        str | None,
        _option(
            "--every",
            metavar="DURATION",
            help="Slot mode: run once per slot of DURATION, counted from the "
            "Unix epoch (sub-second allowed).",
        ),
    ] = None,
    schedule: Annotated[
        str | None,
        _option(
            "--schedule",
            metavar="'CRON EXPR'",
            help="Slot mode: run once per fire time of a five-field cron "
            "expression or @hourly, @daily, @weekly, @monthly, @yearly.",
        ),
    ] = None,
    tz: Annotated[
        str | None,
        _option(
            "--tz",
            metavar="ZONE",
            help="Time zone of --schedule, an IANA name [default: the host's, "
            "as cron uses].",
        ),
    ] = None,
    tolerance: Annotated[
        str | None,
        _option(
            "--tolerance",
            metavar="DURATION",
            help="A host firing up to this early still lands in the coming slot "
            "[default: a tenth of the slot, at most 5s].",
        ),
    ] = None,
    lease: Annotated[
        str | None,
        _option(
            "--lease",
            metavar="DURATION",
            help="Slot mode: TTL of the renewed lease marking a run in progress "
            "[default: the slot's length, within 1s..30s].",
        ),
    ] = None,
    overlap: Annotated[
        str,
        _option(
            "--overlap",
            metavar="skip|allow",
            help="Slot mode: when the previous slot's run is still going, skip "
            "the new slot, or run it alongside.",
        ),
    ] = "skip",
    standby: Annotated[
        str | None,
        _option(
            "--standby",
            metavar="DURATION",
            help="Slot mode: a losing host waits this long and takes the slot "
            "over if the winner's lease expires before its run ends, or claims "
            "it once an overrunning earlier run ends.",
        ),
    ] = None,
    redis: RedisNodes = None,
    redis_timeout: RedisTimeout = "2s",
    redis_password_file: RedisPasswordFile = None,
    sentinel_password_file: SentinelPasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    prefix: Prefix = "cronguard",
    config: Config = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    log_format: LogFormat = "text",
    debug: Debug = False,
    syslog: Syslog = False,
    syslog_socket: SyslogSocket = "/dev/log",
) -> int:
    values = _values(ctx)
    _configure_logging(values)
    with _reported(bool(values.get("debug"))):
        if (
            redis
            and ctx.get_parameter_source("redis") is ParameterSource.COMMANDLINE
            and any(url_has_password(url) for url in redis)
        ):
            log.warning(
                "the password in --redis is visible to every user in ps; use "
                "CRONGUARD_REDIS_PASSWORD or --redis-password-file instead"
            )
        from .run import run

        settings = RunSettings.build(
            command or [], values, os.environ, given=_on_command_line(ctx)
        )
        return run(settings)
    return EXIT_INTERNAL  # not reached: _reported exits


_RUN_HELP = (
    "Run COMMAND if this host wins the lease; exit quietly if another "
    "host holds it.\n\n"
    "The lease is held for at least --ttl from acquisition, so hosts whose "
    "cron fires a little later in the same window find it taken; it is "
    "renewed while COMMAND runs.  COMMAND is executed directly, without a "
    "shell."
)
_RUN_CONTEXT = {"allow_interspersed_args": False}

app.command("run", context_settings=_RUN_CONTEXT, help=_RUN_HELP)(run_command)

# The run command alone, for the hot path: building the whole group would
# inspect every subcommand's signature on every cron firing of every host.
_run_app = typer.Typer(
    name="cronguard",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
_run_app.command(context_settings=_RUN_CONTEXT, help=_RUN_HELP)(run_command)


def _values(ctx: click.Context) -> dict[str, Any]:
    """Option values by long name, with the config file filling the defaults."""
    values = {
        name.replace("_", "-"): value
        for name, value in ctx.params.items()
        if name != "command"
    }
    given = {
        name.replace("_", "-")
        for name in ctx.params
        if ctx.get_parameter_source(name)
        in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    with _reported(False):
        path = find_file(values.get("config"))
        if path is not None:
            known = _known_settings(ctx)
            for name, value in load_file(path, known).items():
                if name not in given:
                    values[name] = value
    return values


def _on_command_line(ctx: click.Context) -> set[str]:
    """Long names of the options given as flags (not by variable or file)."""
    names = set()
    for param in ctx.command.params:
        if param.name and param.name != "command":
            source = ctx.get_parameter_source(param.name)
            if source is ParameterSource.COMMANDLINE:
                long_names = [o for o in param.opts if o.startswith("--")]
                names.add(long_names[0][2:] if long_names else param.name)
    return names


def _configure_logging(values: dict[str, Any]) -> None:
    verbosity = -1 if values.get("quiet") else int(values.get("verbose") or 0)
    log_format = str(values.get("log-format") or "text").lower()
    if log_format not in ("text", "json"):
        logsetup.configure()
        log.error("--log-format (CRONGUARD_LOG_FORMAT): %r is not text or json",
                  log_format)
        raise typer.Exit(EXIT_USAGE)
    logsetup.configure(verbosity, log_format)
    if _flag_value(values.get("syslog")):
        _add_syslog(str(values.get("syslog-socket") or "/dev/log"), verbosity)


@contextmanager
def _reported(debug: bool) -> Iterator[None]:
    """Turn cronguard's errors into one log line and their exit status."""
    try:
        yield
    except CronguardError as exc:
        log.error("%s", exc, exc_info=debug)
        raise typer.Exit(exc.exit_status) from None
    except typer.Exit:
        raise
    except BrokenPipeError:
        # The reader went away (cronguard status | head): stop quietly, with
        # the status of a program that SIGPIPE ended.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(128 + 13) from None
    except Exception as exc:
        log.error(
            "internal error: %s: %s (run again with --debug for a traceback)",
            type(exc).__name__,
            exc,
            exc_info=debug,
        )
        raise typer.Exit(EXIT_INTERNAL) from None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``cronguard`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    logsetup.configure()
    prog_name = "cronguard run"
    if args and args[0] == "run":
        args = args[1:]
        command = typer.main.get_command(_run_app)
    elif args and not _names_group(args[0]):
        command = typer.main.get_command(_run_app)
    else:
        command = group_command()
        prog_name = "cronguard"
    try:
        status = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.ClickException as exc:
        context = getattr(exc, "ctx", None)
        hint = f"; see '{context.command_path} --help'" if context else ""
        log.error("%s%s", exc.format_message().replace("\n", " "), hint)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)


def entry() -> NoReturn:
    """The installed ``cronguard`` command: ``main``, then a quick exit.

    Once cronguard has finished, tearing the interpreter down (freeing every
    module, running the collector over them) would cost a cron firing more
    than everything else it does.  Nothing is left to clean up by then: the
    lease is given back, the keeper thread has stopped and every file is
    closed.  So only the output is flushed and the process ends at once.
    ``main`` keeps the ordinary ``SystemExit`` for callers in Python.
    """
    try:
        main()
        status: object = 0
    except SystemExit as stop:
        status = stop.code
    if status is None:
        status = 0
    elif not isinstance(status, int):  # sys.exit("message"), as Python prints it
        print(status, file=sys.stderr)
        status = 1
    logging.shutdown()  # flushes and closes the handlers (syslog among them)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away: as if SIGPIPE had ended us
        status = 128 + 13
    with suppress(OSError):
        sys.stderr.flush()
    os._exit(status)


# Administration and observability.  These subcommands share the store
# options with ``run``; what they import (rich, prometheus_client) is loaded
# inside them, so a run never pays for it.


def _known_settings(ctx: click.Context) -> list[str]:
    """Config file keys: the long names of every subcommand's options, so one
    file serves ``run`` and ``status`` alike."""
    root = ctx.find_root().command
    if not hasattr(root, "commands"):  # the run command alone, on the hot path
        root = group_command()
    commands = getattr(root, "commands", {}).values()
    return sorted({
        param.name.replace("_", "-")
        for command in [*commands, ctx.command]
        for param in command.params
        if param.name and param.param_type_name == "option"
    })


def _flag_value(value: Any) -> bool:
    from .config import flag

    return flag("syslog", value)


def _add_syslog(address: str, verbosity: int) -> None:
    try:
        logsetup.add_syslog(address, verbosity)
    except OSError as exc:
        log.error(
            "--syslog (CRONGUARD_SYSLOG): cannot log to %s: %s; start a syslog "
            "daemon, point --syslog-socket (CRONGUARD_SYSLOG_SOCKET) at its "
            "socket, or drop --syslog",
            address,
            exc.strerror or exc,
        )
        raise typer.Exit(EXIT_USAGE) from None
