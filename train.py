"""VinePPO training: the only script. Reads top to bottom as one iteration of the paper's loop.

    python train.py --dataset arithmetic                  # the CPU demo: a tiny model, SFT then VinePPO, ~12 minutes
    python train.py --dataset gsm8k                       # the paper's GSM8K + RhoMath-1.1B recipe (one GPU)
    python train.py --help                                # every option, with its default
    torchrun --nproc_per_node 4 train.py --dataset gsm8k  # the same loop, data-parallel over 4 GPUs

One iteration (PAPER_NOTES.md §1.1, §8; DESIGN.md "one-way flow of data"), one function per phase:
    sample_problems -> sample_and_grade (rollout.sample, reward.grade) -> make_episodes -> vine_advantages
    (vine.split_steps, vine.estimate_values, vine.step_advantages) -> ppo_update (ppo.ppo_loss) -> write_log
    -> evaluate, keep_best -> save_checkpoint. main() at the bottom strings them together.

--advantage swaps vine_advantages for a baseline's and changes nothing else (DESIGN.md "Advantage estimators"):
critic_advantages (the paper's PPO: ppo.ValueModel, ppo.gae, and ppo.value_loss in the same minibatches) or
outcome_advantages (GRPO, RLOO: ppo.group_advantages). --value-diagnostic measures the value estimates against many
MC rollouts (paper §5.3). --rl-seed separates RL's randomness from the starting model's (--seed), for comparisons.

Where this script departs from the paper's code:
1. Hugging Face `generate`-free sampling (rollout.py) in the training process instead of vLLM servers. The MC
   rollouts and the answers come from the same policy snapshot, as in the paper (pitfall 1). Under torchrun each
   rank takes a contiguous share of the prompts, as the official code does, and values the states of its own
   answers; the official code also deduplicates the MC requests of all ranks, shuffles and re-shards them for
   balance (PAPER_NOTES §1.2, §6), which we do not. The update sums the gradients in flat buckets after the
   backward passes (sum_gradients); DeepSpeed also overlaps that reduction with the backward pass.
2. The ratio guard (mean ratio > 10) judges the whole minibatch after all its micro-batches and then skips the
   optimizer step. The official code judges each device's micro-batch, multiplies its loss by 0 and still steps
   AdamW, which then moves the weights on its momentum alone. Judging the whole minibatch keeps --micro-batch-size a
   memory setting that never changes results, and a skipped step cannot move the weights. The LR schedule advances
   either way, as in the official code.
3. Every sampled answer is an episode, so an iteration always has prompts x samples of them; the paper fills or
   subsamples to exactly 512 episodes when some fail to parse.
4. `--sft-steps` (a supervised warm-up on the gold solutions) is ours: the paper starts from released SFT checkpoints.
   So is `--sft-answer-only`, which cuts a fraction of those solutions to the bare answer line (the CPU demo).
5. Mixed precision: float32 master weights with bf16 autocast on CUDA (the paper trains bf16 weights through DeepSpeed,
   which also keeps float32 master weights); float32 everywhere on CPU.
6. The arithmetic defaults (DATASET_DEFAULTS) are ours, sized for a CPU; gsm8k and math use the paper's.
7. GRPO and RLOO are not in the official code; we take only their advantages (Shao et al. 2024; Ahmadian et al.
   2024) and keep everything else of this loop (token-level whitening, PPO-clip, the k3 KL term normalised as above,
   two epochs), so that only the estimator differs. Their own papers normalise the loss per sequence, and RLOO
   uses no clipping.
8. The critic takes its AdamW step on every minibatch, also when the ratio guard skips the policy's (the official
   code computes its loss separately from the guarded actor loss); --value-diagnostic is ours (the paper's analysis
   runs offline on saved checkpoints with 256 rollouts per state).

Details that follow the official code exactly and are easy to get wrong (each has a test):
- The LR schedule is DeepSpeed 0.14.1's WarmupDecayLR as its engine drives it (lr_lambda): log(i + 1) / log(W), and
  optimizer step s runs at the schedule's value for s - 1, the first step at the peak rate.
- An answer or MC continuation may have max_length - 1 - (prefix length) tokens, so that prefix + tokens + EOS fit
  in max_length (the official 2047 for 2048).
- A GSM8K answer with no final answer ("####") is unfinished: reward 0 and no EOS (reward.counts_as_finished).
- Validation Pass@1 is measured at every evaluation and the best policy kept in run_dir/best/ (PAPER_NOTES §4.5).
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

try:
    import fcntl  # the run-folder lock (Linux, macOS); without it (Windows) runs are not locked
except ImportError:
    fcntl = None
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, LlamaConfig, PreTrainedTokenizerFast

import ppo
import reward
import rollout
import vine

ADVANTAGES = ("vine", "critic", "grpo", "rloo")  # --advantage: the four estimators (DESIGN.md)

# Per-dataset defaults of the options whose default is None in Args: the paper's GSM8K and MATH recipes with
# RhoMath-1.1B (PAPER_NOTES.md §3, §9) and, for arithmetic, the README's CPU demo (about 12 minutes on 2 cores).
# This table is the one place they live; an option given on the command line overrides it.
# fmt: off
DATASET_DEFAULTS = {
    #                    gsm8k                            math                            arithmetic (CPU demo)
    "model":            ("realtreetune/rho-1b-sft-GSM8K", "realtreetune/rho-1b-sft-MATH", "tiny"),
    "num_iterations":   (650,                             1000,                           10),
    "num_mc_rollouts":  (9,                               9,                              3),
    "max_value_steps":  (25,                              0,                              25),
    "max_new_tokens":   (1024,                            1024,                           64),
    "max_length":       (2048,                            2048,                           160),
    "lr":               (1e-6,                            1e-6,                           3e-5),
    "micro_batch_size": (8,                               8,                              64),
    "sft_steps":        (0,                               0,                              2600),
    "sft_batch_size":   (64,                              64,                             32),
    "sft_lr":           (1e-3,                            1e-3,                           2e-3),
    "sft_answer_only":  (0.0,                             0.0,                            0.5),
    "eval_every":       (10,                              10,                             2),
    "eval_samples":     (16,                              16,                             4),
}
# fmt: on


def per_dataset(name: str) -> str:
    """The help text's last sentence for an option of DATASET_DEFAULTS, e.g. " Default: 650 (gsm8k), ..."."""
    values = ", ".join(f"{value} ({dataset})" for dataset, value in zip(reward.DATASETS, DATASET_DEFAULTS[name]))
    return f" Default: {values}."


