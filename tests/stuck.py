"""Targets for grading-pool workers in tests/test_reward.py: a call stuck in C code that holds the GIL, where no
signal handler can run (the case the pool's kill exists for), calls that sleep, spin or kill their own worker, and a
call that records the process it ran in. STUCK_IMPORT_SECONDS in the environment makes importing this module (a
worker's start) take that long."""

import os
import re
import signal
import time
from pathlib import Path

time.sleep(float(os.environ.get("STUCK_IMPORT_SECONDS", "0")))


def hold_the_gil(n: int) -> bool:
    """Catastrophic backtracking in the re module's C matcher: about 2**n steps with the GIL held."""
    return re.match(r"(a+)+$", "a" * n + "b") is not None


def pid(_: int) -> int:
    return os.getpid()


def nap(pred: str, gold: str) -> bool:
    """A grading call (reward.verify_in_worker's arguments) that sleeps a minute: only the pool's kill ends it."""
    time.sleep(60)
    return True


def spin(seconds: float) -> float:
    """Python code busy for `seconds` of wall clock (signal handlers and other threads run in between)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


def die_first(path: str, times: int) -> int:
    """Kill the worker it runs in (SIGKILL, as the out-of-memory killer does) on its first `times` calls for this
    path, counted in the file; then return the number of the call."""
    count = int(Path(path).read_text()) + 1 if Path(path).exists() else 1
    Path(path).write_text(str(count))
    if count <= times:
        os.kill(os.getpid(), signal.SIGKILL)
    return count
