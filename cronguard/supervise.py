"""Run the command in its own process group and watch it until it ends.

The supervisor wakes only on events: the command's exit (SIGCHLD), the lease
being lost (the keeper thread writes to the wake pipe), or the next deadline
(lease expiry, ``--timeout``, the end of ``--kill-after``).  Signals that
cronguard receives are forwarded to the command's process group.

If cronguard itself is killed with SIGKILL it can do nothing, so two things
are arranged before then: on Linux the command gets a parent-death signal,
and a small watcher process, forked after the command starts, waits on a pipe
whose other end only cronguard holds.  When that pipe closes without a word
from cronguard, the watcher terminates the whole process group, including
whatever the command forked.

The watcher also keeps the lease's deadline, which cronguard sends it after
every renewal.  A cronguard that is alive but cannot act (stopped with
SIGSTOP, starved, stuck) sends nothing, and when the deadline passes the
watcher stops the command itself, so the command never outlives its lease by
more than --kill-after however cronguard fares::

    cronguard  |--renew--|--renew--|  SIGSTOP ......................  SIGCONT
    watcher       deadline+    deadline+          deadline: TERM the group
    host B                                     lease expires: B acquires
"""

from __future__ import annotations

import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from types import FrameType
from typing import NamedTuple

from .errors import (
    EXIT_LEASE_LOST,
    EXIT_TIMEOUT,
    CommandNotExecutable,
    CommandNotFound,
    LeaseLost,
)
from .lease import Lease

log = logging.getLogger(__name__)

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_PR_SET_PDEATHSIG = 1
# How often to look for processes the command left in its group, while
# stopping it; only this rare path polls.
_GROUP_POLL = 0.05
# Messages to the watcher: one byte of kind, then a monotonic deadline, written
# in one write() of fewer than PIPE_BUF bytes so that each arrives whole.
_WATCH_MESSAGE = struct.Struct("=cd")
_DISARM = b"x"
_DEADLINE = b"d"
# The watcher's exit status when it stopped the command because the lease's
# deadline passed without a renewal.
_WATCHER_STOPPED = 3


class Outcome(NamedTuple):
    """How a supervised run ended."""

    status: int  # the exit status cronguard reports
    returncode: int  # the command's own, 128+N for signal N
    reason: str  # "exited", "timeout" or "lost"
    duration: float


class SignalRelay:
    """Catch the forwarded signals for the whole run.

    Before the command starts, a signal is only remembered, so that a run
    interrupted while it acquires the lease gives it back before it exits.
    Once the command runs, each signal goes straight to its process group.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.group: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in FORWARDED:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def first(self) -> int | None:
        return self.received[0] if self.received else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.group is not None:
            log.debug("forwarding signal %d to process group %d", signum, self.group)
            _signal_group(self.group, signum)


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to a process group; False when the group is gone."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A member changed credentials (setuid); the rest still got it.
        return True
    return True


def _set_parent_death_signal(parent: int) -> Callable[[], None] | None:
    """A pre-exec hook that asks Linux to send SIGTERM when cronguard dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only on this path: it costs a few ms to import

    libc = ctypes.CDLL(None, use_errno=True)

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # cronguard died before prctl took effect
            os._exit(EXIT_LEASE_LOST)

    return hook


def _fork_watcher(
    group: int, kill_after: float, deadline: float | None
) -> tuple[int, int]:
    """Fork the watcher for ``group``; return its pid and the pipe to talk to it.

    With ``deadline`` (monotonic), the watcher also stops the group when that
    moment passes before cronguard sends a later one.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(read_end)
        return pid, write_end
    status = 0
    try:  # the watcher: no Python-level clean-up, no return
        os.setsid()  # out of the terminal's reach: Ctrl-C must not end it
        for signum in FORWARDED:
            signal.signal(signum, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, read_end)
        os.closerange(read_end + 1, 1 << 16)
        status = _watch_over(group, kill_after, deadline, read_end)
    finally:
        os._exit(status)


def _watch_over(group: int, kill_after: float, deadline: float | None, fd: int) -> int:
    """The watcher's loop; returns its exit status."""
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([fd], [], [], wait)
        if not readable:  # the deadline passed and cronguard said nothing
            return _WATCHER_STOPPED if _terminate_group(group, kill_after) else 0
        message = os.read(fd, _WATCH_MESSAGE.size)
        if not message:  # cronguard is gone: nothing guards the group any more
            _terminate_group(group, kill_after)
            return 0
        kind, moment = _WATCH_MESSAGE.unpack(message)
        if kind == _DISARM:
            return 0
        deadline = moment


