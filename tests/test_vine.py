"""Tests for vine.py: step splitting (docs/paper.md §2), the first-character token rule (docs/paper.md §1.3), step
advantages (docs/paper.md §1.3) and the Monte Carlo value estimator (docs/paper.md §1.2): unbiased on a policy with
known values, deduplicated, and equal to a one-state-at-a-time slow path under greedy decoding."""

import math
import os

import pytest
import torch
from conftest import make_model, make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

import reward
import rollout
import vine

TOKENIZER = make_tokenizer()  # for hypothesis tests, which cannot take function-scoped fixtures
NATALIA = (
    "\nNatalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72\n"
)


def pieces(text: str, ends: list[int]) -> list[str]:
    return [text[a:b] for a, b in zip([0] + ends[:-1], ends)]


def split(text: str, dataset: str) -> list[str]:
    return pieces(text, vine.split_steps(text, dataset))


# ---------------------------------------------------------------------------------------------------------------------
# GSM8K / arithmetic steps (docs/paper.md §2.1)


def test_gsm8k_verified_example():
    text = NATALIA
    assert split(text, "gsm8k") == [
        "\nNatalia sold 48/2 = 24 clips in May.",
        "\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72\n",
    ]
    assert vine.split_steps(text, "gsm8k") == [37, len(text)]
    assert split(text, "arithmetic") == split(text, "gsm8k")
    assert vine.split_steps("\nA.\nB.\n#### 72\n", "gsm8k") == [3, 15]  # the docstring's example


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [""]),  # empty response: one empty step
        ("\nA.\nB.", ["\nA.", "\nB."]),  # no answer: one step per line
        ("\n\n\nA.\nB.\n#### 1", ["\n\n\nA.", "\nB.\n#### 1"]),  # leading blank lines join the first line
        ("\nA.\n\nB.\n#### 1\n", ["\nA.", "\n", "\nB.\n#### 1\n"]),  # a blank line in the middle is a step
        ("\nA.\nB.\n\n\n#### 1\n", ["\nA.", "\nB.\n\n\n#### 1\n"]),  # trailing blank lines join the answer step
        ("\n#### 1\n", ["\n#### 1\n"]),  # answer only
        ("\nA.\n#### 1\nB.\n#### 2\n", ["\nA.\n#### 1\nB.\n#### 2\n"]),  # split once, at the first answer
        ("\n \n\n", ["\n \n\n"]),  # only blank lines: one step, no empty steps
        ("A.\n  \nB.", ["A.", "\n  ", "\nB."]),
    ],
)
def test_gsm8k_cases(text, expected):
    assert split(text, "gsm8k") == expected


def test_gsm8k_gold_solutions(data_dir):
    """Every GSM8K solution: steps are its lines, the "#### answer" line merged into the last one."""
    splits = ("train", "validation", "test")
    solutions = [p["solution"] for s in splits for p in reward.load_problems("gsm8k", s, data_dir)]
    assert len(solutions) == 8792
    for solution in solutions:
        steps = split(solution, "gsm8k")
        body, _, answer = solution.partition("\n#### ")
        lines = body.strip("\n").split("\n")
        assert "".join(steps) == solution
        assert len(steps) == len(lines), solution
        assert steps[-1] == "\n" + lines[-1] + "\n#### " + answer
        assert all(step.startswith("\n") for step in steps)
    for problem in reward.load_problems("arithmetic", "test"):  # the same answer format
        assert len(split(problem["solution"], "arithmetic")) == problem["solution"].count("\n") - 2


MATH_ATOMS = ["$", "$$", "\\(", "\\)", "\\[", "\\]", "\\begin{align}", "\\end{align}", "[asy]", "[/asy]", ".", ". ",
              "\n", " ", "The", " and ", " to ", ",", ":", "=", "+", "\\equiv", "x", "e.g.", "Dr.", "3.5", "€",
              "abcdefghijklmnopqrstuvwxyz", "#### 7", "\n#### "]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(MATH_ATOMS), max_size=60), st.sampled_from(["gsm8k", "math"]))
def test_steps_concatenate_back(atoms, dataset):
    text = "".join(atoms)
    ends = vine.split_steps(text, dataset)
    assert ends[-1] == len(text) and ends == sorted(ends)
    steps = pieces(text, ends)
    assert "".join(steps) == text
    assert all(steps) or steps == [""]


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200), st.sampled_from(["gsm8k", "math"]))
def test_steps_concatenate_back_any_text(text, dataset):
    steps = split(text, dataset)
    assert "".join(steps) == text
    assert all(steps) or steps == [""]


