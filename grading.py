"""A pool of worker processes for calls that may run too long or crash the process they run in. reward.py compares
MATH answers with it (math-verify and sympy can take seconds, or hang, on some inputs): the mechanics of reward.py's
departure 3, with no departure of its own.

    pool = Pool("reward:verify_in_worker", workers=2, budget=5.0, warm_up=[("(1+x)^2", "x^2+2x+1")])
    pool.run([(pred, gold), ...], default=None)          # -> one result per task, in order

- Workers are fresh interpreters (python -c) that import only the function's module, so they hold no torch; they
  talk to the caller over pipes (multiprocessing.connection) and ignore Ctrl-C (it is the caller's to handle).
- Warm-up: a worker makes the warm_up calls before it says "ready", so that what a function pays on its first calls
  (math-verify: sympy's lazy set-up, 0.4 s of CPU for the first comparison) is paid at start, not by a task.
- Budget: the function is expected to bound its own calls, by CPU time, which a busy machine cannot use up
  (reward.py: a SIGPROF timer in the worker). The pool's budget + MARGIN seconds of wall clock are the backstop for a
  call that ignores that bound (C code holding the GIL, where no signal handler runs): its worker is killed and
  replaced, and the call gives the default. Size the budget so that a normal call on a busy machine never meets it.
- Deaths: a worker that dies (killed from outside, out of memory, or by its task), idle, starting or busy, is
  replaced; a task whose worker died under it is tried again, TASK_TRIES times in all, then gives the default (so a
  task that kills every worker it touches cannot loop forever). START_TRIES failed starts in a row (a target that
  cannot be imported) raise RuntimeError.
- Ends: a Ctrl-C or any error while the pool works kills every worker (no process is left behind; the next run starts
  new ones). A worker ends when its caller closes its pipes, and within PARENT_POLL seconds, silently, when the
  caller's process dies, even by kill -9 (a watchdog thread compares the parent pid); one stuck in C code holding the
  GIL ends only when that code returns.

Linux and macOS (pass_fds); this file imports no project file.

Test: python -m pytest tests/test_reward.py -q -k "batch or worker or alarm or pool or grading"
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
START_SECONDS = 120  # a worker must be ready (imports and warm-up done) within this
TASK_TRIES = 3  # a task whose worker dies under it is tried this many times in all, then gives the default
START_TRIES = 3  # this many workers in a row ending before they are ready is an error (the target cannot start)
PARENT_POLL = 0.1  # seconds between a worker's checks that its caller is alive
SERVE = "import sys, grading; grading.serve(*sys.argv[1:])"


class Worker:
    """One worker process and its two pipes: tasks in, results out. Its warm-up calls are sent at once."""

    def __init__(self, target: str, warm_up: list[tuple]):
        task_read, task_write = os.pipe()
        result_read, result_write = os.pipe()
        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        command = [sys.executable, "-c", SERVE, target, str(task_read), str(result_write), str(os.getpid())]
        self.process = subprocess.Popen(command, pass_fds=(task_read, result_write), stdin=subprocess.DEVNULL, env=env)
        os.close(task_read)
        os.close(result_write)
        self.tasks, self.results = Connection(task_write, readable=False), Connection(result_read, writable=False)
        self.ready = False  # True once it has sent "ready" (its imports and warm-up are done)
        self.started = time.monotonic()
        try:
            self.tasks.send(list(warm_up))
        except OSError:  # it died already: its results pipe says so (a failed start)
            pass

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.tasks.close()
        self.results.close()


def serve(target: str, task_fd: str, result_fd: str, parent: str) -> None:
    """The worker's loop: import target ("module:function"), make the warm-up calls (the first message), say "ready",
    then answer every task (a tuple of arguments) with function(*task) until the caller is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches the whole process group
    threading.Thread(target=watch_parent, args=(int(parent),), daemon=True).start()
    module, name = target.split(":")
    function = getattr(importlib.import_module(module), name)
    tasks, results = Connection(int(task_fd), writable=False), Connection(int(result_fd), readable=False)
    try:
        for task in tasks.recv():
            function(*task)
        results.send("ready")
        while True:
            task = tasks.recv()
            results.send(function(*task))
    except (EOFError, BrokenPipeError):  # the caller closed its pipes or died
        return