def _tell_watcher(fd: int, kind: bytes, moment: float = 0.0) -> None:
    """Send the watcher a message; one that has already exited cannot hear it."""
    with suppress(BrokenPipeError):
        os.write(fd, _WATCH_MESSAGE.pack(kind, moment))


def _terminate_group(group: int, kill_after: float) -> bool:
    """SIGTERM the group, SIGKILL what is left of it after ``kill_after``.

    Returns False when the group had already gone.
    """
    if not _signal_group(group, signal.SIGTERM):
        return False
    until = time.monotonic() + kill_after
    while time.monotonic() < until:
        time.sleep(_GROUP_POLL)
        if not _signal_group(group, 0):
            return True
    _signal_group(group, signal.SIGKILL)
    return True


@contextmanager
def _wake_pipe() -> Iterator[tuple[int, int]]:
    """A non-blocking pipe that SIGCHLD (and the keeper thread) write to."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    previous_handler = signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        yield read_end, write_end
    finally:
        signal.signal(signal.SIGCHLD, previous_handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(read_end)
        os.close(write_end)


class Supervisor:
    """Start ``argv``, then watch it against the lease, the timeout and signals."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        relay: SignalRelay,
        lease: Lease | None = None,
        timeout: float | None = None,
        kill_after: float = 10.0,
        on_lost: str = "term",
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.relay = relay
        self.lease = lease
        self.timeout = timeout
        self.kill_after = kill_after
        self.on_lost = on_lost
        self.key = lease.key if lease is not None else "-"

    def run(self) -> Outcome:
        with _wake_pipe() as (wake_read, wake_write):
            process = self._start()
            started = time.monotonic()
            watcher, talk = _fork_watcher(
                process.pid, self.kill_after, self._enforced_deadline()
            )
            pipes = _Guard()
            if self.lease is not None:
                self.lease.on_change(lambda: pipes.call(_poke, wake_write))
                if self._enforced_deadline() is not None:
                    self.lease.on_renew(lambda moment: pipes.call(
                        _tell_watcher, talk, _DEADLINE, moment))
                self.lease.keep()
            watcher_status = 0
            try:
                reason, returncode = self._watch(process.pid, started, wake_read)
            finally:
                if self.lease is not None:
                    # A renewal still in flight is not waited for: the lease
                    # is given back next, and the scripts refuse a renewal
                    # that arrives after that (see Lease.stop_keeping).
                    self.lease.stop_keeping(wait=False)
                # From here on the lease's listeners write nowhere: the pipes
                # close, and their numbers may soon belong to other files.
                pipes.close()
                _tell_watcher(talk, _DISARM)
                os.close(talk)
                with suppress(ChildProcessError):
                    _, waited = os.waitpid(watcher, 0)
                    watcher_status = os.waitstatus_to_exitcode(waited)
        if watcher_status == _WATCHER_STOPPED and reason == "exited":
            # cronguard could not act in time (it was frozen, say) and the
            # watcher stopped the command at the lease's deadline.
            log.error("%s: the lease ran out while cronguard could not act; the "
                      "command was stopped", self.key)
            reason = "lost"
            if self.lease is not None:
                with suppress(LeaseLost):  # marks it lost: the deadline is past
                    self.lease.check()
        duration = time.monotonic() - started
        status = {"lost": EXIT_LEASE_LOST, "timeout": EXIT_TIMEOUT}.get(
            reason, returncode
        )
        return Outcome(status, returncode, reason, duration)

    def _enforced_deadline(self) -> float | None:
        """The lease deadline the watcher enforces, if losing it stops the command."""
        if self.lease is None or not self.lease.renew_enabled:
            return None
        if self.on_lost != "term":
            return None
        return self.lease.deadline

    def _start(self) -> subprocess.Popen[bytes]:
        try:
            process = subprocess.Popen(
                self.argv,
                env=self.env,
                process_group=0,
                preexec_fn=_set_parent_death_signal(os.getpid()),
            )
        except FileNotFoundError as exc:
            raise CommandNotFound(
                f"{self.argv[0]}: command not found ({exc.strerror})"
            ) from None
        except OSError as exc:  # EACCES, ENOEXEC, EISDIR ...
            raise CommandNotExecutable(
                f"{self.argv[0]}: cannot execute ({exc.strerror})"
            ) from None
        self.relay.group = process.pid
        log.debug("%s: started %s as pid %d", self.key, self.argv[0], process.pid)
        # A signal that arrived while the lease was being acquired is due now.
        for signum in self.relay.received:
            _signal_group(process.pid, signum)
        return process

    def _watch(self, pid: int, started: float, wake: int) -> tuple[str, int]:
        """Wait for ``pid`` to end; stop it when a deadline passes."""
        timeout_at = started + self.timeout if self.timeout else None
        stopping: str | None = None  # why we are stopping it, once we are
        kill_at: float | None = None
        # Without renewal the lease simply runs out; that is expected.
        watch_lease = self.lease is not None and self.lease.renew_enabled
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                returncode = _exit_status(status)
                break
            now = time.monotonic()
            if watch_lease and self.lease is not None and stopping is None:
                lost = self._lease_lost()
                if lost is not None:
                    log.error("%s: lease lost while the command ran: %s",
                              self.key, lost)
                    if self.on_lost == "term":
                        stopping, kill_at = "lost", self._stop(pid, now)
                    watch_lease = False
            if stopping is None and timeout_at is not None and now >= timeout_at:
                log.error("%s: --timeout expired; stopping the command", self.key)
                stopping, kill_at = "timeout", self._stop(pid, now)
            if kill_at is not None and now >= kill_at:
                log.warning("%s: still running after --kill-after; sending SIGKILL",
                            self.key)
                _signal_group(pid, signal.SIGKILL)
                kill_at = None
            _wait_for(wake, self._next_wake(now, watch_lease, stopping,
                                            timeout_at, kill_at))
        self._clear_group(pid, stopping is not None)
        self.relay.group = None
        return stopping or "exited", returncode

    def _lease_lost(self) -> str | None:
        assert self.lease is not None
        try:
            self.lease.check()
        except LeaseLost as lost:
            return lost.reason
        return None

    def _stop(self, group: int, now: float) -> float:
        _signal_group(group, signal.SIGTERM)
        return now + self.kill_after

    def _next_wake(
        self,
        now: float,
        watch_lease: bool,
        stopping: str | None,
        timeout_at: float | None,
        kill_at: float | None,
    ) -> float | None:
        moments = [kill_at]
        if stopping is None:
            moments.append(timeout_at)
            if watch_lease and self.lease is not None:
                moments.append(self.lease.deadline)
        upcoming = [m for m in moments if m is not None]
        return max(0.0, min(upcoming) - now) if upcoming else None

    def _clear_group(self, group: int, stopping: bool) -> None:
        """Leave no process of the command's group running without the lease."""
        if not _signal_group(group, 0):
            return
        if not stopping:
            log.warning("%s: the command left processes in its group; stopping them",
                        self.key)
        _terminate_group(group, self.kill_after)


class _Guard:
    """Lets the keeper thread write to the run's pipes only while they are open.

    A keeper left running after a lost lease (it may be stuck on the store)
    can still call the lease's listeners after the run has closed its pipes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True

    def call(self, action: Callable[..., None], *args: object) -> None:
        with self._lock:
            if self._open:
                action(*args)

    def close(self) -> None:
        with self._lock:
            self._open = False


def _poke(fd: int) -> None:
    with suppress(BlockingIOError):
        os.write(fd, b"!")


def _wait_for(fd: int, timeout: float | None) -> None:
    """Sleep until ``fd`` is readable or ``timeout`` passes; drain it."""
    readable, _, _ = select.select([fd], [], [], timeout)
    if readable:
        with suppress(BlockingIOError):
            while os.read(fd, 512):
                pass


def _exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