# ---------------------------------------------------------------------------------------------------------------------
# Steps in token space (docs/paper.md §1.3, §2.3)


def test_token_steps_first_character_rule(tokenizer):
    text = NATALIA
    ids = tokenizer.encode(text, add_special_tokens=False)
    tokens = [tokenizer.decode([i]) for i in ids]
    assert "May.\n" in tokens  # one token spans the step boundary "." | "\n"
    spanning = tokens.index("May.\n")
    steps = vine.token_steps(ids, vine.split_steps(text, "gsm8k"), tokenizer)
    assert steps == [0] * (spanning + 1) + [1] * (len(ids) - spanning - 1)  # "May.\n" starts in step 0


def test_token_steps_non_ascii(tokenizer):
    """"€" is three byte tokens; a prefix ending inside it decodes to U+FFFD. Its bytes all belong to the step of
    "€", and a step that owns no token (the "\\n" inside the ".\\n" token) is skipped."""
    ids = tokenizer.encode("€\nb", add_special_tokens=False)
    assert len(ids) == 5 and tokenizer.decode(ids[:2]).endswith("\ufffd")
    assert vine.token_steps(ids, vine.split_steps("€\nb", "gsm8k"), tokenizer) == [0, 0, 0, 1, 1]
    ids = tokenizer.encode("a€b.\n\nX", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids][-3:] == [".\n", "\n", "X"]
    assert vine.split_steps("a€b.\n\nX", "gsm8k") == [4, 5, 7]  # "a€b." | "\n" | "\nX"
    assert vine.token_steps(ids, [4, 5, 7], tokenizer) == [0, 0, 0, 0, 0, 0, 2, 2]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(MATH_ATOMS + ["Natalia sold ", "May.\n", "72"]), max_size=30))
def test_token_steps_match_linear_scan(atoms):
    """The binary search equals a scan of every token: token j starts where decode(ids[:j]) stops agreeing with the
    whole text (U+FFFD inside a character), and belongs to the step whose span holds that offset."""
    ids = TOKENIZER.encode("".join(atoms), add_special_tokens=False)
    text = TOKENIZER.decode(ids)
    ends = vine.split_steps(text, "math")
    expected = []
    for j in range(len(ids)):
        start = len(os.path.commonprefix([TOKENIZER.decode(ids[:j]), text]))
        expected.append(min(k for k, end in enumerate(ends) if start < end or k == len(ends) - 1))
    assert vine.token_steps(ids, ends, TOKENIZER) == expected


# ---------------------------------------------------------------------------------------------------------------------
# Advantages (docs/paper.md §1.3)


def test_step_advantages_by_hand():
    assert vine.step_advantages([0.25], 1.0, 1) == [0.75]  # one step: A = R - V(s_0)
    assert vine.step_advantages([0.25, 0.5, 0.75], 1.0, 3) == [0.25, 0.25, 0.25]  # inner steps: V(s_{i+1}) - V(s_i)
    assert vine.step_advantages([0.5, 0.25], 0.0, 2) == [-0.25, -0.25]  # unfinished or wrong: R = 0, V(terminal) = 0
    assert vine.step_advantages([0.5, 0.75], 0.0, 2)[-1] == -0.75  # the last step: 0 + V(terminal) - V(s_1)
    # a trailing step that owns no token (so no state) changes nothing: it gets A = 0, the others are unchanged
    assert vine.step_advantages([0.25, 0.5], 1.0, 3) == vine.step_advantages([0.25, 0.5], 1.0, 2) + [0.0]


def test_step_advantages_cap():
    """With the 25-step cap, V(s_0..s_25) are estimated; the last valued state gets R - V(s_25), later steps 0."""
    values = [k / 100 for k in range(26)]
    advantages = vine.step_advantages(values, 1.0, 30)
    assert len(advantages) == 30
    assert advantages[:25] == pytest.approx([0.01] * 25)
    assert advantages[25] == pytest.approx(1.0 - 0.25)
    assert advantages[26:] == [0.0] * 4
    assert sum(advantages) == pytest.approx(1.0 - values[0])  # telescoping: sum_i A_i = R - V(s_0)
    with pytest.raises(AssertionError):
        vine.step_advantages([0.5] * 4, 1.0, 3)