def watch_parent(parent: int) -> None:
    """End this worker, silently, once the process that started it is gone (its orphans get another parent)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    os._exit(0)


class Pool:
    """Up to `workers` worker processes running target ("module:function"), started on first use, each making the
    warm_up calls (tuples of arguments) before its first task."""

    def __init__(self, target: str, *, workers: int, budget: float, warm_up: list[tuple] = ()):
        assert workers >= 1, f"need at least one worker, got {workers}"
        self.target, self.size, self.budget, self.warm_up = target, workers, budget, list(warm_up)
        self.workers: list[Worker] = []
        self.failed_starts = 0  # workers in a row that ended before they were ready
        self.lock = threading.Lock()  # one run at a time, whatever thread calls

    def run(self, tasks: list[tuple], default):
        """function(*task) for every task, in order, spread over the workers. A task gives default when its worker
        does not answer within budget + MARGIN seconds (the worker is killed and replaced, the others go on), or when
        TASK_TRIES workers died under it."""
        with self.lock:
            if not tasks:
                return []
            try:
                return self.spread(tasks, default)
            except BaseException:  # Ctrl-C, or workers that cannot start: leave no process behind
                self.close()
                raise

    def spread(self, tasks: list[tuple], default) -> list:
        """The loop of run: hand out tasks, collect answers, replace dead and overrunning workers."""
        while len(self.workers) < min(self.size, len(tasks)):
            self.workers.append(Worker(self.target, self.warm_up))
        results, queue, tries = [default] * len(tasks), collections.deque(range(len(tasks))), [0] * len(tasks)
        busy = {}  # worker -> (task index, when it is overdue)
        while queue or busy:
            self.hand_out(tasks, queue, busy)
            self.collect(results, queue, busy, tries)
            self.replace_overdue(busy)
        return results

    def hand_out(self, tasks: list[tuple], queue: collections.deque, busy: dict) -> None:
        """The next task to each idle ready worker; one that died while idle is replaced, its task waits."""
        for worker in list(self.workers):
            if worker.ready and worker not in busy and queue:
                i = queue.popleft()
                try:
                    worker.tasks.send(tasks[i])
                except OSError:  # BrokenPipeError: nobody reads its pipe any more
                    queue.appendleft(i)
                    self.restart(worker)
                    continue
                busy[worker] = (i, time.monotonic() + self.budget + MARGIN)

    def collect(self, results: list, queue: collections.deque, busy: dict, tries: list[int]) -> None:
        """Wait for the first answers ("ready" from a starting worker, or a result), at most until the next deadline."""
        waiting = [w for w in self.workers if w in busy or not w.ready]
        ends = [end for _, end in busy.values()] + [w.started + START_SECONDS for w in waiting if not w.ready]
        for connection in wait([w.results for w in waiting], timeout=max(0.0, min(ends) - time.monotonic())):
            worker = next(w for w in waiting if w.results is connection)
            try:
                answer = worker.results.recv()
            except (EOFError, OSError):  # it died: killed from outside, out of memory, or by its task
                self.lost(worker, queue, busy, tries)
                continue
            if worker.ready:
                results[busy.pop(worker)[0]] = answer
            else:
                worker.ready, self.failed_starts = True, 0

    def lost(self, worker: Worker, queue: collections.deque, busy: dict, tries: list[int]) -> None:
        """Replace a worker that died; its task goes back to the front of the queue unless TASK_TRIES workers have now
        died under it (then it keeps the default)."""
        if worker in busy:
            i = busy.pop(worker)[0]
            tries[i] += 1
            if tries[i] < TASK_TRIES:
                queue.appendleft(i)
        else:
            self.failed_starts += 1
            if self.failed_starts >= START_TRIES:
                raise RuntimeError(f"{START_TRIES} grading workers ({self.target}) in a row ended while starting")
        self.restart(worker)

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
        """Kill worker and start a new one in its place (it becomes ready in a second or two, while the others work)."""
        worker.kill()
        self.workers[self.workers.index(worker)] = Worker(self.target, self.warm_up)

    def close(self) -> None:
        """Kill every worker (the next run starts new ones)."""
        for worker in self.workers:
            worker.kill()
        self.workers, self.failed_starts = [], 0
