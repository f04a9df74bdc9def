"""Job keys: what a valid one looks like, the one derived from a command line,
and the Redis key names a job's state lives under.
"""

from __future__ import annotations

import hashlib
import os
import re

from .errors import UsageError

KEY_CHARS = "A-Z a-z 0-9 . _ : / @ + -"
_VALID = re.compile(r"[A-Za-z0-9._:/@+\-]{1,200}")
_INVALID_CHAR = re.compile(r"[^A-Za-z0-9._:/@+\-]")


def validate_key(key: str, what: str = "--key") -> str:
    """Return ``key`` unchanged, or raise a ``UsageError`` that says why not."""
    if _VALID.fullmatch(key):
        return key
    if not key:
        problem = "is empty"
    elif len(key) > 200:
        problem = f"is {len(key)} characters long (200 at most)"
    else:
        bad = _INVALID_CHAR.search(key)
        problem = f"contains {bad.group()!r}" if bad else "is not valid"
    raise UsageError(f"{what} {key!r} {problem}; use 1 to 200 of {KEY_CHARS}")


def derive_key(argv: list[str]) -> str:
    """A key for a command line, identical on every host that runs that line.

    The program's name keeps the key readable in ``cronguard status``; a hash
    of the whole argv keeps two different lines apart.
    """
    digest = hashlib.sha256("\0".join(argv).encode()).hexdigest()[:16]
    name = _INVALID_CHAR.sub("_", os.path.basename(argv[0]))[:40] or "cmd"
    return f"{name}-{digest}"


def redis_key(prefix: str, job: str, kind: str) -> str:
    """``PREFIX:{JOB}:KIND``; the hash tag keeps a job's keys in one cluster slot."""
    return f"{prefix}:{{{job}}}:{kind}"
