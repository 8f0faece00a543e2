"""Targets for grading-pool workers in tests/test_reward.py: a call stuck in C code that holds the GIL, where no
signal handler can run (the case the pool's kill exists for), and a call that records the process it ran in."""

import os
import re


def hold_the_gil(n: int) -> bool:
    """Catastrophic backtracking in the re module's C matcher: about 2**n steps with the GIL held."""
    return re.match(r"(a+)+$", "a" * n + "b") is not None


def pid(_: int) -> int:
    return os.getpid()
