"""Plumbing: the run folder, its lock, atomic saves and their recovery, checkpoints and resume. Safe to skip on a
first read: nothing here is VinePPO; it is what makes a run of days survive a stop.

A run folder (train.py --run-dir, default runs/<dataset>/) holds metrics.jsonl (one line per iteration), evals/
(every problem's score at each evaluation), samples/ (a few answers per iteration with their credit, --log-samples),
init/ (the starting model when the run made it, with init_args.json: sft.py), best/ (the policy with the best
validation Pass@1), checkpoint/ (the model with save_pretrained, trainer_state.pt, run_args.json, critic.pt) and
train.lock.

What survives what (tests/test_checkpoint.py and tests/test_reliability.py check every row):

    event                                      what happens                               what is kept
    Ctrl-C during sampling, values or eval     a checkpoint of the policy after the last  everything; --resume
                                               finished update, exit 130                  continues exactly
    Ctrl-C during a PPO update or its save     the update and the save finish first       everything
    a second Ctrl-C (or a burst of signals)    ignored while the first one's save runs;   everything
                                               the exit code stays 130
    SIGTERM (kill, preemption, torchrun)       the same as Ctrl-C                         the same
    Ctrl-C during loading or SFT               exit 130: "nothing was saved or changed"   the folder as it was
    kill -9, power loss                        nothing runs                               the last checkpoint;
                                               --resume drops the metrics.jsonl lines written after it (a cut last
                                               line too) and redoes those iterations, so each is logged once
    a crash in the middle of a save            saves go to X.tmp, fsynced, then two       the previous X, or the new
                                               renames (fsynced too)                      one when the crash fell
                                                                                          between the renames
    a full disk, file-size limit or read-only  one line "could not write ...", exit 1     the previous save
    folder at a save
    --resume of a damaged checkpoint           one line: what is damaged, and to start    best/ and init/
                                               from best/ or init/ (damaged)
    --resume with other settings               refused, naming them (only options that    the run
                                               draw no number may differ: RESUME_MAY_DIFFER in train.py)
    a second train.py on the same folder       refused, naming the first one's process    the first run
    a leftover init/ made with other options   refused: delete it to remake it (also one  the old init/
    (or with no record of them)                with no init_args.json)

(train.py adds: a NaN or inf loss or gradient skips that optimizer step; non-finite weights stop the run before any
save; bad options are refused before any work.)

This file imports no project file and never reads train.py's Args: callers pass plain values.
"""

import contextlib
import json
import os
import pickle
import random
import shutil
import signal
import traceback

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

try:
    import fcntl  # the run-folder lock (Linux, macOS); without it (Windows) runs are not locked
except ImportError:
    fcntl = None


