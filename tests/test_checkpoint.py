"""checkpoint.py, the run folder's plumbing: the lock, atomic saves and their recovery, a checkpoint that restores
exactly, the metrics trimmed to the checkpoint, what a stop does (open_run, uninterrupted). The end-to-end cases (a run
killed, a second train.py on the folder, a full disk) are in tests/test_reliability.py."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
from conftest import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_lock_on_the_folder_is_refused_with_the_holders_pid(tmp_path):
    with checkpoint.run_dir_lock(str(tmp_path)):
        with pytest.raises(SystemExit, match=f"in use by another train.py \\(process {os.getpid()}\\)"):
            with checkpoint.run_dir_lock(str(tmp_path)):  # flock is per open file: the same process is refused too
                pass
    with checkpoint.run_dir_lock(str(tmp_path)):  # released on exit: it can be taken again
        pass


def test_a_killed_runs_lock_does_not_block(tmp_path):
    hold = "import checkpoint, sys, time\nwith checkpoint.run_dir_lock(sys.argv[1]): time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], cwd=ROOT)
    for _ in range(600):  # wait until it holds the lock (importing torch takes a few seconds)
        if (tmp_path / "train.lock").exists() and (tmp_path / "train.lock").read_text().strip():
            break
        time.sleep(0.1)
    holder.kill()
    holder.wait()
    with checkpoint.run_dir_lock(str(tmp_path)):
        assert (tmp_path / "train.lock").read_text().strip() == str(os.getpid())


def write_folder(path: Path, marker: str) -> None:
    path.mkdir(parents=True)
    (path / "marker").write_text(marker)


@pytest.mark.parametrize("left", [("old", "tmp"), ("old",), ("tmp",), ("new", "old")])
def test_recover_folder_finishes_a_cut_save(tmp_path, left):
    path = tmp_path / "checkpoint"
    for name in left:
        write_folder(tmp_path / {"new": "checkpoint", "old": "checkpoint.old", "tmp": "checkpoint.tmp"}[name], name)
    checkpoint.recover_folder(str(path))
    expected = {("old", "tmp"): "tmp", ("old",): "old", ("tmp",): None, ("new", "old"): "new"}[left]
    if expected is None:  # only a half-written .tmp: there never was a complete save
        assert not path.exists()
    else:
        assert (path / "marker").read_text() == expected
    assert not (tmp_path / "checkpoint.old").exists()


def test_save_folder_replaces_the_previous_save_whole(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    path = tmp_path / "best"
    checkpoint.save_folder(str(path), model, tokenizer, {"a.json": {"n": 1}, "extra.pt": {"x": torch.ones(2)}})
    checkpoint.save_folder(str(path), model, tokenizer, {"a.json": {"n": 2}})
    assert json.loads((path / "a.json").read_text()) == {"n": 2}
    assert not (path / "extra.pt").exists(), "a file of the previous save survived"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"], "no .tmp or .old left"
    loaded, _ = checkpoint.load_model(str(path), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))


def optimizer_and_scheduler(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))


def test_a_checkpoint_restores_optimizer_scheduler_critic_and_random_states(tmp_path):
    tokenizer = make_tokenizer()
    model, critic_model = make_model("llama", len(tokenizer)), make_model("llama", len(tokenizer), seed=1)
    optimizer, scheduler = optimizer_and_scheduler(model)
    critic_optimizer, critic_scheduler = optimizer_and_scheduler(critic_model)
    for opt, sched, m in ((optimizer, scheduler, model), (critic_optimizer, critic_scheduler, critic_model)):
        m(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        opt.step()
        sched.step()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = str(tmp_path / "checkpoint")
    critic = (critic_model.state_dict(), critic_optimizer.state_dict(), critic_scheduler.state_dict())
    checkpoint.save_checkpoint(path, model, tokenizer, optimizer=optimizer.state_dict(),
                               scheduler=scheduler.state_dict(), next_iteration=7, best_val=0.25,
                               run_args={"lr": 0.1}, world_size=1, critic=critic)
    draws = (random.random(), np.random.rand(), torch.rand(1))
    saved = checkpoint.restore_checkpoint(path, world_size=1)
    assert (saved["next_iteration"], saved["best_val_pass1"]) == (7, 0.25)
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws, "the RNGs continue where they were saved"
    fresh_optimizer, fresh_scheduler = optimizer_and_scheduler(model)
    fresh_optimizer.load_state_dict(saved["optimizer"])
    fresh_scheduler.load_state_dict(saved["scheduler"])
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 1 and saved["critic_scheduler"]["last_epoch"] == 1
    fresh_critic = make_model("llama", len(tokenizer), seed=2)
    fresh_critic.load_state_dict(checkpoint.load_critic_weights(path))
    assert all(torch.equal(a, b) for a, b in zip(critic_model.parameters(), fresh_critic.parameters()))
    assert checkpoint.restore_checkpoint(path, world_size=1, main=False)["next_iteration"] == 7  # memory-mapped
    with pytest.raises(SystemExit, match="written by a run of 1 process.*this one has 2.*python train.py"):
        checkpoint.restore_checkpoint(path, world_size=2)


def test_a_checkpoint_saved_on_a_gpu_resumes_on_a_machine_without_one(tmp_path, monkeypatch):
    """trainer_state.pt written on CUDA (its tensors tagged cuda:0, as torch.save tags them there) loads on a CPU, and
    its AdamW state goes to the CPU weights."""
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    optimizer, scheduler = optimizer_and_scheduler(model)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    path = str(tmp_path / "checkpoint")
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        checkpoint.save_checkpoint(path, model, tokenizer, optimizer=optimizer.state_dict(),
                                   scheduler=scheduler.state_dict(), next_iteration=3, best_val=0.5,
                                   run_args={}, world_size=1)
    if not torch.cuda.is_available():  # the file does hold CUDA tensors: a plain torch.load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    for main in (True, False):  # rank 0 reads the file, the other ranks memory-map it
        saved = checkpoint.restore_checkpoint(path, world_size=1, main=main)
        fresh, _ = optimizer_and_scheduler(model)
        fresh.load_state_dict(saved["optimizer"])
        moments = [v for state in fresh.state.values() for k, v in state.items() if k != "step"]
        assert moments and all(v.device.type == "cpu" for v in moments)
        assert all(torch.equal(a, b) for a, b in zip(moments, [v for state in optimizer.state.values()
                                                               for k, v in state.items() if k != "step"]))


def test_resume_gives_an_option_added_since_its_default_and_refuses_another_value(tmp_path, capsys):
    """A run folder saved before an option existed resumes with that option at its default, and one line says so;
    the option given with another value is a change of settings like any other."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "checkpoint" / "run_args.json").write_text(json.dumps({"lr": 0.1, "stop_after": 2}))
    check = lambda run_args: checkpoint.check_run_dir(  # noqa: E731
        str(tmp_path), resume=True, run_args=run_args, may_differ={"stop_after"}, defaults={"step_tokens": 0})
    check({"lr": 0.1, "stop_after": 5, "step_tokens": 0})
    assert capsys.readouterr().out == f"{tmp_path} was started before --step-tokens existed: the run goes on with " \
        "the default\n"
    with pytest.raises(SystemExit, match=r"started with other settings \(step_tokens\)"):
        check({"lr": 0.1, "stop_after": 5, "step_tokens": 8})
    with pytest.raises(SystemExit, match=r"other settings \(lr\)"):
        check({"lr": 0.2, "stop_after": 5, "step_tokens": 0})


