"""cronguard: run each crontab line on exactly one host of a fleet.

The command line is a thin layer over this package.  For Python jobs::

    from cronguard import Lease, Store, StoreSettings

    store = Store(StoreSettings(url="redis://redis:6379/0"))
    with Lease(store, "invoices", ttl=30) as lease:
        send_invoices(fence=lease.fence)

Names are imported on first use, so that ``import cronguard`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Lease": "lease",
    "Holder": "lease",
    "Store": "store",
    "StoreSettings": "store",
    "CronguardError": "errors",
    "LeaseHeld": "errors",
    "LeaseLost": "errors",
    "StoreError": "errors",
    "UsageError": "errors",
    "parse_duration": "durations",
}

__all__ = [
    "CronguardError",
    "Holder",
    "Lease",
    "LeaseHeld",
    "LeaseLost",
    "Store",
    "StoreError",
    "StoreSettings",
    "UsageError",
    "__version__",
    "parse_duration",
]

if TYPE_CHECKING:
    from .durations import parse_duration
    from .errors import CronguardError, LeaseHeld, LeaseLost, StoreError, UsageError
    from .lease import Holder, Lease
    from .store import Store, StoreSettings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cronguard' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"cronguard.{module}"), name)