def test_full_values_fill_the_states_past_the_cap_with_the_reward_and_end_at_0():
    assert vine.full_values([0.25, 0.5], 1.0, 4) == [0.25, 0.5, 1.0, 1.0, 0.0]  # s_2, s_3 not valued: R; s_4 terminal
    assert vine.full_values([0.25, 0.5], 0.0, 2) == [0.25, 0.5, 0.0]


def test_token_advantages():
    assert vine.token_advantages([0.5, -0.25], [0, 0, 1, 1, 1]) == [0.5, 0.5, -0.25, -0.25, -0.25]


# ---------------------------------------------------------------------------------------------------------------------
# Monte Carlo values (docs/paper.md §1.2)


def context_free_model(tokenizer, logits: dict[str, float]):
    """A llama whose next-token distribution ignores the context: attention and MLP outputs are zeroed and every
    token embeds to the same vector, so every position has one hidden state; lm_head then gives `logits` to the
    named tokens and -30 to all others (negligible)."""
    model = make_model("llama", len(tokenizer), seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = -30.0
        for token, logit in logits.items():
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token), 0] = logit
    return model


def next_token_probs(model, temperature: float, top_p: float) -> torch.Tensor:
    """The toy model's sampling distribution: softmax(logits / T), then nucleus: keep a token iff the mass of the
    tokens ranked above it is < top_p, renormalise (vLLM's rule)."""
    logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1].float()  # (V,) the same after any context
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order] = (sorted_probs.cumsum(0) - sorted_probs) < top_p
    return torch.where(keep, probs, 0.0) / probs[keep].sum()


def toy_answer(tokenizer):
    """Prompt "Q:" and the answer "\\n#### " | "7" | "\\n" (3 steps, token_steps set by hand)."""
    parts = [tokenizer.encode(s, add_special_tokens=False) for s in ("\n#### ", "7", "\n")]
    steps = [k for k, part in enumerate(parts) for _ in part]
    return tokenizer.encode("Q:", add_special_tokens=False), sum(parts, []), steps


SAMPLING = dict(max_length=None, eos_token_id=2, stop_strings=reward.STOP_STRINGS)


def sampling(**settings) -> rollout.Sampling:
    """The answers' sampling settings that estimate_values hands to rollout.sample: SAMPLING and these."""
    return rollout.Sampling(**{**SAMPLING, **settings})


def test_mc_values_unbiased(tokenizer):
    """Tokens "7", "8", EOS only. From "...#### " the whole solution is right iff the continuation is "7" EOS, so
    V = p7 * p_eos; from "...#### 7" it is p_eos; from the bare prompt no "####" can appear, V = 0. T = 0.6 and
    top_p = 0.8 (which drops "8") are applied as in the answers' sampler."""
    logits = {"7": 0.6 * math.log(0.5), "8": 0.6 * math.log(0.1), "<eos>": 0.6 * math.log(0.4)}  # p at T = 0.6
    model = context_free_model(tokenizer, logits)
    probs = next_token_probs(model, temperature=0.6, top_p=0.8)
    p7, p_eos = probs[tokenizer.convert_tokens_to_ids("7")].item(), probs[2].item()
    assert p7 == pytest.approx(5 / 9, abs=1e-4) and p_eos == pytest.approx(4 / 9, abs=1e-4)
    prompt, response, steps = toy_answer(tokenizer)
    K = 3000
    values, stats = vine.estimate_values(
        model, tokenizer, [prompt], [response], [steps], ["7"], "gsm8k", num_mc_rollouts=K, max_value_steps=None,
        sampling=sampling(max_new_tokens=3, temperature=0.6, top_p=0.8), generator=torch.Generator().manual_seed(0),
    )
    assert len(values[0]) == 3 and stats["vine/states_unique"] == 3 and stats["vine/mc_rollouts"] == 3 * K
    assert values[0][0] == 0.0
    for estimate, truth in ((values[0][1], p7 * p_eos), (values[0][2], p_eos)):
        assert abs(estimate - truth) < 3 * math.sqrt(truth * (1 - truth) / K), (estimate, truth)


