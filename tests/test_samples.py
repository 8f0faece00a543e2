"""The credit view: train.py --log-samples records (run_dir/samples/) and tools/show_credit.py."""

import html.parser
import json
import statistics
from pathlib import Path

import pytest
import torch
from conftest import TINY, load_script, parity
from transformers import AutoModelForCausalLM

import ppo
import reward
import train
import vine

show_credit = load_script("tools/show_credit")

ESTIMATORS = ("vine", "critic", "grpo", "rloo")
# 2 prompts x 4 answers, minibatches of 4: each logged answer is whitened with 3 others, twice (two epochs)
ARGV = TINY + ["--num_iterations", "2", "--samples_per_prompt", "4", "--minibatch_size", "4",
               "--log_samples", "3"]


def start(sft_model) -> list[str]:
    """ARGV from the tiny SFT model (conftest.sft_model): it stops with EOS, so the stand-in reward gives signal."""
    return ARGV + ["--model", str(sft_model)]


def read_samples(run_dir: Path) -> dict[int, list[dict]]:
    return {int(p.stem): [json.loads(line) for line in p.read_text().splitlines()]
            for p in (run_dir / "samples").glob("*.jsonl")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_model) -> dict:
    """A 2-iteration run of each estimator, and what its update saw: the episodes of each iteration (ppo_update's
    argument), and the advantages that ppo.ppo_loss got for each episode of each minibatch (micro-batches of 1)."""
    out = {}
    for advantage in ESTIMATORS:
        run_dir = tmp_path_factory.mktemp(advantage)
        episodes, losses, order = [], [], []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(reward, "grade", parity)
            update, backward, loss = train.ppo_update, train.minibatch_backward, ppo.ppo_loss

            def ppo_update(state, eps, *rest):
                episodes.append(eps)
                return update(state, eps, *rest)

            def minibatch_backward(state, minibatch, *rest):
                order.extend(minibatch)
                return backward(state, minibatch, *rest)

            def ppo_loss(logprobs, old, advantages, mask, **kwargs):
                losses.append(advantages[0, mask[0].bool()].tolist())  # one episode per micro-batch
                return loss(logprobs, old, advantages, mask, **kwargs)

            mp.setattr(train, "ppo_update", ppo_update)
            mp.setattr(train, "minibatch_backward", minibatch_backward)
            mp.setattr(ppo, "ppo_loss", ppo_loss)
            train.main(start(sft_model) + ["--advantage", advantage, "--run_dir", str(run_dir)])
        used = {}  # id(episode) -> its whitened advantages in each epoch, as the loss got them
        for e, advs in zip(order, losses, strict=True):
            used.setdefault(id(e), []).append(advs)
        out[advantage] = dict(run_dir=run_dir, episodes=episodes, used=used)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ESTIMATORS)
def test_records_hold_the_values_and_advantages_the_update_used(runs, advantage):
    run = runs[advantage]
    samples = read_samples(run["run_dir"])
    assert sorted(samples) == [0, 1] and all(len(records) == 3 for records in samples.values())
    for iteration, records in samples.items():
        assert len({r["answer_index"] for r in records}) == 3
        for r in records:
            e = run["episodes"][iteration][r["answer_index"]]
            assert r["iteration"] == iteration and r["estimator"] == advantage
            assert r["question"].endswith("How many now?") and "[MATH_TASK]" not in r["question"]
            assert r["reward"] == e.reward and r["finished"] == e.finished and r["gold"].lstrip("-").isdigit()
            assert r["response_ids"] == e.response_ids[: len(r["response_ids"])]
            assert len(e.response_ids) == len(r["response_ids"]) + e.finished  # + the EOS
            check_steps(r, e, run["used"][id(e)])