@contextlib.contextmanager
def run_dir_lock(run_dir: str):
    """Hold an exclusive lock on run_dir/train.lock while this process trains there: a second train.py on the same
    folder stops with the first one's process id. The kernel releases the lock when its process dies, so a killed
    run never blocks the next one. Also the first check that run_dir is writable."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, "train.lock"), "a+")
    except OSError as e:
        raise SystemExit(f"error: cannot write to {run_dir} ({e.strerror}); choose a writable --run-dir") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                raise SystemExit(
                    f"error: {run_dir} is in use by another train.py (process {holder}); wait for it to end or "
                    "choose another --run-dir"
                ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
    finally:
        lock.close()  # releases the flock


def check_run_dir(run_dir: str, *, resume: bool, run_args: dict, may_differ: set[str], defaults: dict | None = None):
    """Refuse to overwrite another run, and refuse to resume a run that was started with other settings (any option
    of run_args but those in may_differ). An option the saved run does not know (added since it started) takes its
    default (defaults), with a line that says so. First finish any save that a crash cut between its two renames."""
    for name in ("checkpoint", "best", "init"):
        recover_folder(os.path.join(run_dir, name))
    state_file = os.path.join(run_dir, "checkpoint", "trainer_state.pt")
    if not os.path.exists(state_file):
        if resume:
            raise SystemExit(f"error: --resume given but {run_dir} holds no checkpoint")
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            raise SystemExit(
                f"error: {run_dir} holds the metrics of a run that saved no checkpoint; delete {metrics} to "
                "start over there, or choose another --run-dir"
            )
        return
    if not resume:
        raise SystemExit(
            f"error: {run_dir} holds another run's checkpoint; pass --resume to continue it, "
            "or choose another --run-dir"
        )
    try:
        with open(os.path.join(run_dir, "checkpoint", "run_args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise damaged(os.path.join(run_dir, "checkpoint"), e) from None
    new = sorted(k for k in run_args if k not in saved and k not in may_differ)
    if new:
        names = ", --".join(k.replace("_", "-") for k in new)
        print(f"{run_dir} was started before --{names} existed: the run goes on with the default")
        saved = {**saved, **{k: (defaults or {}).get(k) for k in new}}
    changed = [k for k, v in run_args.items() if k not in may_differ and saved.get(k) != v]
    if changed == ["num_iterations"]:
        raise SystemExit(
            f"error: {run_dir} was started with --num-iterations {saved['num_iterations']}; a run cannot be "
            "extended, because its LR schedule decays to 0 over the run's total steps. To train on, start a new run "
            f"from its policy: --model {os.path.join(run_dir, 'checkpoint')} --sft-steps 0 --run-dir NEW"
        )
    if changed:
        raise SystemExit(
            f"error: {run_dir} was started with other settings ({', '.join(changed)}); "
            "resume with the same options or choose another --run-dir"
        )


def trim_metrics(path: str, next_iteration: int) -> None:
    """Drop the metrics.jsonl lines of iterations the checkpoint does not hold (written after it, before a crash),
    so that a resumed run logs each iteration exactly once. The file is rewritten atomically."""
    if not os.path.exists(path):
        return
    with open(path, errors="replace") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            iteration = json.loads(line)["iteration"]
        except (ValueError, KeyError, TypeError) as e:
            if number == len(lines):  # a last line cut by a crash or a power loss: past the checkpoint, dropped
                continue
            error = f"{path}, line {number}, is damaged ({type(e).__name__}: {first_line(e)})"
            raise SystemExit(f"error: {error}; only a cut last line is dropped by itself") from None
        if iteration < next_iteration:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        print(f"dropped {len(lines) - len(kept)} line(s) of {path} past the checkpoint; they will be redone")


# ---------------------------------------------------------------------------------------------------------------------
# Models in and out of folders: a hub id or a local folder, with an error a user can act on


def load_model(path: str, device: str):
    """Load a causal LM and its tokenizer from a hub id or a local folder, with an error a user can act on: a folder
    that exists but does not load is named as damaged (see damaged), anything else as a model the hub did not give."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as e:
        if os.path.isdir(path):
            raise damaged(path, e) from None
        raise SystemExit(
            f"error: could not load the model {path!r} ({type(e).__name__}: {first_line(e)}); pass --model a local "
            "folder holding a Hugging Face model and tokenizer (config.json, *.safetensors, tokenizer files), or "
            "--model tiny: the hub may be unreachable from this machine"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(model)
    return model.to(device), tokenizer


def load_config(path: str):
    """The config of a hub id or a local folder, or None if it cannot be read now (load_model then says why)."""
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


def disable_dropout(model) -> None:
    """Dropout off everywhere (docs/paper.md pitfall 13: the reference and pi_old have no dropout), so that train()
    mode, needed by gradient checkpointing, changes nothing."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def damaged(path: str, error: BaseException) -> SystemExit:
    """The one-line error for a save that does not load (cut short by a crash or a full disk, or a copy that failed):
    what broke, what of its run folder is left to start from (best/, init/), and what to do."""
    run_dir, name = os.path.split(os.path.normpath(path))
    left = [os.path.join(run_dir, other) for other in ("best", "init") if other != name]
    left = [folder for folder in left if os.path.exists(os.path.join(folder, "config.json"))]
    advice = f"delete {path} and start again"
    if left:
        advice = f"{' and '.join(left)} are still there: start a new run from one (--model {left[0]} --sft-steps 0 "
        advice += "--run-dir NEW), or delete the folder and start again"
    return SystemExit(f"error: {path} is damaged or incomplete ({type(error).__name__}: {first_line(error)}); {advice}")


# ---------------------------------------------------------------------------------------------------------------------
# Atomic folder saves


def save_folder(path: str, model, tokenizer, files: dict, state_dict: dict | None = None) -> None:
    """The model and tokenizer (save_pretrained; state_dict: the weights to write instead of the model's own, e.g. the
    whole model gathered from its shards) and `files` (name -> object, written with json for .json names and
    torch.save otherwise) go to path.tmp, which then replaces path by renames: a crash never leaves half a folder."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, obj in files.items():
            if name.endswith(".json"):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=1)
            else:
                torch.save(obj, os.path.join(tmp, name))
        sync_folder(tmp)  # on disk before the renames: a power loss then leaves the old save or a complete new one
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk, a file-size limit, a read-only folder
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"{path} still holds the previous save" if os.path.exists(path) else f"nothing was written to {path}"
        raise SystemExit(f"error: could not write {path} ({type(e).__name__}: {first_line(e)}); {kept}") from None
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)  # a crash between the two renames leaves old and a complete tmp: recover_folder finishes
    sync_path(os.path.dirname(os.path.abspath(path)))  # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


