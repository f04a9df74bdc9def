"""``cronguard metrics``: per-job figures in the Prometheus text format.

The exposition is built with ``prometheus_client``, imported here only: a
run never loads it.  The figures are read from the store each time (see
``history``), so any host can publish them, for example from cron with
``--textfile`` into node_exporter's textfile collector directory; the file
is written to a temporary name beside it and renamed, so the collector never
reads half a file.

``cronguard_runs`` counts runs by outcome among the events the job's stream
still holds (about the last thousand), so it is a gauge, not a counter: it
stops growing once the stream is full.  Skips are counted without a cap,
per host, and are true counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .history import OUTCOMES, JobState

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry


def registry(states: Sequence[JobState], store_up: bool = True) -> CollectorRegistry:
    """A registry holding the figures of ``states``."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector, CollectorRegistry

    class Jobs(Collector):
        def collect(self) -> Iterable[Metric]:
            up = GaugeMetricFamily(
                "cronguard_store_up", "1 when the lock store could be read.")
            up.add_metric([], 1.0 if store_up else 0.0)
            yield up

            success = GaugeMetricFamily(
                "cronguard_last_success_timestamp_seconds",
                "When the job's last successful run ended (Redis clock).",
                labels=["job"])
            start = GaugeMetricFamily(
                "cronguard_last_run_start_timestamp_seconds",
                "When the job's last run started (Redis clock).", labels=["job"])
            duration = GaugeMetricFamily(
                "cronguard_last_run_duration_seconds",
                "How long the job's last finished run took.", labels=["job"])
            status = GaugeMetricFamily(
                "cronguard_last_run_exit_status",
                "Exit status of the job's last finished run.", labels=["job"])
            running = GaugeMetricFamily(
                "cronguard_running", "1 while a run of the job holds its lease.",
                labels=["job"])
            held = GaugeMetricFamily(
                "cronguard_lease_held",
                "1 while the job's lease is held (running or minimum hold).",
                labels=["job"])
            runs = GaugeMetricFamily(
                "cronguard_runs",
                "Runs by outcome among the job's recorded events.",
                labels=["job", "outcome"])
            skips = CounterMetricFamily(
                "cronguard_skips",
                "Firings that found the lease held, by host.",
                labels=["job", "host"])

            for state in states:
                job = [state.key]
                if state.last_success is not None and state.last_success.end:
                    success.add_metric(job, state.last_success.end)
                last = state.last_run
                if last is not None and last.start is not None:
                    start.add_metric(job, last.start)
                ended = next((run for run in reversed(state.runs)
                              if run.end is not None), None)
                if ended is not None and ended.duration is not None:
                    duration.add_metric(job, ended.duration)
                if ended is not None and ended.status is not None:
                    status.add_metric(job, float(ended.status))
                running.add_metric(job, 1.0 if state.state == "running" else 0.0)
                held.add_metric(job, 0.0 if state.holder is None else 1.0)
                counts = Counter(run.outcome for run in state.runs)
                for outcome in OUTCOMES:
                    runs.add_metric([state.key, outcome], float(counts[outcome]))
                for host, count in sorted(state.skips.items()):
                    skips.add_metric([state.key, host], float(count))
            yield from (success, start, duration, status, running, held, runs, skips)

    collected = CollectorRegistry(auto_describe=False)
    collected.register(Jobs())
    return collected


def exposition(states: Sequence[JobState], store_up: bool = True) -> str:
    from prometheus_client.exposition import generate_latest

    return generate_latest(registry(states, store_up)).decode()


def write_textfile(
    path: str, states: Sequence[JobState], store_up: bool = True
) -> None:
    """Write the exposition to ``path`` atomically (temp file + rename)."""
    from prometheus_client.exposition import write_to_textfile

    write_to_textfile(path, registry(states, store_up))