def test_trim_metrics_drops_the_lines_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(5)) + "\n")
    checkpoint.trim_metrics(str(path), 3)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2]
    checkpoint.trim_metrics(str(tmp_path / "missing.jsonl"), 3)  # nothing to trim: nothing happens


def test_checkpoints_are_due_every_save_every_iterations_and_at_the_end():
    due = [i for i in range(10) if checkpoint.is_due(i, num_iterations=10, save_every=4)]
    assert due == [3, 7, 9]
    assert [i for i in range(3) if checkpoint.is_due(i, num_iterations=3, save_every=0)] == [2]


def test_a_save_is_on_disk_before_its_renames(tmp_path, monkeypatch):
    """Power loss: every file of the new save and its folder are fsynced before the renames that make it the save,
    and the run folder after them, so a power loss leaves the previous save or the new one, whole."""
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), replace(a, b))[1])
    path = str(tmp_path / "best")
    checkpoint.save_folder(path, model, tokenizer, {"best.json": {"iteration": 3}})
    renamed = events.index(("replace", path))
    synced = {name for kind, name in events[:renamed] if kind == "fsync"}
    assert {os.path.join(path + ".tmp", f) for f in os.listdir(path)} | {path + ".tmp"} <= synced
    assert ("fsync", str(tmp_path)) in events[renamed:]
    events.clear()
    checkpoint.write_text(str(tmp_path / "evals" / "3.json"), "{}")
    assert events == [("fsync", str(tmp_path / "evals" / "3.json.tmp")), ("replace", str(tmp_path / "evals" /
                      "3.json")), ("fsync", str(tmp_path / "evals"))]


def test_a_stop_deferred_under_torchrun_ends_the_run_at_the_next_stop_point(monkeypatch):
    checkpoint.stop_point()  # nothing pending: nothing happens
    monkeypatch.setattr(checkpoint, "PENDING", [15])
    with pytest.raises(KeyboardInterrupt):  # conftest puts back the handlers stop_point leaves ignored
        checkpoint.stop_point(agree=lambda came: came)
