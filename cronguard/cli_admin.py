"""The administrative subcommands: status, history, timeline, check, release,
doctor and metrics.

They are registered on the command group only when the group is built, so
that a cron firing, which needs only ``run``, never pays for their options.
What they import (rich, prometheus_client) is loaded inside each command.
"""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from typer._click.core import ParameterSource

from .cli import (
    EXIT_INTERNAL,
    Config,
    Debug,
    Prefix,
    Redis,
    RedisPasswordFile,
    RedisTimeout,
    SentinelPasswordFile,
    TlsCa,
    TlsCert,
    TlsKey,
    _option,
    _reported,
    _values,
    app,
    log,
)
from .store import url_has_password


@contextmanager
def _admin_store(ctx: typer.Context, values: dict[str, Any]) -> Iterator[Any]:
    """The store the admin subcommands read, from the same options as run."""
    from .config import store_settings
    from .store import open_store

    redis_url = values.get("redis")
    if (
        redis_url
        and ctx.get_parameter_source("redis") is ParameterSource.COMMANDLINE
        and url_has_password(redis_url)
    ):
        log.warning(
            "the password in --redis is visible to every user in ps; use "
            "CRONGUARD_REDIS_PASSWORD or --redis-password-file instead"
        )
    store = open_store(store_settings(values, os.environ))
    try:
        yield store
    finally:
        store.close()


JsonOutput = Annotated[
    bool, _option("--json", help="Print JSON instead of text, for programs.")
]
Since = Annotated[
    str | None,
    _option(
        "--since",
        metavar="DURATION",
        help="Only events from this long ago on [default: all recorded].",
    ),
]
JobKey = Annotated[str, typer.Argument(metavar="KEY", help="The job's --key.")]


def _since(values: dict[str, Any]) -> float | None:
    from .config import optional_duration

    return optional_duration("since", values.get("since"))


@app.command(
    "status",
    help=(
        "Show each job's state (running, held, idle), holder, lease left, last "
        "run and the age of its last success.\n\n"
        "Without KEY, every job the store knows is shown."
    ),
)
def status_command(
    ctx: typer.Context,
    keys: Annotated[
        list[str] | None,
        typer.Argument(metavar="KEY", help="Jobs to show [default: all]."),
    ] = None,
    json: JsonOutput = False,
    redis: Redis = None,
    redis_timeout: RedisTimeout = "2s",
    redis_password_file: RedisPasswordFile = None,
    sentinel_password_file: SentinelPasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    prefix: Prefix = "cronguard",
    config: Config = None,
    debug: Debug = False,
) -> int:
    values = _values(ctx)
    with _reported(bool(values.get("debug"))):
        from .admin import job_states, print_status
        from .config import flag

        with _admin_store(ctx, values) as store:
            states = job_states(store, keys or [])
        print_status(states, as_json=flag("json", values.get("json")),
                     out=sys.stdout)
        return 0
    return EXIT_INTERNAL  # not reached: _reported exits


@app.command("history", help="Show a job's recorded run events, oldest first.")
def history_command(
    ctx: typer.Context,
    key: JobKey,
    since: Since = None,
    limit: Annotated[
        str,
        _option("--limit", metavar="N", help="Show at most the N most recent events."),
    ] = "100",
    json: JsonOutput = False,
    redis: Redis = None,
    redis_timeout: RedisTimeout = "2s",
    redis_password_file: RedisPasswordFile = None,
    sentinel_password_file: SentinelPasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    prefix: Prefix = "cronguard",
    config: Config = None,
    debug: Debug = False,
) -> int:
    values = _values(ctx)
    with _reported(bool(values.get("debug"))):
        from .admin import history, print_history
        from .config import flag, integer

        count = integer("limit", values.get("limit", 100), 1, 1_000_000)
        with _admin_store(ctx, values) as store:
            events = history(store, key, since=_since(values), limit=count)
        print_history(events, as_json=flag("json", values.get("json")),
                      out=sys.stdout)
        return 0
    return EXIT_INTERNAL  # not reached: _reported exits