def test_mc_unfinished_continuations_score_zero(tokenizer):
    """With max_new_tokens = 1, "7" from "...#### " hits the length limit: unfinished, so 0 (it would grade right)."""
    model = context_free_model(tokenizer, {"7": 0.0, "<eos>": 0.0})
    prompt, response, steps = toy_answer(tokenizer)
    values, _ = vine.estimate_values(
        model, tokenizer, [prompt], [response], [steps], ["7"], "gsm8k", num_mc_rollouts=200, max_value_steps=None,
        sampling=sampling(max_new_tokens=1, temperature=1.0, top_p=1.0), generator=torch.Generator().manual_seed(0),
    )
    assert values[0][1] == 0.0
    assert 0.35 < values[0][2] < 0.65  # "...#### 7" + EOS at once: finished and right, p = 1/2
    values, _ = vine.estimate_values(  # the cap: only s_0 and s_1 are valued
        model, tokenizer, [prompt], [response], [steps], ["7"], "gsm8k", num_mc_rollouts=2, max_value_steps=1,
        sampling=sampling(max_new_tokens=1, temperature=1.0, top_p=1.0), generator=torch.Generator().manual_seed(0),
    )
    assert len(values[0]) == 2


def test_mc_dedup(tokenizer, monkeypatch):
    """4 answers of one prompt: the bare prompt is valued once; two identical answers share all their states; one
    rollout.sample call gets the unique states."""
    calls = []
    real_sample = rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda m, states, **kw: calls.append(states) or real_sample(m, states, **kw))
    model = make_model("llama", len(tokenizer), seed=1)
    prompt = tokenizer.encode("[MATH_TASK] Problem:\nHow many?\n\nSolution:", add_special_tokens=False)
    texts = ["\nA is 1.\nB is 2.\nC is 3.\n#### 6\n"] * 2 + ["\nA is 1.\nB is 5.\nC is 3.\n#### 9\n", "\nD.\n#### 4\n"]
    responses = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    steps = [vine.token_steps(r, vine.split_steps(t, "gsm8k"), tokenizer) for r, t in zip(responses, texts)]
    values, stats = vine.estimate_values(
        model, tokenizer, [prompt] * 4, responses, steps, ["6"] * 4, "gsm8k", num_mc_rollouts=3, max_value_steps=25,
        sampling=sampling(max_new_tokens=4, temperature=1.0, top_p=1.0), generator=torch.Generator().manual_seed(0),
    )
    # answers 1-3 have 3 steps (states s_0, s_1, s_2), answer 4 has 1 (s_0 only): 3 + 3 + 3 + 1 = 10 states;
    # unique: the prompt, "\nA is 1.", "\nA is 1.\nB is 2.", "\nA is 1.\nB is 5." = 4
    assert [len(v) for v in values] == [3, 3, 3, 1]
    assert stats["vine/states_total"] == 10 and stats["vine/states_unique"] == 4 and stats["vine/mc_rollouts"] == 12
    assert stats["vine/mean_steps"] == pytest.approx(10 / 4)
    assert len(calls) == 1 and len(calls[0]) == 4 and len(set(map(tuple, calls[0]))) == 4
    assert values[0] == values[1] and len({v[0] for v in values}) == 1 and values[0][1] == values[2][1]