def check_steps(r: dict, e: ppo.Episode, used: list[list[float]]) -> None:
    """The steps tile the answer's characters and tokens; their advantages, whitened advantages and values are the
    episode's (what the update used), with each estimator's own fields only."""
    steps, p = r["steps"], len(e.prompt_ids)
    assert "".join(s["text"] for s in steps) == r["answer"]
    assert [s["chars"][0] for s in steps] == [0] + [s["chars"][1] for s in steps[:-1]]
    assert [s["tokens"][0] for s in steps] == [0] + [s["tokens"][1] for s in steps[:-1]]
    assert steps[-1]["chars"][1] == len(r["answer"]) and steps[-1]["tokens"][1] == len(r["response_ids"])
    assert len(used) == 2  # two epochs, each whitened over its own minibatch
    for k, s in enumerate(steps):
        t0, t1 = s["tokens"]
        if t1 > t0:
            assert s["advantage"] == pytest.approx(statistics.fmean(e.advantages[t0:t1]), abs=1e-12)
            for epoch, w in enumerate(s["whitened"]):  # the loss's advantages, which are the step's on every token
                assert w == pytest.approx(statistics.fmean(used[epoch][t0:t1]), abs=1e-6)
                if r["estimator"] != "critic":
                    assert max(used[epoch][t0:t1]) - min(used[epoch][t0:t1]) < 1e-6
        assert ("v_before" in s) == (r["estimator"] == "vine") and ("v_old" in s) == (r["estimator"] == "critic")
        if r["estimator"] == "vine":  # V(s_k) from the MC values, V(terminal) = 0, A_k = r_k + V(s_{k+1}) - V(s_k)
            if k < len(e.values):
                assert s["v_before"] == e.values[k]
            last = k == len(steps) - 1
            assert s["v_after"] == (0.0 if last else steps[k + 1]["v_before"])
            assert s["advantage"] == pytest.approx((r["reward"] if last else 0.0) + s["v_after"] - s["v_before"])
        if r["estimator"] == "critic":  # A_t = R - V_old(s_t)
            assert s["v_old"] == e.old_values[p - 1 + t0 : p - 1 + t1].tolist()
            if t1 > t0:
                assert s["advantage"] == pytest.approx(statistics.fmean(r["reward"] - v for v in s["v_old"]))
    assert ("advantage" in r) == (r["estimator"] in ("grpo", "rloo"))
    if "advantage" in r:
        assert all(a == r["advantage"] for a in e.advantages)


def chunks_of_3(tokenizer, response_ids, dataset) -> list[int]:
    """A splitter that ignores the text: a new step every 3 tokens (a fork of vine.step_map, docs/fork.md)."""
    return [t // 3 for t in range(len(response_ids))]


@pytest.mark.slow
def test_a_splitter_that_is_not_line_based_reaches_the_values_the_diagnostic_and_the_records(tmp_path, sft_model,
                                                                                             monkeypatch):
    """Replacing vine.step_map alone changes every reader of the steps: the MC states, the value diagnostic (which
    fails on a count mismatch) and the credit records' spans."""
    monkeypatch.setattr(reward, "grade", parity)
    monkeypatch.setattr(vine, "step_map", chunks_of_3)
    maps = []  # the token_steps argument of every estimate_values call
    estimate = vine.estimate_values
    monkeypatch.setattr(vine, "estimate_values", lambda *a, **k: (maps.append(a[4]), estimate(*a, **k))[1])
    train.main(start(sft_model) + ["--num_iterations", "1", "--value_diagnostic", "2", "--diagnostic_rollouts", "2",
                                   "--run_dir", str(tmp_path)])
    (records,) = read_samples(tmp_path).values()
    assert len(records) == 3
    for r in records:
        n = len(r["response_ids"])
        assert [s["tokens"] for s in r["steps"]] == ([[t, min(t + 3, n)] for t in range(0, n, 3)] or [[0, 0]])
        assert "".join(s["text"] for s in r["steps"]) == r["answer"]
    training, reference, fresh = maps  # the answers', then the diagnostic's two estimates of 2 answers
    assert [len(m) for m in reference] == [len(m) for m in fresh] and len(reference) == 2
    assert all(m == chunks_of_3(None, m, None) for m in training) and all(m in training for m in reference)
    (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mean_steps = sum(m[-1] + 1 if m else 1 for m in training) / len(training)
    assert line["vine/mean_steps"] == pytest.approx(mean_steps) and "diag/mc_mae" in line


@pytest.mark.slow
def test_resume_writes_each_iteration_once(tmp_path, sft_model, monkeypatch):
    monkeypatch.setattr(reward, "grade", parity)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.main(start(sft_model) + ["--run_dir", str(whole)])
    train.main(start(sft_model) + ["--run_dir", str(parts), "--stop_after", "1"])
    assert sorted(read_samples(parts)) == [0]
    train.main(start(sft_model) + ["--run_dir", str(parts), "--resume"])
    assert read_samples(parts) == read_samples(whole) and sorted(read_samples(whole)) == [0, 1]
    assert all(len(records) == 3 for records in read_samples(parts).values())


@pytest.mark.slow
def test_log_samples_0_writes_nothing_and_changes_no_training_number(tmp_path, runs, sft_model, monkeypatch):
    monkeypatch.setattr(reward, "grade", parity)
    off = tmp_path / "off"
    train.main(start(sft_model) + ["--log_samples", "0", "--run_dir", str(off)])
    assert not (off / "samples").exists()
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}  # noqa: E731
                          for line in open(path / "metrics.jsonl")]
    assert strip(off) == strip(runs["vine"]["run_dir"])
    a = AutoModelForCausalLM.from_pretrained(off / "checkpoint")
    b = AutoModelForCausalLM.from_pretrained(runs["vine"]["run_dir"] / "checkpoint")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------------------------------------------------
