"""The fixture program that tests run under cronguard.

Its arguments are steps, done in order::

    job.py ready FILE         create FILE, so the test knows the job started
    job.py record FILE        append "HOST PID FENCE START_NS" to FILE
    job.py env FILE           write the environment to FILE as JSON
    job.py peek URL NAME FILE write the value of key NAME on the server at URL
                              to FILE (empty when there is none)
    job.py trap FILE          log each forwarded signal's name to FILE, go on
    job.py ignore-term        ignore SIGTERM
    job.py on-term FILE       on SIGTERM append "TERM PID TIME_NS" to FILE, exit 143
    job.py spawn FILE         fork a grandchild that sleeps; write its pid
    job.py sleep SECONDS
    job.py await FILE         wait (up to 60 s) until the test creates FILE
    job.py finish FILE        append "end PID END_NS" to FILE
    job.py exit STATUS        exit with STATUS (default 0)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def main(steps: list[str]) -> int:
    while steps:
        step = steps.pop(0)
        if step == "ready":
            with open(steps.pop(0), "w") as handle:
                handle.write(str(os.getpid()))
        elif step == "record":
            with open(steps.pop(0), "a") as handle:
                handle.write(
                    f"{os.environ.get('CRONGUARD_HOST_ID', '-')} {os.getpid()} "
                    f"{os.environ.get('CRONGUARD_FENCE', '-')} {time.time_ns()}\n"
                )
        elif step == "finish":
            with open(steps.pop(0), "a") as handle:
                handle.write(f"end {os.getpid()} {time.time_ns()}\n")
        elif step == "env":
            with open(steps.pop(0), "w") as handle:
                json.dump(dict(os.environ), handle)
        elif step == "peek":
            import redis

            url, name, path = steps.pop(0), steps.pop(0), steps.pop(0)
            value = redis.Redis.from_url(url).get(name)
            with open(path, "wb") as handle:
                handle.write(value or b"")
        elif step == "trap":
            path = steps.pop(0)

            def note(signum: int, frame: object, path: str = path) -> None:
                with open(path, "a") as handle:
                    handle.write(signal.Signals(signum).name + "\n")

            for name in ("TERM", "INT", "HUP", "QUIT", "USR1", "USR2"):
                signal.signal(getattr(signal, f"SIG{name}"), note)
        elif step == "on-term":
            term_path = steps.pop(0)

            def stamp(signum: int, frame: object, path: str = term_path) -> None:
                with open(path, "a") as handle:
                    handle.write(f"TERM {os.getpid()} {time.time_ns()}\n")
                os._exit(128 + signum)

            signal.signal(signal.SIGTERM, stamp)
        elif step == "ignore-term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif step == "spawn":
            child = subprocess.Popen(["sleep", "300"])
            with open(steps.pop(0), "w") as handle:
                handle.write(str(child.pid))
        elif step == "sleep":
            until = time.monotonic() + float(steps.pop(0))
            while (left := until - time.monotonic()) > 0:
                time.sleep(left)
        elif step == "await":
            path, until = steps.pop(0), time.monotonic() + 60
            while not os.path.exists(path) and time.monotonic() < until:
                time.sleep(0.01)
        elif step == "exit":
            return int(steps.pop(0)) if steps else 0
        else:
            print(f"job.py: unknown step {step!r}", file=sys.stderr)
            return 99
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