def test_mc_greedy_matches_slow_path(tokenizer):
    """Under greedy decoding, the batched, deduplicated estimate equals valuing each state alone: rollout.sample on
    that one prefix, decode the answer's prefix + continuation, grade (0 if unfinished). One gold answer is read off
    the slow path, so that a finished-and-right (1), a finished-and-wrong and an unfinished (0) state all occur."""
    model = make_model("qwen2", len(tokenizer), seed=3)
    prompts = [tokenizer.encode(reward.format_prompt(q, "gsm8k"), add_special_tokens=False) for q in ("A?", "B!")]
    texts = ["#### 3\nNatalia sold 48/2 = 24 clips in May.\n#### 72\n", "#### 5\nWe have $x+2=5$, so $x=3$.\n#### 7\n"]
    responses = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    steps = [vine.token_steps(r, vine.split_steps(t, "gsm8k"), tokenizer) for r, t in zip(responses, texts)]
    greedy = dict(max_new_tokens=12, max_length=None, temperature=0.0, top_p=1.0, eos_token_id=2, stop_strings=())
    slow = []  # (text, finished) of states s_0 .. s_{n-1} of each answer, one prefix per rollout.sample call
    for prompt, response, step in zip(prompts, responses, steps):
        slow.append([])
        for k in range(max(step) + 1):
            prefix = response[: step.index(k)]  # t_k = the first token of step k (t_0 = 0)
            out = rollout.sample(model, [prompt + prefix], num_samples=1, tokenizer=tokenizer, **greedy)
            slow[-1].append((tokenizer.decode(prefix + out.response_ids[0]), out.finished[0]))
    golds = ["72", reward.extract_answer(slow[1][1][0], "gsm8k")]
    slow_values = [[reward.grade(text, g, "gsm8k") if done else 0.0 for text, done in s] for s, g in zip(slow, golds)]
    values, _ = vine.estimate_values(
        model, tokenizer, prompts, responses, steps, golds, "gsm8k", num_mc_rollouts=2, max_value_steps=None,
        sampling=rollout.Sampling(**greedy),
    )
    assert values == slow_values
    assert not all(done for s in slow for _, done in s) and sorted(set(sum(values, []))) == [0.0, 1.0]


def test_value_diagnostic_reference_converges_to_the_true_values(tokenizer):
    """The unbiasedness toy of test_mc_values_unbiased: V(s_0) = 0, V(s_1) = p7 * p_eos, V(s_2) = p_eos. The reference
    (2000 rollouts) is within 3 sigma of them; the critic's values are critic_values of each state's token ids."""
    logits = {"7": 0.6 * math.log(0.5), "8": 0.6 * math.log(0.1), "<eos>": 0.6 * math.log(0.4)}
    model = context_free_model(tokenizer, logits)
    probs = next_token_probs(model, temperature=0.6, top_p=0.8)
    p7, p_eos = probs[tokenizer.convert_tokens_to_ids("7")].item(), probs[2].item()
    prompt, response, steps = toy_answer(tokenizer)
    seen = []

    def critic_values(states: list[list[int]]) -> list[float]:  # a stand-in critic: V(s) = 1 / len(s)
        seen.extend(states)
        return [1 / len(s) for s in states]

    stats, values = vine.value_diagnostic(
        model, tokenizer, [prompt], [response], [steps], ["7"], "gsm8k", num_mc_rollouts=3, reference_rollouts=2000,
        max_value_steps=None, sampling=sampling(temperature=0.6, top_p=0.8, max_new_tokens=3, max_batch_tokens=1 << 20),
        generator=torch.Generator().manual_seed(0), critic_values=critic_values,
    )
    truth = [0.0, p7 * p_eos, p_eos]
    for estimate, v in zip(values["reference"][0], truth):
        assert abs(estimate - v) <= 3 * math.sqrt(v * (1 - v) / 2000), (values["reference"], truth)
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in values["mc"][0])  # K = 3 rollouts per state
    ends = [len(prompt) + sum(s < k for s in steps) for k in range(3)]  # s_k: the prompt and the tokens of steps < k
    assert seen == [(prompt + response)[:end] for end in ends], "each state's token ids, once"
    assert values["critic"][0] == [1 / end for end in ends]
    mae = sum(abs(c - r) for c, r in zip(values["critic"][0], values["reference"][0])) / 3
    assert stats["diag/critic_mae"] == pytest.approx(mae) and stats["diag/states"] == 3
    mc_mae = sum(abs(m - r) for m, r in zip(values["mc"][0], values["reference"][0])) / 3
    assert stats["diag/mc_mae"] == pytest.approx(mc_mae)
    assert 0.0 <= stats["diag/mc_rank_acc"] <= 1.0 and 0.0 <= stats["diag/critic_rank_acc"] <= 1.0


def test_value_errors_by_hand():
    reference = [[0.2, 0.6, 1.0], [0.5]]
    estimate = [[0.4, 0.4, 0.9], [0.0]]
    stats = vine.value_errors(estimate, reference, prefix="x")
    assert stats["x_mae"] == pytest.approx((0.2 + 0.2 + 0.1 + 0.5) / 4)
    # pairs of answer 0: (0.2, 0.6) tie in the estimate: 1/2; (0.2, 1.0) right; (0.6, 1.0) right; answer 1 has none
    assert stats["x_rank_acc"] == pytest.approx((0.5 + 1 + 1) / 3)