@app.command(
    "timeline",
    help=(
        "Chart a job's runs: one row per host, time across, each run a bar "
        "coloured by how it ended, so which host led when is seen at a glance."
    ),
)
def timeline_command(
    ctx: typer.Context,
    key: JobKey,
    since: Since = None,
    svg: Annotated[
        str | None,
        _option("--svg", metavar="FILE", help="Also write the chart to FILE as SVG."),
    ] = None,
    redis: Redis = None,
    redis_timeout: RedisTimeout = "2s",
    redis_password_file: RedisPasswordFile = None,
    sentinel_password_file: SentinelPasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    prefix: Prefix = "cronguard",
    config: Config = None,
    debug: Debug = False,
) -> int:
    values = _values(ctx)
    with _reported(bool(values.get("debug"))):
        from .errors import UsageError
        from .history import read_events, read_holder, server_time
        from .keys import validate_key
        from .timeline import build_chart, print_chart, svg_text

        validate_key(key, "KEY")
        since_seconds = _since(values)
        with _admin_store(ctx, values) as store:
            now = server_time(store)
            start = now - since_seconds if since_seconds is not None else None
            events = read_events(store, key, since=start)
            chart = build_chart(key, events, read_holder(store, key), now, start)
        print_chart(chart, sys.stdout)
        path = values.get("svg")
        if path:
            try:
                with open(str(path), "w", encoding="utf-8") as handle:
                    handle.write(svg_text(chart))
            except OSError as exc:
                raise UsageError(
                    f"--svg (CRONGUARD_SVG): cannot write {path}: {exc.strerror}"
                ) from None
        return 0
    return EXIT_INTERNAL  # not reached: _reported exits


@app.command(
    "check",
    help=(
        "Monitoring plugin: is the job's last success recent enough?  Prints "
        "one line and exits 0 OK, 1 WARNING (older than --warn-age), "
        "2 CRITICAL (older than --max-age, or no success recorded), 3 UNKNOWN "
        "(the store could not be read)."
    ),
)
def check_command(
    ctx: typer.Context,
    key: JobKey,
    max_age: Annotated[
        str | None,
        _option(
            "--max-age",
            metavar="DURATION",
            help="CRITICAL when the last success is older than this (required).",
        ),
    ] = None,
    warn_age: Annotated[
        str | None,
        _option(
            "--warn-age",
            metavar="DURATION",
            help="WARNING when the last success is older than this.",
        ),
    ] = None,
    redis: Redis = None,
    redis_timeout: RedisTimeout = "2s",
    redis_password_file: RedisPasswordFile = None,
    sentinel_password_file: SentinelPasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    prefix: Prefix = "cronguard",
    config: Config = None,
    debug: Debug = False,
) -> int:
    values = _values(ctx)
    with _reported(bool(values.get("debug"))):
        from .admin import check
        from .config import duration, optional_duration
        from .errors import UsageError
        from .keys import validate_key

        validate_key(key, "KEY")
        if values.get("max-age") in (None, ""):
            raise UsageError(
                "check needs --max-age (CRONGUARD_MAX_AGE), the age beyond which "
                "the last success is CRITICAL, as in --max-age 1h"
            )
        limit = duration("max-age", values["max-age"])
        warn = optional_duration("warn-age", values.get("warn-age"))
        with _admin_store(ctx, values) as store:
            result = check(store, key, max_age=limit, warn_age=warn)
        typer.echo(result.line)
        return result.status
    return EXIT_INTERNAL  # not reached: _reported exits