@dataclass
class Args:
    # task and model
    dataset: str = field(default="gsm8k", metadata={"help": "Task: gsm8k, math or arithmetic."})
    model: str = field(
        default=None,
        metadata={
            "help": "A hub id, a local folder with a Hugging Face model and tokenizer, or 'tiny' (a ~1M-parameter "
            "Llama and tokenizer built in-process)." + per_dataset("model")
        },
    )
    data_dir: str = field(
        default=None,
        metadata={
            "help": "Folder of JSONL data (gsm8k/*.jsonl, math/*.jsonl, plain or .gz), or 'hub' to download it. "
            "Default: the copies shipped in data/."
        },
    )
    run_dir: str = field(
        default=None, metadata={"help": "Folder for checkpoints and metrics.jsonl. Default: runs/<dataset>."}
    )
    resume: bool = field(
        default=False, metadata={"help": "Continue the run saved in --run-dir exactly where it stopped."}
    )
    seed: int = field(
        default=2746318213,
        metadata={"help": "Seed of the starting model (tiny model, SFT) and of evaluation (the paper's APP_SEED)."},
    )
    rl_seed: int = field(
        default=None,
        metadata={
            "help": "Seed of RL's random choices (problems, answers, MC rollouts, minibatches, critic head), so that "
            "runs from one starting model differ only in RL noise. Default: --seed."
        },
    )
    advantage: str = field(
        default="vine",
        metadata={
            "help": "Where each token's advantage comes from; everything else is the same loop. vine: Monte Carlo "
            "values of step states (VinePPO). critic: the paper's PPO, a learned value model with GAE (lambda = 1). "
            "grpo: (R - group mean) / group std over the answers to one problem. rloo: R - mean R of the other answers "
            "to the problem.",
            "choices": ADVANTAGES,
        },
    )
    # the VinePPO iteration (PAPER_NOTES §9)
    num_iterations: int = field(default=None, metadata={"help": "RL iterations." + per_dataset("num_iterations")})
    prompts_per_iteration: int = field(default=64, metadata={"help": "Problems sampled per iteration."})
    samples_per_prompt: int = field(
        default=8, metadata={"help": "Answers sampled per problem (episodes = prompts x samples)."}
    )
    num_mc_rollouts: int = field(
        default=None,
        metadata={"help": "K: Monte Carlo continuations per state for its value." + per_dataset("num_mc_rollouts")},
    )
    max_value_steps: int = field(
        default=None,
        metadata={
            "help": "Value at most this many step states after the prompt (0: all)." + per_dataset("max_value_steps")
        },
    )
    temperature: float = field(
        default=0.6, metadata={"help": "Sampling temperature for answers, MC rollouts and trainer logprobs."}
    )
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold for answers and MC rollouts."})
    max_new_tokens: int = field(
        default=None, metadata={"help": "Most tokens in one answer or continuation." + per_dataset("max_new_tokens")}
    )
    max_length: int = field(
        default=None,
        metadata={
            "help": "Most tokens in prompt + response (+ EOS); longer answers are unfinished."
            + per_dataset("max_length")
        },
    )
    max_prompt_length: int = field(default=1512, metadata={"help": "Problems with longer prompts are dropped."})
    # PPO (PAPER_NOTES §3)
    num_epochs: int = field(default=2, metadata={"help": "PPO epochs over each iteration's episodes."})
    minibatch_size: int = field(
        default=64, metadata={"help": "Episodes per optimizer step (advantages are whitened over it)."}
    )
    micro_batch_size: int = field(
        default=None,
        metadata={
            "help": "Episodes per forward pass (gradient accumulation); memory only, results do not change."
            + per_dataset("micro_batch_size")
        },
    )
    lr: float = field(default=None, metadata={"help": "AdamW learning rate." + per_dataset("lr")})
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Fraction of optimizer steps in the log-shaped warmup."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Global gradient-norm clip."})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range epsilon."})
    value_clip: float = field(
        default=0.2, metadata={"help": "Value clip range of the critic's loss (--advantage critic)."}
    )
    kl_coef: float = field(
        default=1e-4, metadata={"help": "Beta of the k3 KL-to-reference loss term (0: no reference model)."}
    )
    # supervised warm-up (ours, for models that start from scratch)
    sft_steps: int = field(
        default=None,
        metadata={
            "help": "Supervised steps on the training split's gold solutions before RL." + per_dataset("sft_steps")
        },
    )
    sft_lr: float = field(
        default=None,
        metadata={"help": "AdamW learning rate of the supervised warm-up (cosine decay)." + per_dataset("sft_lr")},
    )
    sft_batch_size: int = field(
        default=None, metadata={"help": "Gold solutions per supervised step." + per_dataset("sft_batch_size")}
    )
    sft_answer_only: float = field(
        default=None,
        metadata={
            "help": "Fraction of supervised examples whose working is cut, leaving only the final answer line "
            "(a mixed SFT set)." + per_dataset("sft_answer_only")
        },
    )
    sft_slip: float = field(
        default=0.0,
        metadata={
            "help": "Arithmetic only: fraction of supervised solutions whose first multiplication is written as an "
            "addition ('14 * 2 = 28' as '14 + 2 = 16') and carried through, a systematic slip in one kind of step."
        },
    )
    # evaluation, logging, checkpoints
    eval_every: int = field(
        default=None,
        metadata={
            "help": "Evaluate (test and validation) every this many iterations, before the update, and after the "
            "last one; keep the policy with the best validation Pass@1 in run_dir/best (0: never)."
            + per_dataset("eval_every")
        },
    )
    eval_problems: int = field(
        default=0, metadata={"help": "Test and validation problems per evaluation (0: all, as the paper)."}
    )
    eval_samples: int = field(
        default=None,
        metadata={"help": "Samples per problem for Pass@1 (the paper: 16)." + per_dataset("eval_samples")},
    )
    eval_temperature: float = field(default=0.35, metadata={"help": "Sampling temperature of the Pass@1 evaluation."})
    value_diagnostic: int = field(
        default=0,
        metadata={
            "help": "Every iteration, compare the value estimates of this many sampled answers' step states with a "
            "reference of --diagnostic-rollouts MC rollouts each: the K-rollout MC estimate and, with --advantage "
            "critic, the critic (paper §5.3). Costs extra sampling; changes no training number (0: off)."
        },
    )
    diagnostic_rollouts: int = field(
        default=64, metadata={"help": "MC rollouts per state of the value diagnostic's reference values."}
    )
    save_every: int = field(
        default=10, metadata={"help": "Checkpoint every this many iterations (and at the end, and on Ctrl-C)."}
    )
    stop_after: int = field(
        default=0, metadata={"help": "Checkpoint and stop after this many iterations of this invocation (0: run on)."}
    )
    wandb: bool = field(default=False, metadata={"help": "Also log to Weights & Biases (needs `pip install wandb`)."})
    # hardware
    device: str = field(default=None, metadata={"help": "cuda or cpu. Default: cuda when available."})
    bf16: bool = field(
        default=True, metadata={"help": "bf16 autocast on CUDA (float32 master weights); ignored on CPU."}
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in the backward pass on CUDA."}
    )
    max_batch_tokens: int = field(
        default=rollout.DEFAULT_MAX_BATCH_TOKENS,
        metadata={
            "help": "Cap on rows x (prefix + new tokens) per sampling chunk; lower it if sampling runs short of memory."
        },
    )
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)."})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds "(default: X)" to every option whose default is not None; a None default is filled in later (per
    data set, or from the machine) and the option's own help says how."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> Args:
    """Parse the command line, fill the per-dataset defaults and check the values."""
    (args,) = HfArgumentParser(Args, formatter_class=HelpFormatter).parse_args_into_dataclasses(args=argv)
    if args.dataset not in reward.DATASETS:
        raise SystemExit(f"error: unknown dataset {args.dataset!r}; choose one of {', '.join(reward.DATASETS)}")
    column = reward.DATASETS.index(args.dataset)
    for name, values in DATASET_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[column])
    args.run_dir = args.run_dir or os.path.join("runs", args.dataset)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.rl_seed = args.seed if args.rl_seed is None else args.rl_seed
    errors = check_args(args)
    if errors:
        raise SystemExit("\n".join(f"error: {e}" for e in errors))
    return args