def sync_path(path: str) -> None:
    """fsync a file or a folder (a folder's entries: the names and renames in it), so that it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: str) -> None:
    """fsync every file under folder, then every folder under it, bottom up."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            sync_path(os.path.join(root, name))
        sync_path(root)


def write_text(path: str, text: str) -> None:
    """Write a file of the run folder whole (path.tmp, then a rename), its folder made if needed: a crash leaves the
    previous file or the new one, and a resumed iteration replaces what it wrote before."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    sync_path(os.path.dirname(os.path.abspath(path)))


def recover_folder(path: str) -> None:
    """Finish a save_folder cut between its two renames: path.old exists only once path.tmp was complete, so the
    save is path.tmp (or path.old if that was renamed too). Any other leftover .tmp is half-written and ignored."""
    tmp, old = path + ".tmp", path + ".old"
    if not os.path.exists(path) and os.path.exists(old):
        os.replace(tmp if os.path.exists(tmp) else old, path)
        print(f"recovered {path} from an interrupted save")
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: save_pretrained (loadable by transformers and vLLM) + optimizer, scheduler, RNG, iteration


def save_checkpoint(
    path: str, model, tokenizer, *, optimizer: dict, scheduler: dict, next_iteration: int, best_val: float,
    run_args: dict, world_size: int, model_state: dict | None = None, critic: tuple | None = None,
) -> None:
    """A checkpoint that --resume continues exactly: the model (model_state, if given, is what is written: the whole
    model gathered from its shards), the optimizer and scheduler state dicts, the RNG states, the iteration to
    continue at and the best validation Pass@1 so far; with critic = (its state dict, its optimizer's, its
    scheduler's), critic.pt and those states too. run_args.json is small: check_run_dir reads only it. world_size,
    the number of processes, is recorded: the ranks' shares and random streams depend on it, so resume must match."""
    state = dict(
        optimizer=optimizer,
        scheduler=scheduler,
        rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state()),
        next_iteration=next_iteration,
        best_val_pass1=best_val,
        world_size=world_size,
    )
    files = {"trainer_state.pt": state, "run_args.json": run_args}
    if critic is not None:
        files["critic.pt"], state["critic_optimizer"], state["critic_scheduler"] = critic
    save_folder(path, model, tokenizer, files, state_dict=model_state)
    print(f"saved {path} (next iteration {next_iteration})")


