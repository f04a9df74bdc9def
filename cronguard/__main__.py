"""``python -m cronguard``: the same as the ``cronguard`` command."""

from .cli import entry

entry()
