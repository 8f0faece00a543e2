"""Tests for benchmarks/bench_gpu.py: its --small mode runs one iteration through train.py's functions on CPU (so
the script cannot rot), the EOS hook gives the EOS probability it promises, and the synthetic tokenizer's steps."""

import functools
import math

import torch

import vine
from conftest import load_script

bench_gpu = load_script("benchmarks/bench_gpu")


def test_small_run_drives_one_iteration_of_train_py(capsys):
    threads = torch.get_num_threads()
    try:
        results = bench_gpu.main(["--small"])
    finally:
        torch.set_num_threads(threads)  # --small sets 1 thread for the process
    out = capsys.readouterr().out
    rows, vine_stats, ppo_stats = results["rows"], results["vine"], results["ppo"]
    assert set(rows) == set(bench_gpu.PHASES)
    for name in bench_gpu.PHASES:
        assert rows[name]["seconds"] > 0 and rows[name]["tokens"] > 0, name
        assert rows[name]["peak"] is None  # CPU: no peak memory statistic
        assert name in out
    answers = results["answers"]
    lengths = [len(ids) for ids in answers.response_ids]
    assert len(lengths) == 4 * 2 and rows["sample answers"]["tokens"] == sum(lengths)
    assert any(answers.finished) and len(set(lengths)) > 1  # EOS is reachable and lengths vary
    assert vine_stats["vine/mc_rollouts"] == 2 * vine_stats["vine/states_unique"]  # K = 2 per unique state
    assert rows["MC values"]["engine"]["forward_passes"] > 0 and rows["MC values"]["engine"]["host_reads"] > 0
    assert vine_stats["vine/mean_steps"] > 1  # the newline tokens make steps
    assert rows["PPO update"]["tokens"] == 2 * rows["old/ref logprobs"]["tokens"]  # 2 epochs over the episodes
    assert math.isfinite(ppo_stats["loss/total"]) and ppo_stats["ppo/skipped_minibatches"] == 0
    assert results["weight_change"] > 0  # AdamW moved the policy
    assert results["plan"]["kv_cache"] > 0 and "memory plan" in out and "engine (phase" in out


def test_eos_hook_sets_the_eos_probability_while_sampling_only():
    """Within sampling_eos; outside it (the logprob and training passes, also under no_grad) the model is unchanged."""
    config = bench_gpu.small_config()
    torch.manual_seed(0)
    model = bench_gpu.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, config.vocab_size, (2, 7))
    with torch.no_grad():
        plain = model(input_ids=ids).logits  # (2, 7, V)
    hook = functools.partial(bench_gpu.set_eos_probability, eos_token_id=2, probability=0.01, temperature=0.6)
    model.get_output_embeddings().register_forward_hook(hook)
    with torch.no_grad():  # logprob and training passes: the model is left alone
        assert torch.equal(model(input_ids=ids).logits, plain)
    with torch.no_grad(), bench_gpu.sampling_eos():  # sampling: P(EOS) at temperature 0.6 is 1 / 100 everywhere
        logits = model(input_ids=ids).logits
    probs = torch.softmax(logits / 0.6, dim=-1)  # (2, 7, V)
    assert torch.allclose(probs[..., 2], torch.full((2, 7), 0.01), atol=1e-6)
    others = torch.cat([logits[..., :2], logits[..., 3:]], dim=-1)
    assert torch.equal(others, torch.cat([plain[..., :2], plain[..., 3:]], dim=-1))  # every other logit as before


def test_synthetic_tokenizer_decodes_words_and_ends_lines_for_steps():
    tokenizer = bench_gpu.synthetic_tokenizer(vocab_size=100, newline_every=10)
    assert len(tokenizer) == 100 and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    ids = [5, 10, 11, 12, 20, 33]  # 10 and 20 end lines
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert text == " w5 w10\n w11 w12 w20\n w33"
    assert vine.token_steps(ids, vine.split_steps(text, "gsm8k"), tokenizer) == [0, 0, 1, 1, 1, 2]