def check_args(a: Args) -> list[str]:
    """Every option's allowed values, checked in one place before any work: one line per bad option."""
    finite = math.isfinite
    rules = [
        (a.num_iterations >= 0, f"--num-iterations must be >= 0, got {a.num_iterations}"),
        (a.prompts_per_iteration >= 1, f"--prompts-per-iteration must be >= 1, got {a.prompts_per_iteration}"),
        (a.samples_per_prompt >= 1, f"--samples-per-prompt must be >= 1, got {a.samples_per_prompt}"),
        (a.num_mc_rollouts >= 1, f"--num-mc-rollouts must be >= 1, got {a.num_mc_rollouts}"),
        (a.max_value_steps >= 0, f"--max-value-steps must be >= 0 (0: all), got {a.max_value_steps}"),
        (a.temperature > 0 and finite(a.temperature), f"--temperature must be > 0, got {a.temperature}"),
        (0 < a.top_p <= 1, f"--top-p is a probability mass in (0, 1], got {a.top_p}"),
        (a.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {a.max_new_tokens}"),
        (a.max_prompt_length >= 1, f"--max-prompt-length must be >= 1, got {a.max_prompt_length}"),
        (a.max_length >= 3, f"--max-length must leave room for a prompt, an answer and EOS, got {a.max_length}"),
        (a.num_epochs >= 1, f"--num-epochs must be >= 1, got {a.num_epochs}"),
        (a.minibatch_size >= 1, f"--minibatch-size must be >= 1, got {a.minibatch_size}"),
        (a.micro_batch_size >= 1, f"--micro-batch-size must be >= 1, got {a.micro_batch_size}"),
        (
            a.micro_batch_size < 1 or a.minibatch_size % a.micro_batch_size == 0,
            f"--minibatch-size ({a.minibatch_size}) must be a multiple of --micro-batch-size ({a.micro_batch_size})",
        ),
        (a.lr >= 0 and finite(a.lr), f"--lr must be a finite number >= 0, got {a.lr}"),
        (0 <= a.warmup_ratio <= 1, f"--warmup-ratio is a fraction in [0, 1], got {a.warmup_ratio}"),
        (a.max_grad_norm > 0 and finite(a.max_grad_norm), f"--max-grad-norm must be > 0, got {a.max_grad_norm}"),
        (a.clip_eps > 0 and finite(a.clip_eps), f"--clip-eps must be > 0, got {a.clip_eps}"),
        (a.value_clip > 0 and finite(a.value_clip), f"--value-clip must be > 0, got {a.value_clip}"),
        (a.kl_coef >= 0 and finite(a.kl_coef), f"--kl-coef must be a finite number >= 0, got {a.kl_coef}"),
        (a.sft_steps >= 0, f"--sft-steps must be >= 0, got {a.sft_steps}"),
        (a.sft_lr > 0 and finite(a.sft_lr), f"--sft-lr must be > 0, got {a.sft_lr}"),
        (a.sft_batch_size >= 1, f"--sft-batch-size must be >= 1, got {a.sft_batch_size}"),
        (0 <= a.sft_answer_only <= 1, f"--sft-answer-only is a fraction in [0, 1], got {a.sft_answer_only}"),
        (
            0 <= a.sft_slip <= 1 and (not a.sft_slip or a.dataset == "arithmetic"),
            f"--sft-slip is a fraction in [0, 1] for --dataset arithmetic, got {a.sft_slip}",
        ),
        (
            a.advantage not in ("grpo", "rloo") or a.samples_per_prompt >= 2,
            f"--advantage {a.advantage} compares answers to one problem: needs --samples-per-prompt >= 2",
        ),
        (a.eval_every >= 0, f"--eval-every must be >= 0 (0: never), got {a.eval_every}"),
        (
            a.prompts_per_iteration % int(os.environ.get("WORLD_SIZE", "1")) == 0,
            f"--prompts-per-iteration {a.prompts_per_iteration} must divide by the number of processes "
            f"({os.environ.get('WORLD_SIZE')}): each takes an equal share of the prompts",
        ),
        (a.eval_problems >= 0, f"--eval-problems must be >= 0 (0: all), got {a.eval_problems}"),
        (a.eval_samples >= 1, f"--eval-samples must be >= 1, got {a.eval_samples}"),
        (0 <= a.eval_temperature < math.inf, f"--eval-temperature must be >= 0 (0: greedy), got {a.eval_temperature}"),
        (a.value_diagnostic >= 0, f"--value-diagnostic must be >= 0 (0: off), got {a.value_diagnostic}"),
        (a.diagnostic_rollouts >= 1, f"--diagnostic-rollouts must be >= 1, got {a.diagnostic_rollouts}"),
        (a.save_every >= 0, f"--save-every must be >= 0, got {a.save_every}"),
        (a.stop_after >= 0, f"--stop-after must be >= 0 (0: run on), got {a.stop_after}"),
        (a.max_batch_tokens >= 1, f"--max-batch-tokens must be >= 1, got {a.max_batch_tokens}"),
        (a.threads >= 0, f"--threads must be >= 0 (0: torch's default), got {a.threads}"),
        (a.device in ("cpu",) or a.device.startswith("cuda"), f"--device is cuda, cuda:N or cpu, got {a.device!r}"),
    ]
    return [message for ok, message in rules if not ok]


# ---------------------------------------------------------------------------------------------------------------------
# Models: a hub id or local folder, or a tiny Llama built in-process


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 384, split_digits: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (<pad>, <bos>, <eos> are ids 0, 1, 2). With split_digits every
    digit is its own token, which helps a tiny model add."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    """A small random Llama-style causal LM: about 1.1M parameters with a 384-token vocabulary."""
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


def load_model(path: str, device: str):
    """Load a causal LM and its tokenizer from a hub id or a local folder, with an error a user can act on."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"error: could not load the model {path!r} ({type(e).__name__}: {str(e).splitlines()[0]}).\n"
            "Pass --model a local folder holding a Hugging Face model and tokenizer (config.json, *.safetensors, "
            "tokenizer files), or --model tiny; the hub may be unreachable from this machine."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(model)
    return model.to(device), tokenizer


def disable_dropout(model) -> None:
    """Dropout off everywhere (pitfall 13), so that train() mode, needed by gradient checkpointing, changes nothing."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Data: token ids of prompts, episodes, batches


@dataclass
class Episode:
    """One sampled answer with what the PPO update needs of it (PAPER_NOTES §1.1 step 5, §8)."""

    prompt_ids: list[int]  # BOS + the prompt
    response_ids: list[int]  # the sampled tokens, then EOS if the answer finished (pitfall 10)
    finished: bool  # stopped by EOS or the stop string with an answer (reward.counts_as_finished); else no EOS
    reward: float  # R, the 0/1 grade of the answer
    advantages: list[float]  # one per response token, EOS included; set by the advantage phase
    old_logprobs: torch.Tensor | None = None  # (P+R-1,) logprob of every next token under pi_old, set by ppo_update
    ref_logprobs: torch.Tensor | None = None  # (P+R-1,) the same under the reference model; None when kl_coef = 0
    old_values: torch.Tensor | None = None  # (P+R-1,) V_old of the state before every next token (critic only)
    returns: list[float] | None = None  # G_t, one per response token (critic only)


def encode_prompt(tokenizer, question: str, dataset: str) -> list[int]:
    """Prompt ids: BOS + the paper's zero-shot template (PAPER_NOTES §4.1); the response starts with "\\n"."""
    return encode_prompts(tokenizer, [question], dataset)[0]


def encode_prompts(tokenizer, questions: list[str], dataset: str) -> list[list[int]]:
    """encode_prompt of many questions in one tokenizer call."""
    texts = [reward.format_prompt(question, dataset) for question in questions]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def pad_right(seqs: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists (pitfall 9: the trainer's batches are right-padded). Returns ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    return ids.to(device), attention_mask.to(device)


def make_batch(episodes: list[Episode], pad_id: int, device: str) -> dict:
    """Tensors of a list of episodes, aligned with ppo.token_logprobs (position t scores token t+1)."""
    ids, attention_mask = pad_right([e.prompt_ids + e.response_ids for e in episodes], pad_id, device)
    response_mask = torch.zeros_like(ids, dtype=torch.float32)  # (B, T): 1 on response tokens (incl. EOS)
    advantages = torch.zeros_like(ids, dtype=torch.float32)  # (B, T)
    for i, e in enumerate(episodes):
        p, r = len(e.prompt_ids), len(e.response_ids)
        response_mask[i, p : p + r] = 1.0
        advantages[i, p : p + r] = torch.tensor(e.advantages)
    # causal shift: logprobs[:, t] is the logprob of token t+1, so masks and advantages drop position 0
    return dict(input_ids=ids, attention_mask=attention_mask, mask=response_mask[:, 1:], advantages=advantages[:, 1:])


# ---------------------------------------------------------------------------------------------------------------------
# Supervised warm-up (ours; the paper starts from released SFT checkpoints, PAPER_NOTES §4.1)


def sft_examples(tokenizer, problems: list[dict], args: Args, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per problem: the gold solution, or with probability --sft-answer-only the
    bare answer line (reward.answer_only_solution), so that the model learns to answer both with and without working
    and RL has to learn which pays (the CPU demo); or, with probability --sft-slip, the solution with its first
    multiplication slipped into an addition (reward.slipped_solution), a mistake in one kind of step for RL to
    unlearn (the head-to-head)."""
    examples = []
    for p in problems:
        solution = p["solution"]
        if args.sft_answer_only and rng.random() < args.sft_answer_only:  # no draw at 0: the same run as without
            solution = reward.answer_only_solution(p["answer"], args.dataset)
        elif args.sft_slip and rng.random() < args.sft_slip:
            solution = reward.slipped_solution(solution)
        response_ids = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((encode_prompt(tokenizer, p["question"], args.dataset), response_ids))
    return examples


def sft(model, tokenizer, problems: list[dict], args: Args) -> None:
    """Next-token cross-entropy on prompt + solution + EOS, loss on the response tokens only, cosine LR decay."""
    rng = random.Random(args.seed)
    examples = sft_examples(tokenizer, problems, args, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.sft_steps))
    )
    model.train()
    for _ in (bar := tqdm(range(args.sft_steps), desc="sft", dynamic_ncols=True)):
        chunk = rng.sample(examples, min(args.sft_batch_size, len(examples)))
        episodes = [Episode(p, r, finished=True, reward=0.0, advantages=[0.0] * len(r)) for p, r in chunk]
        batch = make_batch(episodes, tokenizer.pad_token_id, args.device)
        with autocast(args):
            logprobs = ppo.token_logprobs(model, batch["input_ids"], batch["attention_mask"], 1.0)  # (B, T-1)
        loss = -ppo.masked_mean(logprobs, batch["mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Sampling, grading and evaluation


def autocast(args: Args):
    """bf16 autocast on CUDA when asked (DESIGN.md: CUDA optional, same code path); nothing on CPU."""
    if args.device.startswith("cuda") and args.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def stop_token_ids(model, tokenizer) -> list[int]:
    """The token ids that end an answer: the tokenizer's EOS and every id in the model's generation_config
    eos_token_id (an int or a list: chat models often list several end tokens, e.g. an end-of-turn token)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def sample_answers(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    num_samples: int,
    temperature: float,
    generator: torch.Generator,
    args: Args,
) -> rollout.Rollouts:
    """rollout.sample with the paper's stop string and length limits (PAPER_NOTES §1.1)."""
    with autocast(args):
        return rollout.sample(
            model,
            prompts,
            num_samples=num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=temperature,
            top_p=args.top_p,
            eos_token_id=stop_token_ids(model, tokenizer),
            generator=generator,
            stop_strings=reward.STOP_STRINGS,
            tokenizer=tokenizer,
            max_length=args.max_length - 1,  # room for the EOS of a finished answer: the official max_length - 1 - P
            show_progress=is_main(),
            max_batch_tokens=args.max_batch_tokens,
        )


def grade_all(tokenizer, rollouts: rollout.Rollouts, answers: list[str], dataset: str) -> list[float]:
    """R = grade(text) for finished answers and 0 for unfinished ones (PAPER_NOTES §4.3, pitfall 10)."""
    return [
        reward.grade(tokenizer.decode(ids, **rollout.DECODE_KWARGS), gold, dataset) if done else 0.0
        for ids, gold, done in zip(rollouts.response_ids, answers, rollouts.finished)
    ]


def evaluate(model, tokenizer, test_problems: list[dict], val_problems: list[dict], args: Args, iteration: int) -> dict:
    """Pass@1 as the paper measures it (§4.5): the mean accuracy of eval_samples answers per problem at T = 0.35, on
    the test and the validation problems; and the accuracy of the greedy answer to each test problem. The draws
    depend on --seed and the iteration only, so runs from one starting model are evaluated on the same problems with
    the same random numbers (paired). metrics["per_problem"] holds each problem's score, for comparisons. With
    several ranks each evaluates its share of the problems from a generator of its own (runs are paired with runs of
    the same number of ranks) and every rank gets all the scores."""
    generator = torch.Generator().manual_seed(rank_seed(args.seed + 1_000_003 * (iteration + 1)))
    metrics, per_problem = {}, {}
    for name, problems, num_samples, temperature in [
        ("eval/pass1", test_problems, args.eval_samples, args.eval_temperature),
        ("eval/greedy", test_problems, 1, 0.0),
        ("eval/val_pass1", val_problems, args.eval_samples, args.eval_temperature),
    ]:
        mine = shard(problems)
        prompts = [encode_prompt(tokenizer, p["question"], args.dataset) for p in mine]
        outs = sample_answers(
            model, tokenizer, prompts, num_samples=num_samples, temperature=temperature, generator=generator, args=args
        )
        golds = [p["answer"] for p in mine for _ in range(num_samples)]
        rewards = grade_all(tokenizer, outs, golds, args.dataset)
        scores = np.array(gather_list(rewards)).reshape(len(problems), num_samples)
        metrics[name], per_problem[name] = float(scores.mean()), scores.mean(axis=1).tolist()
    return {**metrics, "per_problem": per_problem}


def keep_best(metrics: dict, best_val: float, policy, tokenizer, iteration: int, args: Args) -> float:
    """Save the policy to run_dir/best/ when its validation Pass@1 beats every earlier evaluation of the run (the
    paper reports the checkpoint with the best validation accuracy, §4.5); returns the best value so far."""
    if metrics["eval/val_pass1"] <= best_val:
        return best_val
    if not is_main():  # every rank has the same metrics and weights: one saves
        return metrics["eval/val_pass1"]
    best_dir = os.path.join(args.run_dir, "best")
    save_folder(best_dir, policy, tokenizer, {"best.json": {"iteration": iteration, **metrics}})
    print(f"saved {best_dir} (validation Pass@1 {metrics['eval/val_pass1']:.4f}, iteration {iteration})")
    return metrics["eval/val_pass1"]


def evaluate_and_keep_best(
    policy, tokenizer, test_problems, val_problems, iteration, best_val, args
) -> tuple[dict, float]:
    """The evaluation phase: evaluate, keep the best policy, time it, and write each problem's scores to
    run_dir/evals/<iteration>.json (benchmarks/compare_runs.py pairs runs with them). Returns (metrics, best
    validation Pass@1)."""
    start = time.time()
    metrics = evaluate(policy, tokenizer, test_problems, val_problems, args, iteration)
    per_problem = metrics.pop("per_problem", None)
    if per_problem is not None and is_main():
        os.makedirs(os.path.join(args.run_dir, "evals"), exist_ok=True)
        with open(os.path.join(args.run_dir, "evals", f"{iteration}.json"), "w") as f:
            json.dump(per_problem, f)
    best_val = keep_best(metrics, best_val, policy, tokenizer, iteration, args)
    metrics["time/eval"] = time.time() - start
    return metrics, best_val


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: save_pretrained (loadable by transformers and vLLM) + optimizer, scheduler, RNG, iteration; atomic


def save_folder(path: str, model, tokenizer, files: dict) -> None:
    """The model and tokenizer (save_pretrained) and `files` (name -> object, written with json for .json names and
    torch.save otherwise) go to path.tmp, which then replaces path by renames: a crash never leaves half a folder."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, obj in files.items():
            if name.endswith(".json"):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=1)
            else:
                torch.save(obj, os.path.join(tmp, name))
    except (OSError, RuntimeError) as e:  # a full disk or a read-only folder (torch.save raises RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"{path} still holds the previous save" if os.path.exists(path) else f"nothing was written to {path}"
        raise SystemExit(f"error: could not write {path} ({type(e).__name__}: {str(e).splitlines()[0]}); {kept}")
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)  # a crash between the two renames leaves old and a complete tmp: recover_folder finishes
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(path: str) -> None:
    """Finish a save_folder cut between its two renames: path.old exists only once path.tmp was complete, so the
    save is path.tmp (or path.old if that was renamed too). Any other leftover .tmp is half-written and ignored."""
    tmp, old = path + ".tmp", path + ".old"
    if not os.path.exists(path) and os.path.exists(old):
        os.replace(tmp if os.path.exists(tmp) else old, path)
        print(f"recovered {path} from an interrupted save")
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    path: str, model, tokenizer, optimizer, scheduler, critic, args, next_iteration: int, best_val: float
):
    """A checkpoint that --resume continues exactly: the model, optimizer, scheduler and RNG states, the iteration to
    continue at and the best validation Pass@1 so far; with a critic, its weights (critic.pt), optimizer and
    scheduler too. run_args.json is small: check_run_dir reads only it. With several ranks rank 0 saves (the
    ranks' weights and optimizer states are the same) and records their number, which --resume must match."""
    if not is_main():
        return
    state = dict(
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state()),
        next_iteration=next_iteration,
        best_val_pass1=best_val,
        world_size=world()[1],
    )
    files = {"trainer_state.pt": state, "run_args.json": dataclasses.asdict(args)}
    if critic is not None:
        state["critic_optimizer"] = critic.optimizer.state_dict()
        state["critic_scheduler"] = critic.scheduler.state_dict()
        files["critic.pt"] = critic.model.state_dict()
    save_folder(path, model, tokenizer, files)
    print(f"saved {path} (next iteration {next_iteration})")


def check_run_dir(args: Args) -> None:
    """Refuse to overwrite another run, and refuse to resume a run that was started with other settings. First
    finish any save that a crash cut between its two renames (recover_folder)."""
    for name in ("checkpoint", "best", "init"):
        recover_folder(os.path.join(args.run_dir, name))
    state_file = os.path.join(args.run_dir, "checkpoint", "trainer_state.pt")
    if not os.path.exists(state_file):
        if args.resume:
            raise SystemExit(f"error: --resume given but {args.run_dir} holds no checkpoint")
        metrics = os.path.join(args.run_dir, "metrics.jsonl")
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            raise SystemExit(
                f"error: {args.run_dir} holds the metrics of a run that saved no checkpoint; delete {metrics} to "
                "start over there, or choose another --run-dir"
            )
        return
    if not args.resume:
        raise SystemExit(
            f"error: {args.run_dir} holds another run's checkpoint; pass --resume to continue it, "
            "or choose another --run-dir"
        )
    with open(os.path.join(args.run_dir, "checkpoint", "run_args.json")) as f:
        saved = json.load(f)
    keep = {"resume", "stop_after", "device", "threads", "wandb", "max_batch_tokens", "eval_problems", "run_dir"}
    keep |= {"value_diagnostic", "diagnostic_rollouts"}  # measurements from their own generator: training is the same
    changed = [k for k, v in dataclasses.asdict(args).items() if k not in keep and saved.get(k) != v]
    if changed == ["num_iterations"]:
        raise SystemExit(
            f"error: {args.run_dir} was started with --num-iterations {saved['num_iterations']}; a run cannot be "
            "extended, because its LR schedule decays to 0 over the run's total steps. To train on, start a new run "
            f"from its policy: --model {os.path.join(args.run_dir, 'checkpoint')} --sft-steps 0 --run-dir NEW"
        )
    if changed:
        raise SystemExit(
            f"error: {args.run_dir} was started with other settings ({', '.join(changed)}); "
            "resume with the same options or choose another --run-dir"
        )


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


def trim_metrics(path: str, next_iteration: int) -> None:
    """Drop the metrics.jsonl lines of iterations the checkpoint does not hold (written after it, before a crash),
    so that a resumed run logs each iteration exactly once. The file is rewritten atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["iteration"] < next_iteration]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        print(f"dropped {len(lines) - len(kept)} line(s) of {path} past the checkpoint; they will be redone")


def is_checkpoint_iteration(iteration: int, args: Args) -> bool:
    """Checkpoint after every save_every-th iteration and after the last one."""
    return iteration + 1 == args.num_iterations or bool(args.save_every and (iteration + 1) % args.save_every == 0)


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier of optimizer step `step` (0-based) under DeepSpeed's WarmupDecayLR as the paper ran it
    (PAPER_NOTES §3; deepspeed/runtime/lr_schedules.py of DeepSpeed 0.14.1, the official code's pin):

        gamma(i) = log(i + 1) / log(W)                  for i < W, with W = max(2, warmup_steps)   (log warmup)
        gamma(i) = max(0, (T - i) / max(1, T - W))      for i >= W, T = total_steps                (linear decay)

    DeepSpeed's engine steps its scheduler after the optimizer, so optimizer step s runs at gamma(s - 1), and step 0
    runs at the optimizer's own learning rate, which the official config sets to the peak (DeepSpeed only started
    setting the first rate from the schedule in version 0.16)."""
    if step == 0:
        return 1.0
    i, w = step - 1, max(2, warmup_steps)
    if i < w:
        return math.log(i + 1) / math.log(w)
    return max(0.0, (total_steps - i) / max(1, total_steps - w))


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (and SIGTERM) until the block ends, so an optimizer phase is never cut halfway; yields a flag
    list."""
    pressed = []
    previous = {s: signal.signal(s, lambda *_: pressed.append(True)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield pressed
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------------------------------
# Data parallelism (torchrun --nproc_per_node N train.py ...): every rank samples the answers of its share of the
# prompts and values their states on its own device; the update is the one-process update spread over the ranks.
# In one process (python train.py) every function here is the identity or does nothing.

# Ranks wait for rank 0 while it makes run_dir/init (SFT can take hours), so collectives wait long before failing.
DIST_TIMEOUT = datetime.timedelta(hours=6)


def init_distributed(args: Args) -> None:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): NCCL on CUDA with one GPU per rank
    (LOCAL_RANK), gloo on CPU. Only rank 0 prints (the others' stdout goes to /dev/null; errors still show)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", timeout=DIST_TIMEOUT)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")


def world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless launched by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    """Rank 0: the process that prints, logs and saves."""
    return world()[0] == 0


def rank_seed(seed: int) -> int:
    """The seed of this rank's own random stream: seed itself on rank 0, so one process draws what it always drew."""
    return seed + 1_000_000_007 * world()[0]


def shard_bounds(n: int) -> tuple[int, int]:
    """[first, last) of this rank's contiguous share of n items; shares differ in length by at most one and, in
    rank order, make up all n (so gather_list(shard(items)) == items)."""
    rank, size = world()
    return rank * n // size, (rank + 1) * n // size


def shard(items: list) -> list:
    first, last = shard_bounds(len(items))
    return items[first:last]


def gather_list(items: list) -> list:
    """The concatenation of every rank's items, in rank order (pickled: token ids, rewards, small tensors)."""
    rank, size = world()
    if size == 1:
        return list(items)
    everyone = [None] * size
    dist.all_gather_object(everyone, list(items))
    return [item for part in everyone for item in part]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# sum_gradients all-reduces the gradients in flat buckets of at most this many elements (400 MB in float32): one call
# per bucket instead of one per parameter tensor, and a bounded extra copy.
GRADIENT_BUCKET = 10**8


def sum_gradients(model) -> None:
    """Sum every gradient over the ranks (a parameter that got none on a rank counts as 0). Each rank's loss is
    already divided by the WHOLE minibatch's token and sequence counts, so the sum is exactly the gradient one
    process computes on the whole minibatch. The gradients travel in flat buckets, after the backward pass (DDP
    also overlaps them with it)."""
    if world()[1] == 1:
        return
    grads = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    while grads:
        bucket, size = [], 0
        while grads and (not bucket or size + grads[0].numel() <= GRADIENT_BUCKET):
            size += grads[0].numel()
            bucket.append(grads.pop(0))
        flat = torch.cat([g.flatten() for g in bucket])
        dist.all_reduce(flat)
        for g, summed in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(summed.view_as(g))


def same_generator(generator: torch.Generator) -> None:
    """Give every rank rank 0's generator state, so the update's shuffles agree everywhere."""
    if world()[1] > 1:
        generator.set_state(gather_list([generator.get_state()])[0])


# Log keys that are counts: the ranks' values add up. Other keys differing across ranks are per-rank means of equal
# shares (their mean is the mean over all answers), or times (the slowest rank's).
SUMMED_KEYS = {"tokens/answers", "vine/states_total", "vine/states_unique", "vine/mc_rollouts", "vine/mc_tokens"}
SUMMED_KEYS |= {"diag/states"}


def combine_logs(log: dict) -> dict:
    """One log for the iteration from every rank's: counts summed, values equal on every rank kept, times maxed,
    the rest averaged (every rank has the same number of answers)."""
    if world()[1] == 1:
        return log
    logs = gather_list([log])
    combined = {}
    for key in log:
        values = [one[key] for one in logs]
        if key in SUMMED_KEYS:
            combined[key] = sum(values)
        elif all(v == values[0] for v in values):  # the same on every rank (evaluation, the update's stats)
            combined[key] = values[0]
        elif key.startswith("time/"):
            combined[key] = max(values)
        else:
            combined[key] = float(np.mean(values))
    return combined


# ---------------------------------------------------------------------------------------------------------------------
# One iteration, phase by phase (PAPER_NOTES §1.1, §8): sample answers, estimate values and advantages, update, log


def sample_problems(train_problems: list[dict], tokenizer, iteration: int, args: Args) -> list[tuple[list[int], str]]:
    """The iteration's (prompt ids, gold answer) pairs: the train split reshuffled with rl_seed + iteration, the first
    prompts_per_iteration whose prompt has at most longest_prompt(args) tokens (§1.1 step 1; §3 prompt filter)."""
    order = random.Random(args.rl_seed + iteration).sample(range(len(train_problems)), len(train_problems))
    problems = []
    for i in order:
        prompt_ids = encode_prompt(tokenizer, train_problems[i]["question"], args.dataset)
        if len(prompt_ids) <= longest_prompt(args):
            problems.append((prompt_ids, train_problems[i]["answer"]))
        if len(problems) == args.prompts_per_iteration:
            break
    return problems


def longest_prompt(args: Args) -> int:
    """Prompts longer than this are dropped: --max-prompt-length, and room for one answer token and EOS."""
    return min(args.max_prompt_length, args.max_length - 2)


def check_prompts_fit(train_problems: list[dict], tokenizer, args: Args) -> None:
    """Stop before training if fewer than prompts_per_iteration training prompts fit (sample_problems)."""
    lengths = [len(ids) for ids in encode_prompts(tokenizer, [p["question"] for p in train_problems], args.dataset)]
    fit = sum(n <= longest_prompt(args) for n in lengths)
    if fit < args.prompts_per_iteration:
        raise SystemExit(
            f"error: only {fit} of {len(lengths)} training prompts are at most {longest_prompt(args)} tokens "
            f"(--max-prompt-length {args.max_prompt_length}, --max-length {args.max_length}), fewer than "
            f"--prompts-per-iteration {args.prompts_per_iteration}; raise the limits or lower that option"
        )


def sample_and_grade(
    policy, tokenizer, problems: list[tuple[list[int], str]], generator: torch.Generator, args: Args
) -> tuple[rollout.Rollouts, list[float]]:
    """samples_per_prompt answers per prompt at the sampling temperature (§1.1 step 3), answer j of prompt i at
    i * samples_per_prompt + j, and their rewards R (§4.3: 0 when unfinished)."""
    prompts = [prompt_ids for prompt_ids, _ in problems]
    rollouts = sample_answers(
        policy,
        tokenizer,
        prompts,
        num_samples=args.samples_per_prompt,
        temperature=args.temperature,
        generator=generator,
        args=args,
    )
    golds = [gold for _, gold in problems for _ in range(args.samples_per_prompt)]
    return rollouts, grade_all(tokenizer, rollouts, golds, args.dataset)


# What a right answer ends with, per data set: named by the warning when no answer of an iteration is right.
ANSWER_FORMATS = {"gsm8k": 'a final line "#### N"', "arithmetic": 'a final line "#### N"', "math": "\\boxed{...}"}


def reward_signal(rewards: list[float], iteration: int, args: Args) -> dict:
    """The fraction of prompts whose answers all got the same reward: their advantages carry no outcome signal
    (GRPO/RLOO give them 0; VinePPO's MC values can still rank their steps). When every answer of the iteration got
    0 (or all got 1) nothing can be learned from it: say so once per iteration, with the likely cause."""
    groups = np.array(rewards).reshape(-1, args.samples_per_prompt)  # (prompts, samples)
    no_signal = float(np.mean(groups.min(axis=1) == groups.max(axis=1)))
    if groups.max() == 0:
        print(
            f"warning: iteration {iteration}: every one of the {groups.size} answers got reward 0, so there is "
            f"nothing to learn from. On {args.dataset} an answer is right only if it ends with "
            f"{ANSWER_FORMATS[args.dataset]}: a model that never writes that format always scores 0 (teach it with "
            "--sft-steps N, or start from an SFT model); answers cut at --max-new-tokens also score 0 "
            "(see response/unfinished)"
        )
    elif groups.min() == 1:
        print(
            f"warning: iteration {iteration}: every one of the {groups.size} answers got reward 1, so there is "
            "nothing to learn from; the problems are too easy for this policy"
        )
    return {"reward/no_signal_groups": no_signal}


def make_episodes(tokenizer, problems, rollouts: rollout.Rollouts, rewards: list[float], args: Args) -> list[Episode]:
    """One Episode per answer, its advantages still empty. A GSM8K answer with no "####" line is unfinished, as in the
    official code (§4.3); EOS is appended to finished answers only (§1.3, pitfall 10): the end token the answer
    sampled (a model may have several, stop_token_ids), or the tokenizer's after a stop string."""
    episodes = []
    for i, ids in enumerate(rollouts.response_ids):
        prompt_ids = problems[i // args.samples_per_prompt][0]
        text = tokenizer.decode(ids, **rollout.DECODE_KWARGS)
        finished = rollouts.finished[i] and reward.counts_as_finished(text, args.dataset)
        eos = tokenizer.eos_token_id if rollouts.eos[i] is None else rollouts.eos[i]  # the end token it sampled
        response_ids = ids + [eos] if finished else list(ids)
        episodes.append(Episode(prompt_ids, response_ids, finished, rewards[i], advantages=[]))
    return episodes


def vine_advantages(policy, tokenizer, problems, rollouts: rollout.Rollouts, episodes, generator, args: Args) -> dict:
    """VinePPO's credit assignment for every answer (§1.2, §1.3): split into steps, MC values of the step states
    from the same policy snapshot and sampling settings (pitfall 1), A_i = r_i + V(s_{i+1}) - V(s_i) per step, each
    token carrying its step's A_i and the EOS of a finished answer the last token's (pitfall 10)."""
    prompts = [prompt_ids for prompt_ids, _ in problems for _ in range(args.samples_per_prompt)]
    golds = [gold for _, gold in problems for _ in range(args.samples_per_prompt)]
    steps, token_steps = answer_steps(tokenizer, rollouts.response_ids, args.dataset)
    values, stats = estimate_values(
        policy, tokenizer, prompts, rollouts.response_ids, token_steps, golds, args.num_mc_rollouts, generator, args
    )
    for i, e in enumerate(episodes):
        step_advs = vine.step_advantages(values[i], e.reward, len(steps[i]))
        advs = vine.token_advantages(step_advs, token_steps[i])
        if e.finished:  # the EOS takes the last token's advantage (the last step's for an empty answer)
            advs = advs + [advs[-1] if advs else step_advs[-1]]
        e.advantages = advs
    return stats


def answer_steps(tokenizer, responses: list[list[int]], dataset: str) -> tuple[list[list[int]], list[list[int]]]:
    """Each answer's steps (vine.split_steps of its text) and the step of each of its tokens (vine.token_steps)."""
    texts = [tokenizer.decode(ids, **rollout.DECODE_KWARGS) for ids in responses]
    steps = [vine.split_steps(text, dataset) for text in texts]
    return steps, [vine.token_steps(ids, s, tokenizer) for ids, s in zip(responses, steps)]


def estimate_values(policy, tokenizer, prompts, responses, token_steps, golds, num_mc_rollouts, generator, args):
    """vine.estimate_values with the answers' own sampling settings and length budget (§1.2, pitfall 1)."""
    with autocast(args):
        return vine.estimate_values(
            policy,
            tokenizer,
            prompts,
            responses,
            token_steps,
            golds,
            args.dataset,
            num_mc_rollouts=num_mc_rollouts,
            max_value_steps=args.max_value_steps or None,
            max_new_tokens=args.max_new_tokens,
            max_length=args.max_length - 1,  # the same budget as the answers (sample_answers)
            temperature=args.temperature,
            top_p=args.top_p,
            eos_token_id=stop_token_ids(policy, tokenizer),
            stop_strings=reward.STOP_STRINGS,
            generator=generator,
            show_progress=is_main(),
            max_batch_tokens=args.max_batch_tokens,
        )


def critic_advantages(critic: "Critic", episodes: list[Episode], pad_id: int, args: Args) -> dict:
    """The paper's PPO (§3 "PPO reward / returns", pitfall 16): V_old of every state from the critic, once per
    iteration before the update; the reward R on the last response token (EOS if present); GAE with gamma = lambda =
    1 (ppo.gae), so every token gets A_t = R - V_old(s_t) and the return G_t = R."""
    values = critic_values(critic, [e.prompt_ids + e.response_ids for e in episodes], pad_id, args)
    for e, v in zip(episodes, values):
        p, r = len(e.prompt_ids), len(e.response_ids)
        e.old_values = v[:-1]  # value t: the state before token t + 1 (aligned as the logprobs)
        rewards = [0.0] * (r - 1) + [e.reward] if r else []
        e.advantages, e.returns = ppo.gae(rewards, e.old_values[p - 1 : p - 1 + r].tolist())
    first_values = [float(e.old_values[len(e.prompt_ids) - 1]) for e in episodes]  # V_old(s_0) of every answer
    return {"critic/value_s0": float(np.mean(first_values))}


def critic_values(critic: "Critic", seqs: list[list[int]], pad_id: int, args: Args) -> list[torch.Tensor]:
    """The critic's V of the state after each token of every sequence, one (len,) float32 CPU tensor per sequence,
    in eval mode without gradients, micro_batch_size sequences per forward pass."""
    critic.model.eval()
    out = []
    with torch.no_grad(), autocast(args):
        for start in range(0, len(seqs), args.micro_batch_size):
            chunk = seqs[start : start + args.micro_batch_size]
            ids, attention_mask = pad_right(chunk, pad_id, args.device)
            values = critic.model(ids, attention_mask)  # (B, T)
            out += [values[j, : len(s)].cpu() for j, s in enumerate(chunk)]
    return out


def outcome_advantages(episodes: list[Episode], args: Args) -> dict:
    """GRPO or RLOO (ppo.group_advantages): one advantage per answer from its problem's group of samples_per_prompt
    answers, the same on every token, EOS included; no values and no extra sampling."""
    per_answer = ppo.group_advantages([e.reward for e in episodes], args.samples_per_prompt, args.advantage)
    for e, a in zip(episodes, per_answer):
        e.advantages = [a] * len(e.response_ids)
    return {}


def value_diagnostic(policy, critic, tokenizer, prompts, responses, steps, golds, generator, args) -> tuple[dict, dict]:
    """How well the value estimates match the truth on sampled answers' step states (paper §5.3 "why the critic
    fails", PAPER_NOTES §5.3): the reference V(s) is the mean reward of --diagnostic-rollouts MC rollouts from s (the
    paper: 256), compared with a fresh K-rollout MC estimate (what VinePPO uses) and, if there is one, the critic's
    prediction before this iteration's update. Logged per estimator: the mean absolute error over (answer, state)
    pairs, and the ranking accuracy over pairs of states of one answer whose reference values differ (1 when the
    estimate orders them as the reference does, 1/2 for a tie, else 0). Runs from its own generator: training draws
    nothing less or more. Returns (stats, per-answer values by name) for tests."""
    per_answer = {}
    for name, k in (("reference", args.diagnostic_rollouts), ("mc", args.num_mc_rollouts)):
        per_answer[name], _ = estimate_values(policy, tokenizer, prompts, responses, steps, golds, k, generator, args)
    if critic is not None:  # V(s) is the critic's value at the last token of s (§3: V(s_0) at the last prompt token)
        states, state_index, _ = vine.value_states(prompts, responses, steps, golds, args.max_value_steps or None)
        seqs = [list(prompt) + list(prefix) for prompt, prefix, _ in states]
        unique = [float(v[-1]) for v in critic_values(critic, seqs, tokenizer.pad_token_id, args)]
        per_answer["critic"] = [[unique[u] for u in indices] for indices in state_index]
    reference = per_answer["reference"]
    stats = {"diag/states": sum(len(v) for v in reference)}
    for name in ("mc", "critic"):
        if name in per_answer:
            stats.update(value_errors(per_answer[name], reference, prefix=f"diag/{name}"))
    return stats, per_answer


def run_value_diagnostic(policy, critic, tokenizer, problems, rollouts, iteration: int, args: Args) -> dict:
    """value_diagnostic on --value-diagnostic answers of this iteration, drawn with their own seeded generator."""
    generator = torch.Generator().manual_seed(args.rl_seed + 7_000_003 * (iteration + 1))
    picked = torch.randperm(len(rollouts.response_ids), generator=generator)[: args.value_diagnostic].tolist()
    prompts = [problems[i // args.samples_per_prompt][0] for i in picked]
    golds = [problems[i // args.samples_per_prompt][1] for i in picked]
    responses = [rollouts.response_ids[i] for i in picked]
    _, steps = answer_steps(tokenizer, responses, args.dataset)
    return value_diagnostic(policy, critic, tokenizer, prompts, responses, steps, golds, generator, args)[0]


def value_errors(estimates: list[list[float]], reference: list[list[float]], prefix: str) -> dict:
    """Mean absolute error and pairwise ranking accuracy of per-answer state values against reference values."""
    errors, agreements = [], []
    for est, ref in zip(estimates, reference, strict=True):
        errors += [abs(e - r) for e, r in zip(est, ref, strict=True)]
        for i in range(len(ref)):
            for j in range(i + 1, len(ref)):
                if ref[i] != ref[j]:
                    agree = (est[i] - est[j]) * (ref[i] - ref[j])
                    agreements.append(1.0 if agree > 0 else 0.5 if est[i] == est[j] else 0.0)
    stats = {f"{prefix}_mae": float(np.mean(errors))}
    if agreements:
        stats[f"{prefix}_rank_acc"] = float(np.mean(agreements))
    return stats


def old_and_ref_logprobs(policy, reference, episodes: list[Episode], pad_id: int, args: Args) -> None:
    """pi_old and reference logprobs of every episode, once per iteration before the update (pitfall 13). With
    several ranks each computes its share and receives the others'."""
    mine = shard(episodes)
    with torch.no_grad(), autocast(args):
        for start in range(0, len(mine), args.micro_batch_size):
            chunk = mine[start : start + args.micro_batch_size]
            batch = make_batch(chunk, pad_id, args.device)
            old = ppo.token_logprobs(policy, batch["input_ids"], batch["attention_mask"], args.temperature)  # (B, T-1)
            ref = None
            if reference is not None:
                ref = ppo.token_logprobs(reference, batch["input_ids"], batch["attention_mask"], args.temperature)
            for j, e in enumerate(chunk):
                n = int(batch["attention_mask"][j].sum()) - 1  # number of predicted positions of this episode
                e.old_logprobs = old[j, :n].cpu()
                e.ref_logprobs = ref[j, :n].cpu() if ref is not None else None
    if world()[1] > 1:
        for e, (old, ref) in zip(episodes, gather_list([(e.old_logprobs, e.ref_logprobs) for e in mine]), strict=True):
            e.old_logprobs, e.ref_logprobs = old, ref


def minibatch_backward(policy, critic, minibatch: list[Episode], pad_id: int, args: Args) -> dict:
    """Gradient of the clipped PPO loss + KL over one minibatch, accumulated over micro-batches (memory only: the
    advantages are whitened and the losses normalised over the whole minibatch, pitfalls 6 and 7); with a critic,
    also the gradient of its clipped value loss on the same micro-batches. Returns the ppo_loss (and value_loss)
    stats, summed over the micro-batches into minibatch means (ppo.accumulate_stats).

    With several ranks, every rank holds the whole minibatch (so the whitening statistics and the normalisers are
    the one-process ones) and runs the micro-batches of its share only; the stats and gradients are then summed over
    the ranks, which gives the one-process gradient, stats and ratio-guard decision on every rank."""
    full = make_batch(minibatch, pad_id, "cpu")
    whitened = ppo.masked_whiten(full["advantages"], full["mask"])  # (B, T-1) once over the whole minibatch
    num_tokens, num_seqs = float(full["mask"].sum()), float(len(minibatch))
    first, last = shard_bounds(len(minibatch))  # this rank's share
    stats = {}
    for m in range(first, last, args.micro_batch_size):
        chunk = minibatch[m : min(m + args.micro_batch_size, last)]
        batch = make_batch(chunk, pad_id, args.device)
        width = batch["mask"].shape[1]
        old = pad_logprobs([e.old_logprobs for e in chunk], width).to(args.device)
        ref = None  # no reference model when kl_coef = 0
        if chunk[0].ref_logprobs is not None:
            ref = pad_logprobs([e.ref_logprobs for e in chunk], width).to(args.device)
        adv = whitened[m : m + len(chunk), :width].to(args.device)
        with autocast(args):
            logprobs, entropy = ppo.token_logprobs(
                policy, batch["input_ids"], batch["attention_mask"], args.temperature, return_entropy=True
            )
        loss, s = ppo.ppo_loss(
            logprobs,
            old,
            adv,
            batch["mask"],
            clip_eps=args.clip_eps,
            ref_logprobs=ref,
            kl_coef=args.kl_coef,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
        )
        loss.backward()
        s["policy/entropy"] = float((entropy * batch["mask"]).sum()) / num_tokens
        if critic is not None:  # the paper's PPO: the critic learns from the same micro-batch (§3 "Value loss")
            old_values = pad_logprobs([e.old_values for e in chunk], width).to(args.device)
            returns = torch.zeros_like(batch["mask"])  # (B, T-1) G_t at the position that predicts token t
            for j, e in enumerate(chunk):
                p = len(e.prompt_ids)
                returns[j, p - 1 : p - 1 + len(e.returns)] = torch.tensor(e.returns)
            with autocast(args):
                values = critic.model(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, T-1)
            v_loss, v_stats = ppo.value_loss(
                values, old_values, returns, batch["mask"], clip_range=args.value_clip, num_tokens=num_tokens
            )
            v_loss.backward()
            s.update(v_stats)
        stats = ppo.accumulate_stats(stats, s)
    if world()[1] > 1:
        stats = functools.reduce(ppo.accumulate_stats, gather_list([stats]), {})
        for model in (policy, critic.model if critic is not None else None):
            if model is not None:
                sum_gradients(model)
    return stats


def ppo_update(
    policy, reference, critic, optimizer, scheduler, episodes: list[Episode], pad_id: int, generator, args
) -> dict:
    """num_epochs passes over the episodes in shuffled minibatches of minibatch_size, one AdamW step each with the
    gradient norm clipped (§3, §8); the critic, if any, takes a step of its own AdamW on every minibatch (the ratio
    guard is the policy's alone, as in the official code). A minibatch whose loss or gradient is not finite moves
    no weight (clipped_step). Returns the stats averaged over the optimizer steps, and the skip counts.
    episodes: the iteration's episodes, the same on every rank (several ranks: see minibatch_backward)."""
    old_and_ref_logprobs(policy, reference, episodes, pad_id, args)
    same_generator(generator)  # several ranks: every rank draws rank 0's minibatches
    totals, num_steps, skipped, nonfinite, empty = {}, 0, 0, 0, 0
    policy.train()  # dropout is off (disable_dropout); train mode turns on gradient checkpointing
    if critic is not None:
        critic.model.train()
    for _ in range(args.num_epochs):
        perm = torch.randperm(len(episodes), generator=generator).tolist()
        for start in range(0, len(perm), args.minibatch_size):
            minibatch = [episodes[i] for i in perm[start : start + args.minibatch_size]]
            if sum(len(e.response_ids) for e in minibatch) < 2:  # only empty answers (EOS first, no "####"): no
                scheduler.step()  # token to learn from, nothing to whiten; the schedules advance as for a skip
                if critic is not None:
                    critic.scheduler.step()
                empty += 1
                continue
            stats = minibatch_backward(policy, critic, minibatch, pad_id, args)
            if critic is not None:
                stats["critic/grad_norm"], _ = clipped_step(
                    critic.model, critic.optimizer, critic.scheduler, stats["critic/loss"], args
                )
            if ppo.ratio_guard_exceeded(stats):  # the paper's guard: skip a minibatch whose mean ratio > 10
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()  # the schedule still advances, as in the paper (departure 2)
                skipped += 1
                continue
            stats["grad_norm"], stepped = clipped_step(policy, optimizer, scheduler, stats["loss/total"], args)
            if not stepped:
                nonfinite += 1
                continue
            num_steps += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
    policy.eval()
    if critic is not None:
        critic.model.eval()
    out = {k: v / max(1, num_steps) for k, v in totals.items()}
    out["ppo/skipped_minibatches"], out["ppo/nonfinite_minibatches"] = skipped, nonfinite
    out["ppo/empty_minibatches"] = empty
    return out


def clipped_step(model, optimizer, scheduler, loss: float, args: Args) -> tuple[float, bool]:
    """Clip the gradient norm to max_grad_norm and take the optimizer step, unless the loss or the gradient norm is
    not finite: one NaN would otherwise spread to every weight through AdamW's moments. The LR schedule advances
    either way. Returns the gradient norm before clipping and whether the step was taken."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
    stepped = math.isfinite(grad_norm) and math.isfinite(loss)
    if stepped:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


def check_finite_weights(policy, critic, iteration: int) -> None:
    """Stop, saving nothing, if an update left a non-finite weight (clipped_step makes that all but impossible)."""
    for name, model in (("policy", policy), ("critic", critic.model if critic else None)):
        if model is not None and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise SystemExit(
                f"error: the {name}'s weights are not finite after the update of iteration {iteration}; stopped "
                "without saving them, so the last checkpoint is intact. Lower --lr, or check the data"
            )


def pad_logprobs(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack per-episode logprob vectors into (B, width), zero-padded on the right."""
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def write_log(log: dict, episodes: list[Episode], scheduler, metrics_file, args) -> None:
    """Add the iteration's sample statistics to its log, print one line and append it to metrics.jsonl (and wandb)."""
    all_advs = [a for e in episodes for a in e.advantages]
    log.update(
        {
            "reward/mean": float(np.mean([e.reward for e in episodes])),
            "response/length": float(np.mean([len(e.response_ids) - e.finished for e in episodes])),  # without EOS
            "response/unfinished": 1.0 - float(np.mean([e.finished for e in episodes])),
            "advantages/zero_frac": float(np.mean([a == 0.0 for a in all_advs])) if all_advs else 1.0,
            "lr": scheduler.get_last_lr()[0],
        }
    )
    print(format_log(log))
    metrics_file.write(json.dumps(log) + "\n")
    metrics_file.flush()
    if args.wandb:
        import wandb

        wandb.log(log, step=log["iteration"])


def format_log(log: dict) -> str:
    """One readable line per iteration (STYLE.md Logging); the README explains each metric."""
    return " | ".join([f"it {log['iteration']}"] + [f"{k} {v:.4g}" for k, v in log.items() if k != "iteration"])


# ---------------------------------------------------------------------------------------------------------------------
# Setup: data, models, optimizer, resume


def load_data(args: Args) -> tuple[list[dict], list[dict], list[dict]]:
    """Train, validation and test problems (the last two cut to eval_problems), with a one-line error for a missing
    file, a bad row or an unreachable hub."""
    try:
        splits = [reward.load_problems(args.dataset, split, args.data_dir) for split in ("train", "validation", "test")]
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    for name, problems in zip(("train", "validation", "test"), splits):
        if not problems and (name == "train" or args.eval_every):
            raise SystemExit(f"error: the {args.dataset} {name} split is empty; check --data-dir")
    return splits[0], splits[1][: args.eval_problems or None], splits[2][: args.eval_problems or None]


# The options that make run_dir/init (a tiny model and its SFT): init_args.json records them, and a later run that
# would reuse init/ with other values is refused (a stale init/ must not pass for the one these options make).
INIT_OPTIONS = ("dataset", "model", "data_dir", "seed", "max_length", "sft_steps", "sft_lr", "sft_batch_size")
INIT_OPTIONS += ("sft_answer_only", "sft_slip", "max_grad_norm")


def start_model(args: Args) -> str:
    """Where the initial (SFT) policy lives: run_dir/init/ when this run makes it (a tiny model, or --sft-steps),
    else --model itself."""
    made_here = args.model == "tiny" or args.sft_steps > 0
    return os.path.join(args.run_dir, "init") if made_here else args.model


def load_models(args: Args, train_problems: list[dict]):
    """The policy to train and the frozen reference, the initial (SFT) policy (PAPER_NOTES §3; pitfall 13).

    A tiny model, or any model given --sft-steps, is made here once and kept in run_dir/init/: the RL start and the
    reference (by rank 0 when there are several). With --resume the policy comes from run_dir/checkpoint/. No
    reference is loaded when kl_coef = 0."""
    start = start_model(args)
    made_with = {name: getattr(args, name) for name in INIT_OPTIONS}
    if start != args.model and os.path.exists(os.path.join(start, "init_args.json")):
        with open(os.path.join(start, "init_args.json")) as f:
            saved = json.load(f)
        changed = [k for k, v in made_with.items() if k in saved and saved[k] != v]
        if changed:
            raise SystemExit(
                f"error: {start} was made with other options ({', '.join(f'{k} {saved[k]}' for k in changed)}); "
                f"delete {start} to make it again, or choose another --run-dir"
            )
    if start != args.model and not os.path.exists(os.path.join(start, "config.json")) and is_main():
        if args.model == "tiny":
            tokenizer = build_tiny_tokenizer([p["question"] + p["solution"] for p in train_problems[:20000]])
            policy = build_tiny_model(tokenizer, max_length=args.max_length).to(args.device)
        else:
            policy, tokenizer = load_model(args.model, args.device)
        if args.sft_steps:
            sft(policy, tokenizer, train_problems, args)
        save_folder(start, policy, tokenizer, {"init_args.json": made_with})
    barrier()  # several ranks: the others wait until rank 0 has made init/
    policy, tokenizer = load_model(os.path.join(args.run_dir, "checkpoint") if args.resume else start, args.device)
    if args.device.startswith("cuda") and args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    reference = None
    if args.kl_coef > 0:
        reference, _ = load_model(start, args.device)
        reference.eval().requires_grad_(False)
        if args.device.startswith("cuda") and args.bf16:
            reference.to(torch.bfloat16)
    return policy, reference, tokenizer


@dataclass
class Critic:
    """The PPO baseline's value model with its own AdamW and schedule (--advantage critic; PAPER_NOTES §3)."""

    model: ppo.ValueModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def load_critic(args: Args) -> Critic | None:
    """With --advantage critic: a full copy of the initial (SFT) policy with a fresh value head (head seeded by
    rl_seed), and an AdamW at the policy's learning rate and schedule (§3 "Critic", pitfall 16); else None.
    --resume then loads its saved weights and optimizer (restore_trainer_state)."""
    if args.advantage != "critic":
        return None
    body, _ = load_model(start_model(args), args.device)
    model = ppo.ValueModel(body, generator=torch.Generator().manual_seed(args.rl_seed))
    if args.device.startswith("cuda") and args.gradient_checkpointing:
        model.body.gradient_checkpointing_enable()
    return Critic(model, *make_optimizer(model, args))


def make_optimizer(policy, args: Args):
    """AdamW (betas 0.9, 0.999, eps 1e-8, no weight decay) with the warmup-then-linear-decay schedule (§3)."""
    episodes_per_iteration = args.prompts_per_iteration * args.samples_per_prompt
    steps_per_iteration = args.num_epochs * math.ceil(episodes_per_iteration / args.minibatch_size)
    total_steps = args.num_iterations * steps_per_iteration
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup_steps=warmup_steps, total_steps=total_steps)
    )
    return optimizer, scheduler


def restore_trainer_state(path: str, optimizer, scheduler, critic: Critic | None) -> tuple[int, float]:
    """Load optimizer, scheduler and RNG states (and the critic's weights, optimizer and scheduler) from a checkpoint;
    returns the iteration to continue at and the best validation Pass@1 so far."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    saved_world = state.get("world_size", 1)
    if saved_world != world()[1]:  # the shares and random streams depend on the number of ranks
        launch = "python train.py" if saved_world == 1 else f"torchrun --nproc_per_node {saved_world} train.py"
        raise SystemExit(
            f"error: {path} was written by a run of {saved_world} process(es) and this one has {world()[1]}; resume "
            f"it with as many ({launch} ..., or that many processes in all across machines)"
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if critic is not None:
        critic.model.load_state_dict(
            torch.load(os.path.join(path, "critic.pt"), map_location=next(critic.model.parameters()).device)
        )
        critic.optimizer.load_state_dict(state["critic_optimizer"])
        critic.scheduler.load_state_dict(state["critic_scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    print(f"resumed from {path} at iteration {state['next_iteration']}")
    return state["next_iteration"], state.get("best_val_pass1", -1.0)


def print_where_results_went(args: Args, best_val: float) -> None:
    """The last lines of a run: its files, and the command that draws its curves."""
    print(f"metrics:    {os.path.join(args.run_dir, 'metrics.jsonl')}")
    print(f"checkpoint: {os.path.join(args.run_dir, 'checkpoint')}")
    if best_val >= 0:
        print(f"best:       {os.path.join(args.run_dir, 'best')} (validation Pass@1 {best_val:.4f})")
    curves = os.path.join(args.run_dir, "curves.png")
    print(f"curves:     python benchmarks/plot_metrics.py {args.run_dir}   (writes {curves}; needs matplotlib)")


# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # seeding (cleanrl): every random choice below flows from args.seed (the starting model) or args.rl_seed (RL)
    random.seed(args.seed)
    np.random.seed(args.seed % 2**32)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed(args)  # launched by torchrun: join the other ranks
    # SIGTERM (kill, a job scheduler's preemption, torchrun passing on a stop) stops the run as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with run_dir_lock(args.run_dir) if is_main() else contextlib.nullcontext():  # one train.py per run folder
            run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args: Args) -> None:
    """Set up (data, models, optimizers, resume), then iterate: sample, advantages, update, log, evaluate, save.
    With several ranks (torchrun) every rank runs this same loop on its share of the prompts; rank 0 checks the run
    folder, logs and saves."""
    if is_main():
        check_run_dir(args)
    barrier()
    print(json.dumps(dataclasses.asdict(args), indent=1))
    checkpoint = os.path.join(args.run_dir, "checkpoint")
    try:
        train_problems, val_problems, test_problems = load_data(args)
        policy, reference, tokenizer = load_models(args, train_problems)
        check_prompts_fit(train_problems, tokenizer, args)
        critic = load_critic(args)
        optimizer, scheduler = make_optimizer(policy, args)
        start_iteration, best_val = 0, -1.0
        if args.resume:
            start_iteration, best_val = restore_trainer_state(checkpoint, optimizer, scheduler, critic)
            if is_main():
                trim_metrics(os.path.join(args.run_dir, "metrics.jsonl"), start_iteration)
    except KeyboardInterrupt:
        print("interrupted while setting up (loading, SFT): nothing was saved or changed; run the same command again")
        sys.exit(130)
    if args.wandb and is_main():
        import wandb

        wandb.init(project="vineppo", config=dataclasses.asdict(args), resume="allow")
    metrics_file = open(os.path.join(args.run_dir, "metrics.jsonl") if is_main() else os.devnull, "a")
    # the policy holds the updates of the iterations before resume_at; saved_at: what the checkpoint on disk holds
    resume_at, saved_at = start_iteration, start_iteration if args.resume else None
    try:
        for iteration in range(start_iteration, args.num_iterations):
            log = {"iteration": iteration}
            # one generator per iteration (and rank), so a resumed run draws exactly what an uninterrupted one does
            generator = torch.Generator().manual_seed(rank_seed(args.rl_seed + iteration))
            if args.eval_every and iteration % args.eval_every == 0:  # before the update: iteration 0 is the start
                metrics, best_val = evaluate_and_keep_best(
                    policy, tokenizer, test_problems, val_problems, iteration, best_val, args
                )
                log.update(metrics)
            # -------- sample answers and grade them
            timer = time.time()
            problems = shard(sample_problems(train_problems, tokenizer, iteration, args))  # several ranks: a share
            rollouts, rewards = sample_and_grade(policy, tokenizer, problems, generator, args)
            episodes = make_episodes(tokenizer, problems, rollouts, rewards, args)
            log["time/sample"], timer = time.time() - timer, time.time()
            # -------- advantages: MC values of the step states (VinePPO), or a baseline's (--advantage)
            pad_id = tokenizer.pad_token_id
            if args.advantage == "vine":
                log.update(vine_advantages(policy, tokenizer, problems, rollouts, episodes, generator, args))
            elif args.advantage == "critic":
                log.update(critic_advantages(critic, episodes, pad_id, args))
            else:
                log.update(outcome_advantages(episodes, args))
            log["time/values"], timer = time.time() - timer, time.time()
            if args.value_diagnostic:  # -------- optional: how good are the values? (not part of the method)
                log.update(run_value_diagnostic(policy, critic, tokenizer, problems, rollouts, iteration, args))
                log["time/diagnostic"], timer = time.time() - timer, time.time()
            log["tokens/answers"] = sum(len(ids) for ids in rollouts.response_ids)
            log = combine_logs(log)  # several ranks: one log, and every rank holds every episode for the update
            episodes = gather_list(episodes)
            log.update(reward_signal([e.reward for e in episodes], iteration, args))
            # -------- PPO update, log, checkpoint; Ctrl-C waits until the block ends (no checkpoint of half an update)
            with deferred_interrupt() as interrupted:
                log.update(
                    ppo_update(policy, reference, critic, optimizer, scheduler, episodes, pad_id, generator, args)
                )
                check_finite_weights(policy, critic, iteration)
                resume_at = iteration + 1
                log["time/train"] = time.time() - timer
                if is_main():
                    write_log(log, episodes, scheduler, metrics_file, args)
                done = iteration + 1 - start_iteration
                interrupted = any(gather_list([bool(interrupted)]))  # Ctrl-C on any rank stops every rank here
                if interrupted or done == args.stop_after or is_checkpoint_iteration(iteration, args):
                    save_checkpoint(
                        checkpoint, policy, tokenizer, optimizer, scheduler, critic, args, resume_at, best_val
                    )
                    saved_at = resume_at
            if interrupted:
                print("interrupted; continue with --resume")
                sys.exit(130)
            if done == args.stop_after:
                return
        if args.eval_every:  # -------- evaluate the final policy
            final, best_val = evaluate_and_keep_best(
                policy, tokenizer, test_problems, val_problems, args.num_iterations, best_val, args
            )
            final = {"iteration": args.num_iterations, **final}
            print(format_log(final))
            metrics_file.write(json.dumps(final) + "\n")
        print_where_results_went(args, best_val)
    except KeyboardInterrupt:
        # Ctrl-C outside an update (evaluating, sampling, estimating values): the policy holds exactly the updates of
        # the iterations before resume_at, so this checkpoint resumes there
        if saved_at != resume_at:
            save_checkpoint(checkpoint, policy, tokenizer, optimizer, scheduler, critic, args, resume_at, best_val)
        print("interrupted; continue with --resume")
        sys.exit(130)
    finally:
        metrics_file.close()


if __name__ == "__main__":
    main()
