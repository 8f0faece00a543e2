"""A pool of worker processes for calls that may run too long: every call gets a wall-clock budget, a worker that
overruns it is killed and replaced (its call gives the default), and the calling process installs no signal handler
or timer. reward.py compares MATH answers with it (math-verify and sympy can take seconds, or hang, on some inputs).

    pool = Pool("reward:verify_in_worker", workers=2, budget=0.5)
    pool.run([(pred, gold), ...], default=False)         # -> one result per task, in order

Workers are fresh interpreters (python -c) that import only the function's module, so they start in about a second
and hold no torch; they talk to the caller over pipes (multiprocessing.connection), ignore Ctrl-C (it is the
caller's to handle), and end when the caller does (their pipes close). A worker bounds its own calls too (reward.py:
a SIGALRM timer in the worker's main thread); this pool's budget + MARGIN is the backstop for a call that ignores it.
A Ctrl-C or any error while the pool works kills every worker (no process is left behind); the next run starts
new ones. Linux and macOS (pass_fds); this file imports no project file.

Test: python -m pytest tests/test_reward.py -q -k "batch or worker or alarm"
"""

import collections
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait

MARGIN = 1.0  # seconds past the budget before a worker's call is given up and the worker killed
START_SECONDS = 120  # a worker must be ready (its imports done) within this
SERVE = "import sys, grading; grading.serve(*sys.argv[1:])"


class Worker:
    """One worker process and its two pipes: tasks in, results out."""

    def __init__(self, target: str):
        task_read, task_write = os.pipe()
        result_read, result_write = os.pipe()
        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        command = [sys.executable, "-c", SERVE, target, str(task_read), str(result_write)]
        self.process = subprocess.Popen(command, pass_fds=(task_read, result_write), stdin=subprocess.DEVNULL, env=env)
        os.close(task_read)
        os.close(result_write)
        self.tasks, self.results = Connection(task_write, readable=False), Connection(result_read, writable=False)
        self.ready = False  # True once it has sent "ready" (its imports are done)
        self.started = time.monotonic()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.tasks.close()
        self.results.close()


def serve(target: str, task_fd: str, result_fd: str) -> None:
    """The worker's loop: import target ("module:function"), say "ready", then answer every task (a tuple of
    arguments) with function(*task) until the caller's pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches the whole process group
    module, name = target.split(":")
    function = getattr(importlib.import_module(module), name)
    tasks, results = Connection(int(task_fd), writable=False), Connection(int(result_fd), readable=False)
    results.send("ready")
    while True:
        try:
            task = tasks.recv()
        except EOFError:  # the caller is gone
            return
        results.send(function(*task))


class Pool:
    """Up to `workers` worker processes running target ("module:function"), started on first use."""

    def __init__(self, target: str, *, workers: int, budget: float):
        assert workers >= 1, f"need at least one worker, got {workers}"
        self.target, self.size, self.budget = target, workers, budget
        self.workers: list[Worker] = []
        self.lock = threading.Lock()  # one run at a time, whatever thread calls

    def run(self, tasks: list[tuple], default):
        """function(*task) for every task, in order, spread over the workers; a task whose worker does not answer
        within budget + MARGIN seconds gives default (the worker is killed and replaced, the others go on)."""
        with self.lock:
            if not tasks:
                return []
            try:
                return self.spread(tasks, default)
            except BaseException:  # Ctrl-C, or a broken worker: leave no process behind
                self.close()
                raise

    def spread(self, tasks: list[tuple], default) -> list:
        """The loop of run: hand the next task to each idle ready worker, collect answers, kill overrunning workers."""
        while len(self.workers) < min(self.size, len(tasks)):
            self.workers.append(Worker(self.target))
        results, queue, busy = [default] * len(tasks), collections.deque(range(len(tasks))), {}  # worker -> (i, end)
        while queue or busy:
            for worker in self.workers:
                if worker.ready and worker not in busy and queue:
                    i = queue.popleft()
                    worker.tasks.send(tasks[i])
                    busy[worker] = (i, time.monotonic() + self.budget + MARGIN)
            waiting = [w for w in self.workers if w in busy or not w.ready]
            ends = [end for _, end in busy.values()] + [w.started + START_SECONDS for w in waiting if not w.ready]
            for connection in wait([w.results for w in waiting], timeout=max(0.0, min(ends) - time.monotonic())):
                worker = next(w for w in waiting if w.results is connection)
                try:
                    answer = worker.results.recv()
                except EOFError:  # it died (killed from outside, out of memory): its task gives the default
                    if not worker.ready:
                        raise RuntimeError(f"a grading worker ({self.target}) ended while starting") from None
                    busy.pop(worker)
                    self.restart(worker)
                    continue
                if worker.ready:
                    results[busy.pop(worker)[0]] = answer
                worker.ready = True
            self.replace_overdue(busy)
        return results

    def replace_overdue(self, busy: dict) -> None:
        """Restart every worker whose task is past its end (its result stays the default); fail if a worker never
        became ready."""
        now = time.monotonic()
        for worker in list(self.workers):
            if not worker.ready and now > worker.started + START_SECONDS:
                raise RuntimeError(f"a grading worker ({self.target}) did not start in {START_SECONDS} s")
            if worker in busy and now >= busy[worker][1]:
                del busy[worker]
                self.restart(worker)  # stuck in one long C computation: only killing it frees it

    def restart(self, worker: Worker) -> None:
        """Kill worker and start a new one in its place (it becomes ready in about a second, while the others work)."""
        worker.kill()
        self.workers[self.workers.index(worker)] = Worker(self.target)

    def close(self) -> None:
        """Kill every worker (the next run starts new ones)."""
        for worker in self.workers:
            worker.kill()
        self.workers = []