# tools/show_credit.py


class Page(html.parser.HTMLParser):
    """Checks that every element closes in order, and collects the text of each answer's step spans."""

    VOID = {"meta", "br", "img", "hr", "link", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.answers, self.in_step, self.tags = [], [], False, set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "answer":
            self.answers.append([])
        self.in_step = tag == "span" and attrs.get("class") == "step"
        if self.in_step:
            self.answers[-1].append("")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"</{tag}> closes nothing open"
        self.in_step = False

    def handle_data(self, data):
        if self.in_step:
            self.answers[-1][-1] += data


@pytest.mark.slow
def test_the_page_is_valid_and_shows_every_step_of_every_record(runs, tmp_path):
    folders = [runs[a]["run_dir"] for a in ESTIMATORS]
    show_credit.main([str(f) for f in folders] + ["--html", str(tmp_path / "credit.html")])
    text = (tmp_path / "credit.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text and "http" not in text  # loads nothing
    page = Page()
    page.feed(text)
    page.close()
    assert page.stack == [] and "html" in page.tags
    # iteration 0, then 1; in each, the answers by index; each answer one cell per run, in the order given
    expected = []
    samples = [read_samples(f) for f in folders]
    for iteration in (0, 1):
        indices = sorted({r["answer_index"] for s in samples for r in s[iteration]})
        for index in indices:
            for s in samples:
                expected += [[st["text"].lstrip("\n") for st in r["steps"]] for r in s[iteration]
                             if r["answer_index"] == index]  # each span holds its step without the leading newline
    newlines = lambda answers: [[t.replace("\r\n", "\n").replace("\r", "\n") for t in a] for a in answers]  # noqa: E731
    assert page.answers == newlines(expected)  # an HTML parser reads every CR as LF


@pytest.mark.slow
def test_terminal_and_picture(runs, tmp_path, capsys):
    show_credit.main([str(runs["vine"]["run_dir"]), "--iteration", "1"])
    out = capsys.readouterr().out
    assert "\033[" not in out  # not a terminal: plain text
    records = read_samples(runs["vine"]["run_dir"])[1]
    assert out.count("iteration 1, answer") == len(records)
    assert out.count(" V ") == sum(len(r["steps"]) for r in records)  # every step's values
    show_credit.show_in_terminal(records, "vine", color=True)
    colored = capsys.readouterr().out
    blamed = sum(abs(s["advantage"]) >= 0.05 for r in records for s in r["steps"])
    assert colored.count("\033[0m") == blamed
    index = records[0]["answer_index"]
    folders = [str(runs[a]["run_dir"]) for a in ("vine", "grpo")]
    show_credit.main(folders + ["--png", str(tmp_path / "credit.png"), "--answer", f"1:{index}"])
    assert (tmp_path / "credit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def refusal(capsys, argv: list[str]) -> str:
    """show_credit.main(argv) must stop with exit code 2 and an error line last on stderr; returns that line."""
    with pytest.raises(SystemExit) as stop:
        show_credit.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "error: " in err.strip().splitlines()[-1] and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_folder_without_samples_is_one_clear_line(tmp_path, capsys):
    assert "holds no samples" in refusal(capsys, [str(tmp_path)])


# bad input: refused in one line with exit code 2, or left out with a note; never a traceback


def fake_record(index: int = 0, **overrides) -> dict:
    """A vine record of iteration 0 shaped as train.write_samples writes it: two steps, the first one blamed."""
    first = {"text": "\n3 + 4 = 8", "chars": [0, 10], "tokens": [0, 4], "advantage": -0.5, "whitened": [-1.0, -0.9]}
    last = {"text": "\n#### 8", "chars": [10, 17], "tokens": [4, 6], "advantage": 0.0, "whitened": [0.1, None]}
    steps = [{**first, "v_before": 0.5, "v_after": 0.0}, {**last, "v_before": 0.0, "v_after": 0.0}]
    record = dict(iteration=0, answer_index=index, estimator="vine", question="How many now?", gold="7", reward=0.0)
    record |= dict(finished=True, answer="\n3 + 4 = 8\n#### 8", response_ids=[5] * 6, steps=steps)
    return {**record, **overrides}


def write_samples(run_dir: Path, *lines: str, name: str = "0.jsonl") -> Path:
    """run_dir/samples/<name> holding the lines as given (records: json.dumps them)."""
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    path = run_dir / "samples" / name
    path.write_bytes("".join(line + "\n" for line in lines).encode(errors="surrogateescape"))
    return path


def test_stray_files_in_samples_are_skipped_with_a_note(tmp_path, capsys):
    write_samples(tmp_path, json.dumps(fake_record()))
    write_samples(tmp_path, "my notes", name="notes.jsonl")
    write_samples(tmp_path, "my notes", name="notes.txt")
    show_credit.main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert "iteration 0, answer 0" in out and "skipped" in err and "notes.jsonl" in err


def bad_step(**change) -> str:
    record = fake_record(1)
    record["steps"][1] = {k: v for k, v in {**record["steps"][1], **change}.items() if v is not ...}
    return json.dumps(record)


BAD_LINES = {  # a line of a samples file -> what the note says of it
    "not-json": ("{not json", "not JSON"),
    "bytes": ("\udcff\udcfe", "not JSON"),
    "a-list": ("[1, 2]", "not a JSON object"),
    "no-steps": (json.dumps({k: v for k, v in fake_record(1).items() if k != "steps"}), "no 'steps'"),
    "no-reward": (json.dumps({k: v for k, v in fake_record(1).items() if k != "reward"}), "no 'reward'"),
    "no-index": (json.dumps({k: v for k, v in fake_record(1).items() if k != "answer_index"}), "no 'answer_index'"),
    "reward-text": (json.dumps(fake_record(1, reward="1")), "'reward' is not a number"),
    "steps-a-number": (json.dumps(fake_record(1, steps=3)), "'steps' is not a list"),
    "no-whitened": (bad_step(whitened=...), "step 1 has no whitened"),
    "no-v-after": (bad_step(v_after=...), "step 1 has no numbers for V"),
}


@pytest.mark.parametrize("name", BAD_LINES)
def test_a_line_that_is_not_a_record_is_left_out_with_a_note(tmp_path, capsys, name):
    line, why = BAD_LINES[name]
    path = write_samples(tmp_path, json.dumps(fake_record(0)), line)
    show_credit.main([str(tmp_path)])
    show_credit.main([str(tmp_path), "--html", str(tmp_path / "credit.html")])
    out, err = capsys.readouterr()
    assert "iteration 0, answer 0" in out and "answer 1" not in out
    assert "answer 0" in (tmp_path / "credit.html").read_text()
    assert f"skipped {path}, line 2: {why}" in err


def test_a_folder_of_only_unreadable_records_is_refused(tmp_path, capsys):
    write_samples(tmp_path, BAD_LINES["no-steps"][0])
    assert "no record that can be shown" in refusal(capsys, [str(tmp_path)])


def test_non_finite_advantages_are_shown_uncoloured_and_a_nan_reward_is_not_graded(tmp_path, capsys):
    record = fake_record(reward=float("nan"))
    record["steps"][0]["advantage"] = float("nan")
    write_samples(tmp_path, json.dumps(record))
    show_credit.main([str(tmp_path)])
    assert "1 step(s) with an advantage that is not a finite number" in capsys.readouterr().err
    assert show_credit.colour(float("nan")) == show_credit.colour(None) and show_credit.ansi(float("inf")) == ""
    show_credit.show_in_terminal([record], "run", color=True)
    out = capsys.readouterr().out
    assert "reward nan (not graded)" in out and "A nan," in out and "\033[" not in out.split("\n")[3]


def test_outputs_go_into_folders_that_do_not_exist_yet(tmp_path, capsys):
    write_samples(tmp_path, json.dumps(fake_record()))
    show_credit.main([str(tmp_path), "--html", str(tmp_path / "new" / "page.html")])
    assert (tmp_path / "new" / "page.html").read_text().startswith("<!DOCTYPE html>")
    pytest.importorskip("matplotlib")
    show_credit.main([str(tmp_path), "--png", str(tmp_path / "new2" / "credit")])  # no suffix: .png, as matplotlib
    assert (tmp_path / "new2" / "credit.png").read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {tmp_path / 'new2' / 'credit.png'}" in capsys.readouterr().out


def test_an_output_that_is_a_folder_is_refused(tmp_path, capsys):
    write_samples(tmp_path, json.dumps(fake_record()))
    assert "is a folder" in refusal(capsys, [str(tmp_path), "--html", str(tmp_path)])


@pytest.mark.parametrize(
    "option", [("--answer", "x"), ("--answer", "3"), ("--answer", "0:-1"), ("--iteration", "-1")], ids=str
)
def test_malformed_options_are_refused(tmp_path, capsys, option):
    write_samples(tmp_path, json.dumps(fake_record()))
    assert f"argument {option[0]}" in refusal(capsys, [str(tmp_path), "--png", str(tmp_path / "c.png"), *option])


def test_the_same_run_given_twice_is_refused(tmp_path, capsys):
    write_samples(tmp_path / "a", json.dumps(fake_record()))
    assert "the same run folder" in refusal(capsys, [str(tmp_path / "a"), str(tmp_path / "a") + "/"])
