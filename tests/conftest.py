"""Shared test fixtures: tiny tokenizers and models built in-process (nothing is downloaded)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

import train

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # the gzip-compressed JSONL shipped in the repository

# train.py options for end-to-end tests, a few seconds per iteration on 2 CPU cores: 2 prompts x 2 answers, K = 2,
# short answers, no SFT (add --model: a folder, or tiny for a random model)
TINY = (
    "--dataset arithmetic --prompts_per_iteration 2 --samples_per_prompt 2 --num_mc_rollouts 2 --max_new_tokens 48 "
    "--max_length 160 --minibatch_size 2 --micro_batch_size 1 --lr 1e-3 --eval_every 0 --eval_problems 2 "
    "--eval_samples 2 --sft_steps 0 --threads 2"
).split()

CORPUS = [
    "[MATH_TASK] Problem:\nNatalia sold clips to 48 of her friends in April.\n\nSolution:",
    "\nNatalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72\n",
    "\nWe have $x+2=5$, so $x=3$. Then $y = 2x = 6$.\nTherefore, the answer is $\\boxed{6}$.\n",
    "\n\n\nProblem: How many apples are left? 12 - 5 = 7 apples.\n#### 7\n",
]


def make_tokenizer(corpus=CORPUS, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """train.py's byte-level BPE tokenizer trained on a few lines, digits merged: <pad>=0, <bos>=1, <eos>=2, and
    tokens such as ".\n" and "#### 7" that span step boundaries."""
    return train.build_tiny_tokenizer(corpus, vocab_size, split_digits=False)


def make_model(family: str, vocab_size: int, seed: int = 0):
    """A tiny random causal LM of the given family ("llama", "qwen2" or "gpt2"), in eval mode, float32."""
    torch.manual_seed(seed)
    small = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, **small)
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, **small)
    elif family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **small)
    else:
        raise ValueError(family)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def data_dir():
    return DATA_DIR
