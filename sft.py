"""The starting model: the CPU demo's tiny model and tokenizer, the supervised warm-up (SFT), and the record of the
options that made it. Not part of VinePPO: the paper starts RL from released SFT checkpoints (docs/paper.md §4.1,
§4.2); this file is what lets `python train.py --dataset arithmetic` start from nothing on a CPU.

    build_tiny_tokenizer   a byte-level BPE trained on the task's own text       (train.py --model tiny)
    build_tiny_model       a ~1.1M-parameter random Llama for it
    answer_only_solution   a gold solution cut to its answer line           (--sft-answer-only)
    slipped_solution       an arithmetic solution with a multiplication written as an addition  (--sft-slip)
    sft_examples           (prompt, solution + EOS) pairs: the gold solution, or the bare answer line, or a slip
    sft                    next-token cross-entropy on those, response tokens only, cosine LR decay
    make_init              run_dir/init/: the starting model the options describe, made once (train.py calls it)
    check_init_record      refuse a run_dir/init/ that other options made (init_args.json)

train.py calls make_init from one place (load_models); it records the options that made init/, and every later run
with the same options reuses it.

Test: python -m pytest tests/test_sft.py -q

Departures from the paper (all of this file is ours):
1. The paper's SFT (docs/paper.md §4.1: 2 epochs, lr 1e-5, batch 64) made its released checkpoints; here SFT runs
   --sft-steps steps of --sft-batch-size solutions drawn with replacement, AdamW at --sft-lr with cosine decay.
2. --sft-answer-only, --sft-slip and --sft-slip-each mix imperfect solutions into SFT on purpose, so that RL has
   something to learn on a CPU (the demo: docs/demo.md; the head-to-head: docs/head_to_head.md).

Letters: B sequences, T tokens.
"""

import contextlib
import json
import math
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import checkpoint
import ppo
import reward


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 384, split_digits: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (<pad>, <bos>, <eos> are ids 0, 1, 2). With split_digits every
    digit is its own token, which helps a tiny model add."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    digits = pre_tokenizers.Digits(individual_digits=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level]) if split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def build_tiny_model(tokenizer, *, hidden_size: int = 128, num_layers: int = 4, max_length: int = 512):
    """A small random Llama-style causal LM: about 1.1M parameters with a 384-token vocabulary. Its weights come from
    torch's global random stream (train.py seeds it with --seed)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config)


def answer_only_solution(answer: str, dataset: str) -> str:
    """An SFT response with the working left out: only the final answer line, in the data set's answer format.

    train.py --sft-answer-only mixes these into the supervised warm-up: a model that imitates both kinds of
    solution sometimes answers without working, and RL has to learn that writing the steps pays (the CPU demo).
    """
    reward.check_dataset(dataset)
    return f"\n$\\boxed{{{answer}}}$\n" if dataset == "math" else f"\n#### {answer}\n"


def slipped_solution(solution: str, each: float | None = None, rng: random.Random | None = None) -> str:
    """An arithmetic solution whose first multiplication is written as an addition of the same number and carried
    through: "\n...\n14 * 2 = 28\n28 - 3 = 25\n#### 25\n" becomes "...\n14 + 2 = 16\n16 - 3 = 13\n#### 13\n".
    With `each`, every multiplication slips instead with that probability, independently (one rng.random() each).
    train.py --sft-slip (--sft-slip-each) mixes these into SFT: a systematic slip in one kind of step, for RL to
    unlearn while the steps around it stay right (docs/head_to_head.md, docs/credit_curve.md).
    """
    lines, value, slipped = solution.split("\n"), None, False
    for i, line in enumerate(lines):
        match = reward.ARITHMETIC_LINE_RE.fullmatch(line)
        if match:
            left = int(match[1]) if value is None else value  # the first line starts from the question's number
            op, n = match[2], int(match[3])
            if op == "*" and (rng.random() < each if each is not None else not slipped):
                op, slipped = "+", True
            value = left + n if op == "+" else left - n if op == "-" else left * n
            lines[i] = f"{left} {op} {n} = {value}"
        elif line.startswith("#### ") and slipped:
            lines[i] = f"#### {value}"
    return "\n".join(lines)


def sft_examples(
    tokenizer, problems: list, dataset: str, *, answer_only: float, slip: float, slip_each: float, rng: random.Random
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per problem (reward.Problem: .prompt_ids, .solution, .answer): the gold
    solution, or with probability answer_only the bare answer line (answer_only_solution), so that the model
    learns to answer both with and without working and RL has to learn which pays (the CPU demo); or, with
    probability slip, the solution with its first multiplication slipped into an addition (slipped_solution),
    a mistake in one kind of step for RL to unlearn (the head-to-head); or, with slip_each, each multiplication
    slipped with that chance. An option at 0 draws nothing from rng."""
    examples = []
    for p in problems:
        solution = p.solution
        if answer_only and rng.random() < answer_only:  # no draw at 0: the same run as without
            solution = answer_only_solution(p.answer, dataset)
        elif slip and rng.random() < slip:
            solution = slipped_solution(solution)
        elif slip_each:
            solution = slipped_solution(solution, slip_each, rng)
        response_ids = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((p.prompt_ids, response_ids))
    return examples


