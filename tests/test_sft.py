"""Tests for sft.py, the starting model: the tiny tokenizer and model, the SFT examples (answer-only, slipped, seeded),
the SFT loop (it learns the solutions it is shown), and the init/ options record."""

import json
import math
import random

import pytest
import torch

import ppo
import reward
import sft

PROBLEMS = reward.load_problems("arithmetic", "validation")  # 500 problems
TOKENIZER = sft.build_tiny_tokenizer([p["question"] + p["solution"] for p in PROBLEMS])


def examples(fraction: float = 0.0, slip: float = 0.0, rng: random.Random | None = None, problems=None):
    problems = reward.to_problems(problems or PROBLEMS, TOKENIZER, "arithmetic")
    return sft.sft_examples(TOKENIZER, problems, "arithmetic", answer_only=fraction, slip=slip, slip_each=0.0,
                            rng=rng or random.Random(0))


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"] + [TOKENIZER.eos_token_id]


def test_the_tiny_tokenizer_and_model():
    assert (TOKENIZER.pad_token_id, TOKENIZER.bos_token_id, TOKENIZER.eos_token_id) == (0, 1, 2)
    assert TOKENIZER.tokenize("123") == ["1", "2", "3"], "every digit is its own token"
    text = PROBLEMS[0]["question"] + PROBLEMS[0]["solution"]
    assert TOKENIZER.decode(TOKENIZER(text, add_special_tokens=False)["input_ids"]) == text
    model = sft.build_tiny_model(TOKENIZER, max_length=160)
    assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.3e6  # "about 1.1M parameters"
    assert model.config.max_position_embeddings == 160 and model.config.vocab_size == len(TOKENIZER)


def test_answer_only_cuts_a_seeded_fraction_of_solutions_to_the_answer_line():
    gold = [ids(p["solution"]) for p in PROBLEMS]
    bare = [ids(sft.answer_only_solution(p["answer"], "arithmetic")) for p in PROBLEMS]
    prompts = [p.prompt_ids for p in reward.to_problems(PROBLEMS, TOKENIZER, "arithmetic")]
    rng = random.Random(0)
    assert examples(0.0, rng=rng) == list(zip(prompts, gold))
    assert rng.random() == random.Random(0).random()  # fraction 0 draws nothing: the run is as without the option
    assert examples(1.0) == list(zip(prompts, bare))
    half = examples(0.5)
    assert half == examples(0.5)  # seeded
    assert [p for p, _ in half] == prompts
    assert all(r == g or r == b for (_, r), g, b in zip(half, gold, bare))
    num_bare = sum(r == b for (_, r), b in zip(half, bare))
    assert abs(num_bare - 250) < 4 * math.sqrt(500 * 0.25), num_bare  # Binomial(500, 0.5): within 4 sigma


def test_slip_slips_a_seeded_fraction_of_the_solutions_with_a_multiplication():
    texts = [TOKENIZER.decode(r[:-1]) for _, r in examples(slip=0.5)]
    slipped = [t != p["solution"] for t, p in zip(texts, PROBLEMS)]
    with_mult = [" * " in p["solution"] for p in PROBLEMS]
    assert all(t in (p["solution"], sft.slipped_solution(p["solution"])) for t, p in zip(texts, PROBLEMS))
    assert not any(s and not m for s, m in zip(slipped, with_mult)), "only solutions with a multiplication change"
    n, k = sum(with_mult), sum(slipped)
    assert abs(k - n / 2) < 4 * math.sqrt(n / 4), (k, n)


def test_sft_learns_the_solutions_it_is_shown():
    """40 steps on 8 solutions: their mean response logprob per token rises from the random model's (about -6, near
    log(1/384)) by more than 2.5 nats (measured: -5.9 to -2.2), and the loop leaves the model in eval mode."""
    torch.manual_seed(0)
    model = sft.build_tiny_model(TOKENIZER, max_length=160)
    chosen = examples(problems=PROBLEMS[:8])

    def mean_logprob() -> float:
        episodes = [ppo.Episode(p, r, True, 0.0, [0.0] * len(r)) for p, r in chosen]
        batch = ppo.make_batch(episodes, TOKENIZER.pad_token_id, "cpu")
        with torch.no_grad():
            logprobs = ppo.token_logprobs(model, batch["input_ids"], batch["attention_mask"], 1.0)
        return float(ppo.masked_mean(logprobs, batch["mask"]))

    before = mean_logprob()
    sft.sft(model, TOKENIZER, chosen, steps=40, lr=1e-2, batch_size=8, max_grad_norm=1.0, device="cpu",
            rng=random.Random(0))
    assert before < -5.0 and mean_logprob() > before + 2.5, (before, mean_logprob())
    assert not model.training


def test_an_init_folder_made_with_other_options_is_refused(tmp_path):
    (tmp_path / "init_args.json").write_text(json.dumps({"sft_steps": 2, "seed": 1}))
    sft.check_init_record(str(tmp_path), {"sft_steps": 2, "seed": 1, "new_option": 3})  # same (and newer)
    with pytest.raises(SystemExit, match="made with other options \\(sft_steps 2\\); delete"):
        sft.check_init_record(str(tmp_path), {"sft_steps": 3, "seed": 1})
    (tmp_path / "init_args.json").unlink()
    with pytest.raises(SystemExit, match="holds no init_args.json"):
        sft.check_init_record(str(tmp_path), {"sft_steps": 2})
    sft.check_init_record(str(tmp_path / "missing"), {"sft_steps": 2})  # nothing there yet: it will be made


def test_slipped_solution_writes_the_first_multiplication_as_an_addition_and_carries_it():
    solution = "\nTom has 12 apples.\n12 + 7 = 19\n19 * 2 = 38\n38 - 5 = 33\n33 * 3 = 99\n#### 99\n"
    slipped = "\nTom has 12 apples.\n12 + 7 = 19\n19 + 2 = 21\n21 - 5 = 16\n16 * 3 = 48\n#### 48\n"
    assert sft.slipped_solution(solution) == slipped
    assert reward.grade(slipped, "99", "arithmetic") == 0.0
    plain = "\nAnn has 3 pens.\n3 + 4 = 7\n7 - 1 = 6\n#### 6\n"
    assert sft.slipped_solution(plain) == plain  # nothing to slip
    carried = sft.slipped_solution("\nA.\n2 * 3 = 6\n6 - 6 = 0\n#### 0\n")  # may go below zero
    assert carried == "\nA.\n2 + 3 = 5\n5 - 6 = -1\n#### -1\n"
    for p in reward.load_problems("arithmetic", "validation"):  # every slip changes the answer of its problem
        s = sft.slipped_solution(p["solution"])
        assert (s == p["solution"]) == (" * " not in p["solution"])
        assert reward.grade(s, p["answer"], "arithmetic") == float(s == p["solution"]) or "* 2 = 4\n" in p["solution"]