def restore_checkpoint(path: str, *, world_size: int, main: bool = True) -> dict:
    """What save_checkpoint saved in path/trainer_state.pt, after checking that as many processes wrote it; the RNGs
    continue where they were saved. The caller loads the optimizer and scheduler states it holds (optimizer,
    scheduler, critic_optimizer, critic_scheduler); next_iteration and best_val_pass1 say where the run stands.
    main False (the other ranks, which take the AdamW state from rank 0): the file is memory-mapped, so that its
    tensors are not read into every rank's memory."""
    try:
        # map_location: a checkpoint saved on a GPU resumes on a machine without one (load_optimizer_state then
        # moves AdamW's state to wherever the weights are)
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False, mmap=not main,
                           map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise damaged(path, e) from None
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:  # the shares and random streams depend on the number of ranks
        launch = "python train.py" if saved_world == 1 else f"torchrun --nproc_per_node {saved_world} train.py"
        raise SystemExit(
            f"error: {path} was written by a run of {saved_world} process(es) and this one has {world_size}; resume "
            f"it with as many ({launch} ..., or that many processes in all across machines)"
        )
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    print(f"resumed from {path} at iteration {state['next_iteration']}")
    state.setdefault("best_val_pass1", -1.0)
    return state


def load_critic_weights(path: str) -> dict:
    """The critic's state dict saved in path/critic.pt, on the CPU; a damaged file is named as damaged."""
    try:
        return torch.load(os.path.join(path, "critic.pt"), map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise damaged(path, e) from None


def print_run_files(run_dir: str, best_val: float) -> None:
    """Where a finished run's files are, and the command that draws its curves."""
    print(f"metrics:    {os.path.join(run_dir, 'metrics.jsonl')}")
    print(f"checkpoint: {os.path.join(run_dir, 'checkpoint')}")
    if best_val >= 0:
        print(f"best:       {os.path.join(run_dir, 'best')} (validation Pass@1 {best_val:.4f})")
    curves = os.path.join(run_dir, "curves.png")
    print(f"curves:     python tools/plot_metrics.py {run_dir}   (writes {curves}; needs matplotlib)")


def is_due(iteration: int, *, num_iterations: int, save_every: int) -> bool:
    """Checkpoint after every save_every-th iteration and after the last one."""
    return iteration + 1 == num_iterations or bool(save_every and (iteration + 1) % save_every == 0)


def out_of_memory(error: BaseException) -> bool:
    """Is this a GPU's out-of-memory error, or the CPU allocator's (a RuntimeError)?"""
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(error)


def out_of_memory_message(error: BaseException, phases: dict, run_dir: str, device: str) -> str:
    """The one line an out-of-memory error ends a run with: its phase (the innermost function of phases on the
    traceback: name -> (phase, settings to lower)), the settings to lower, and what is on disk (nothing of the
    unfinished iteration was saved; the checkpoint before it is intact)."""
    frames = [frame.name for frame in reversed(traceback.extract_tb(error.__traceback__))]
    phase, settings = next((phases[name] for name in frames if name in phases),
                           ("this run", "--max-batch-tokens or --micro-batch-size"))
    saved = os.path.join(run_dir, "checkpoint")
    if os.path.exists(os.path.join(saved, "trainer_state.pt")):
        disk = f"the checkpoint in {saved} is intact: continue with --resume and the lower setting"
    else:
        disk = f"no checkpoint was saved yet: start again with the lower setting (delete {run_dir} first)"
    return f"error: out of memory on {device} in {phase}: lower {settings} (tools/memory_plan.py); {disk}"


# Under torchrun, the signals that came once the run was set up, outside an uninterrupted block: they stop the run at
# the end of the next one, where every rank stops at the same point (open_run with defer).
PENDING: list[int] = []


class Run:
    """What open_run yields. on_stop() saves what a stop must not lose; train.py sets it once it has set the run up
    (None until then: a stop while loading or in SFT saves nothing)."""

    def __init__(self, defer: bool):
        self.on_stop, self.defer = None, defer

    def handle(self, signum: int, frame) -> None:
        """The handler of Ctrl-C and SIGTERM inside open_run: the first one stops the run, at once (stop_on_interrupt:
        a KeyboardInterrupt where the program is) or, with defer once the run is set up, at the end of the next
        uninterrupted block: a rank stopped anywhere else could be inside a collective the others never join, and
        the save that follows gathers the weights from every rank. Every later signal is ignored."""
        if self.defer and self.on_stop is not None:
            PENDING.append(signum)
            ignore_interrupts()
        else:
            stop_on_interrupt(signum, frame)


@contextlib.contextmanager
def open_run(run_dir: str, *, main: bool, resume: bool, run_args: dict, may_differ: set[str], defer: bool = False,
             defaults: dict | None = None):
    """A run in its folder, and the one place that decides what a stop does to it.

    main (rank 0): finish a save that a crash cut (recover_folder), refuse to overwrite another run or to resume one
    with other settings (check_run_dir), and hold the folder's lock until the run ends (run_dir_lock). Every rank:
    Ctrl-C and SIGTERM stop the run (Run.handle; defer: under torchrun, at the end of an uninterrupted block once the
    run is set up); then run.on_stop() saves a checkpoint (nothing while setting up), and the process exits 130. The
    handlers from before are back on return, except after a stop: the process is exiting with 130, and a signal that
    came after they were back would end it with 143 or -2, its traceback cutting the last lines."""
    run = Run(defer)
    PENDING.clear()
    previous = {s: signal.signal(s, run.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    stopped = False
    try:
        with run_dir_lock(run_dir) if main else contextlib.nullcontext():
            if main:
                check_run_dir(run_dir, resume=resume, run_args=run_args, may_differ=may_differ, defaults=defaults)
            try:
                yield run
            except KeyboardInterrupt:
                ignore_interrupts()  # from here on: a second Ctrl-C must not cut the save below
                if run.on_stop is None:
                    print("interrupted while setting up (loading, SFT): nothing was saved or changed; run the same "
                          "command again")
                else:
                    run.on_stop()
                    print("interrupted; continue with --resume")
                stopped = True
                raise SystemExit(130) from None
    finally:
        for s, handler in previous.items() if not stopped else ():
            signal.signal(s, handler)


def stop_on_interrupt(signum: int, frame) -> None:
    """Stop the run at once (KeyboardInterrupt, which open_run turns into a checkpoint and exit 130) and ignore every
    later signal, so that none can cut the save that follows, however fast they come."""
    ignore_interrupts()
    raise KeyboardInterrupt


def ignore_interrupts() -> None:
    """Ignore Ctrl-C and SIGTERM from here on: the run is stopping, and another one (people press Ctrl-C twice, a
    scheduler sends SIGTERM again) must neither cut the checkpoint being written nor change the exit code."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def stop_point(agree=bool) -> None:
    """Stop the run here (as uninterrupted does at its end) if open_run deferred a signal (torchrun): a point between
    phases outside the update, where every rank calls it. agree decides with the other ranks (distributed.any_rank)."""
    if agree(bool(PENDING)):
        ignore_interrupts()
        raise KeyboardInterrupt


@contextlib.contextmanager
def uninterrupted(agree=bool):
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, so that an update and its log line, or a checkpoint
    save, are never cut halfway; then, if one came (or open_run deferred one to here), stop the run as open_run does
    (KeyboardInterrupt, later signals ignored). agree(came: bool) -> bool decides with the other ranks (train.py passes
    distributed.any_rank), so that a signal that reached one rank stops every rank at the same point. One that comes
    after they agreed, in the last instants of the block, still stops this rank: it is never lost."""
    pressed = []
    hold = lambda signum, frame: pressed.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
        stop = agree(bool(pressed or PENDING))  # PENDING: a signal open_run deferred to here
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop or pressed:
        ignore_interrupts()
        raise KeyboardInterrupt