def sft(
    model, tokenizer, examples: list[tuple[list[int], list[int]]], *, steps: int, lr: float, batch_size: int,
    max_grad_norm: float, device: str, rng: random.Random, autocast=contextlib.nullcontext,
) -> None:
    """Next-token cross-entropy on prompt + response + EOS, the loss on the response tokens only (ppo.make_batch's
    mask), batch_size examples drawn from rng per step, AdamW with a cosine decay of lr to 0 over steps, the gradient
    norm clipped to max_grad_norm. autocast: makes the context of the forward pass (train.py: bf16 autocast with
    --bf16)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in (bar := tqdm(range(steps), desc="sft", dynamic_ncols=True)):
        chunk = rng.sample(examples, min(batch_size, len(examples)))
        episodes = [ppo.Episode(p, r, finished=True, reward=0.0, advantages=[0.0] * len(r)) for p, r in chunk]
        batch = ppo.make_batch(episodes, tokenizer.pad_token_id, device)
        with autocast():
            logprobs = ppo.token_logprobs(model, batch["input_ids"], batch["attention_mask"], 1.0)  # (B, T-1)
        loss = -ppo.masked_mean(logprobs, batch["mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def make_init(
    folder: str, record: dict, *, rows: list[dict], device: str, check_fit, main: bool = True,
    autocast=contextlib.nullcontext,
) -> None:
    """A run's init/ (folder), unless it is there already: the starting model that record, the options that make it
    (train.py INIT_OPTIONS: model, dataset, seed, max_length, sft_*), describes. The tiny model and tokenizer
    (record["model"] "tiny") or record["model"] loaded, then record["sft_steps"] steps of SFT on the rows' gold
    solutions (reward.load_problems' train split), saved with the record. Refused when a folder there was made with
    other options (check_init_record, on every rank); made by the main rank only. check_fit(problems) stops the run
    before SFT when too few prompts fit (SFT can take hours)."""
    check_init_record(folder, record)
    if not main or os.path.exists(os.path.join(folder, "config.json")):
        return
    if record["model"] == "tiny":
        tokenizer = build_tiny_tokenizer([p["question"] + p["solution"] for p in rows[:20000]])
        model = build_tiny_model(tokenizer, max_length=record["max_length"]).to(device)
    else:
        model, tokenizer = checkpoint.load_model(record["model"], device)
    problems = reward.to_problems(rows, tokenizer, record["dataset"])
    check_fit(problems)  # nothing is written yet
    if record["sft_steps"]:
        rng = random.Random(record["seed"])
        examples = sft_examples(tokenizer, problems, record["dataset"], answer_only=record["sft_answer_only"],
                                slip=record["sft_slip"], slip_each=record["sft_slip_each"], rng=rng)
        sft(model, tokenizer, examples, steps=record["sft_steps"], lr=record["sft_lr"],
            batch_size=record["sft_batch_size"], max_grad_norm=record["max_grad_norm"], device=device, rng=rng,
            autocast=autocast)
    save_init(folder, model, tokenizer, record)


def check_init_record(folder: str, made_with: dict) -> None:
    """Refuse to reuse folder (a run's init/) if its init_args.json records other values of the options that made
    it: a stale init/ must not pass for the one these options would make."""
    record = os.path.join(folder, "init_args.json")
    if not os.path.exists(record):
        if os.path.exists(folder):  # not made by train.py (which writes the record with the model): copied in
            raise SystemExit(
                f"error: {folder} holds no init_args.json, the options that made it, so it cannot be told from one "
                f"that other options made; delete it to make it again, or pass it as --model {folder} --sft-steps 0"
            )
        return
    try:
        with open(record) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise checkpoint.damaged(folder, e) from None
    changed = [k for k, v in made_with.items() if k in saved and saved[k] != v]
    if changed:
        raise SystemExit(
            f"error: {folder} was made with other options ({', '.join(f'{k} {saved[k]}' for k in changed)}); "
            f"delete {folder} to make it again, or choose another --run-dir"
        )


def save_init(folder: str, model, tokenizer, made_with: dict) -> None:
    """The starting model and tokenizer to folder (atomically, checkpoint.save_folder) with init_args.json, the
    options that made it (check_init_record reads it)."""
    checkpoint.save_folder(folder, model, tokenizer, {"init_args.json": made_with})