@app.command(
    "release",
    help=(
        "Remove a job's stuck lease, whoever holds it, and record that in its "
        "history.  A run still going on under it finds its lease lost."
    ),
)
def release_command(
    ctx: typer.Context,
    key: JobKey,
    if_fence: Annotated[
        str | None,
        _option(
            "--if-fence",
            metavar="N",
            help="Only remove the lease if its fence is N (as status showed it).",
        ),
    ] = None,
    redis: Redis = None,
    redis_timeout: RedisTimeout = "2s",
    redis_password_file: RedisPasswordFile = None,
    sentinel_password_file: SentinelPasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    prefix: Prefix = "cronguard",
    config: Config = None,
    debug: Debug = False,
) -> int:
    values = _values(ctx)
    with _reported(bool(values.get("debug"))):
        from .admin import release, release_message
        from .config import integer

        given = values.get("if-fence")
        fence = None if given in (None, "") else integer("if-fence", given, 0, 2**63)
        with _admin_store(ctx, values) as store:
            result = release(store, key, fence=fence)
        typer.echo(release_message(key, result, fence))
        return 1 if result.current is not None else 0
    return EXIT_INTERNAL  # not reached: _reported exits


@app.command(
    "doctor",
    help=(
        "Check the store: reachability and round trip, server version and "
        "mode, the ACL user's permissions, the clock offset, and settings that "
        "endanger leases.  One line per check; exit 1 if any warns or fails."
    ),
)
def doctor_command(
    ctx: typer.Context,
    redis: Redis = None,
    redis_timeout: RedisTimeout = "2s",
    redis_password_file: RedisPasswordFile = None,
    sentinel_password_file: SentinelPasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    prefix: Prefix = "cronguard",
    config: Config = None,
    debug: Debug = False,
) -> int:
    values = _values(ctx)
    with _reported(bool(values.get("debug"))):
        from .doctor import OK, Doctor

        healthy = True
        with _admin_store(ctx, values) as store:
            for finding in Doctor(store).findings():
                typer.echo(str(finding))
                healthy = healthy and finding.level == OK
        return 0 if healthy else 1
    return EXIT_INTERNAL  # not reached: _reported exits


@app.command(
    "metrics",
    help=(
        "Print per-job figures in the Prometheus text format, or write them "
        "atomically to --textfile for node_exporter's textfile collector."
    ),
)
def metrics_command(
    ctx: typer.Context,
    keys: Annotated[
        list[str] | None,
        typer.Argument(metavar="KEY", help="Jobs to report [default: all]."),
    ] = None,
    textfile: Annotated[
        str | None,
        _option(
            "--textfile",
            metavar="PATH",
            help="Write to PATH (temp file + rename) instead of standard output.",
        ),
    ] = None,
    redis: Redis = None,
    redis_timeout: RedisTimeout = "2s",
    redis_password_file: RedisPasswordFile = None,
    sentinel_password_file: SentinelPasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    prefix: Prefix = "cronguard",
    config: Config = None,
    debug: Debug = False,
) -> int:
    values = _values(ctx)
    with _reported(bool(values.get("debug"))):
        from .errors import StoreError
        from .history import find_jobs, read_job, server_time
        from .keys import validate_key
        from .metrics import exposition, write_textfile

        for key in keys or []:
            validate_key(key, "KEY")
        path = values.get("textfile")
        failure: StoreError | None = None
        with _admin_store(ctx, values) as store:
            try:
                now = server_time(store)
                states = [read_job(store, key, now, full=True)
                          for key in (keys or find_jobs(store))]
            except StoreError as exc:
                # Publish the outage, so an alert fires instead of stale figures.
                failure, states = exc, []
        if path:
            _write_metrics(str(path), lambda: write_textfile(
                str(path), states, failure is None))
        else:
            sys.stdout.write(exposition(states, failure is None))
        if failure is not None:
            raise failure
        return 0
    return EXIT_INTERNAL  # not reached: _reported exits


def _write_metrics(path: str, write: Any) -> None:
    from .errors import UsageError

    try:
        write()
    except OSError as exc:
        raise UsageError(
            f"--textfile (CRONGUARD_TEXTFILE): cannot write {path}: "
            f"{exc.strerror or exc}; give a path in a writable directory"
        ) from None
