"""Exit statuses and the exception for each condition that leads to one.

Library code raises these with the job key attached; only the command line
turns them into a message and an exit status.
"""

from __future__ import annotations

# The published exit-status contract (see EXIT STATUS in cronguard(1)).
EXIT_USAGE = 2
EXIT_STORE_UNAVAILABLE = 75  # EX_TEMPFAIL: try again later
EXIT_LEASE_LOST = 76  # EX_PROTOCOL: the lease was taken away mid-run
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_NOT_EXECUTABLE = 126  # as sh(1)
EXIT_NOT_FOUND = 127  # as sh(1)


class CronguardError(Exception):
    """Base of every error cronguard reports; ``exit_status`` is its contract."""

    exit_status = 1


class UsageError(CronguardError):
    """An option, variable or configuration file value is not usable."""

    exit_status = EXIT_USAGE


class StoreError(CronguardError):
    """The lock store could not be reached or refused what cronguard asked.

    ``store`` is the store's URL with any password redacted.
    """

    exit_status = EXIT_STORE_UNAVAILABLE

    def __init__(self, message: str, store: str = "") -> None:
        super().__init__(message)
        self.store = store


class LeaseHeld(CronguardError):
    """Another holder has the lease; raised by the library's context manager."""

    def __init__(self, key: str, holder: str = "") -> None:
        super().__init__(f"lease {key!r} is held by {holder or 'another holder'}")
        self.key = key
        self.holder = holder


class LeaseLost(CronguardError):
    """The lease expired or passed to another holder while it was in use."""

    exit_status = EXIT_LEASE_LOST

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"lease {key!r} lost: {reason}")
        self.key = key
        self.reason = reason


class CommandNotFound(CronguardError):
    """The command to run does not exist."""

    exit_status = EXIT_NOT_FOUND


class CommandNotExecutable(CronguardError):
    """The command exists but cannot be executed."""

    exit_status = EXIT_NOT_EXECUTABLE


class NotReplicated(StoreError):
    """Fewer replicas than ``--min-replicas`` confirmed a new lease in time.

    The lease has been given back: it could vanish in a failover, so it does
    not count as acquired.
    """


class QuorumUnavailable(StoreError):
    """Too few quorum nodes answered to decide who holds a lease."""
