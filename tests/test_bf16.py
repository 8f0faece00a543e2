"""The one-GPU code path on CPU. A CUDA run turns on --bf16 (autocast of every forward pass, float32 master weights and
logits, a reference whose matmul weights are bf16) and --gradient-checkpointing by default; asked for on CPU they run
the same code, so CI checks all of it but the CUDA kernels and the memory (benchmarks/gpu_check.py runs those on a
GPU)."""

import json

import pytest
import torch
from conftest import TINY, make_model, parity
from transformers import AutoModelForCausalLM

import ppo
import reward
import rollout
import train

ESTIMATORS = ("vine", "critic", "grpo", "rloo")
GPU_PATH = ["--bf16", "--gradient_checkpointing"]
DIAGNOSTIC = ["--value_diagnostic", "2", "--diagnostic_rollouts", "4"]
ARGV = TINY + ["--num_iterations", "2", "--samples_per_prompt", "4", "--minibatch_size", "4"]
# Sampler (KV cache, one token at a time) against trainer (one full forward pass) logprobs of the same tokens under
# bf16 autocast on CPU, on the tiny random models (logits near 0): at most 0.0064 here over 10 seeds x 3 families
# (float32: 1e-6). On the real 135M model, whose logits are large, the difference is larger (tests/test_real_model.py).
BF16_LOGPROB_TOLERANCE = 0.02


def start(sft_model) -> list[str]:
    """ARGV from the tiny SFT model (conftest.sft_model): it stops with EOS, so the stand-in reward gives signal."""
    return ARGV + ["--model", str(sft_model)]


def metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def weights(folder) -> dict:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_model) -> dict:
    """A 2-iteration CLI run of each estimator on the GPU's code path, with the value diagnostic for vine and critic."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reward, "grade", parity)
        for advantage in ESTIMATORS:
            run_dir = tmp_path_factory.mktemp(advantage)
            diagnostic = DIAGNOSTIC if advantage in ("vine", "critic") else []
            train.main(start(sft_model) + GPU_PATH + diagnostic + ["--advantage", advantage, "--run_dir", str(run_dir)])
            out[advantage] = run_dir
    return out


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ESTIMATORS)
def test_each_estimator_trains_under_bf16_and_checkpointing(runs, sft_model, advantage):
    rows = metrics(runs[advantage])
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ("loss/total", "loss/policy", "grad_norm", "kl/ref"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert any(r["advantages/zero_frac"] < 1.0 for r in rows), "the stand-in reward should give some signal"
    init, trained = weights(sft_model), weights(runs[advantage] / "checkpoint")
    assert any(not torch.equal(init[k], trained[k]) for k in init), "nothing was trained"
    if advantage in ("vine", "critic"):  # the value diagnostic ran under autocast too
        assert all(r["diag/states"] > 0 and 0 <= r["diag/mc_mae"] <= 1 for r in rows)
    if advantage == "critic":
        assert all(0 <= r["diag/critic_mae"] < 10 and torch.isfinite(torch.tensor(r["critic/loss"])) for r in rows)


@pytest.mark.slow
def test_the_options_turn_on_autocast_the_bf16_reference_and_checkpointing(tmp_path, sft_model):
    args = train.parse_args(start(sft_model) + GPU_PATH + ["--advantage", "critic", "--run_dir", str(tmp_path)])
    assert args.device == "cpu" and args.bf16 and args.gradient_checkpointing
    defaults = train.parse_args(start(sft_model) + ["--run_dir", str(tmp_path)])
    assert not defaults.bf16 and not defaults.gradient_checkpointing  # CPU's defaults; CUDA's are on (test_cuda.py)
    policy, reference, _ = train.load_models(args, train.load_data(args)[0])
    critic = train.load_critic(args)
    assert policy.is_activation_checkpointing and critic.model.body.is_activation_checkpointing
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # float32 master weights
    linear = [m for m in reference.modules() if isinstance(m, torch.nn.Linear) and m is not reference.lm_head]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)  # what autocast casts anyway
    with train.autocast(args):
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.bfloat16
    with train.autocast(defaults):
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_weights(tmp_path, runs, sft_model, monkeypatch):
    monkeypatch.setattr(reward, "grade", parity)
    argv = start(sft_model) + GPU_PATH + DIAGNOSTIC + ["--run_dir", str(tmp_path)]
    train.main(argv + ["--stop_after", "1"])
    train.main(argv + ["--resume"])
    assert metrics(tmp_path) == metrics(runs["vine"])
    whole, parts = weights(runs["vine"] / "checkpoint"), weights(tmp_path / "checkpoint")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


@pytest.mark.slow
def test_checkpointing_changes_no_number(tmp_path, runs, sft_model, monkeypatch):
    """Recomputing the activations in the backward pass gives the same gradients: the run without it is identical
    (measured bit for bit here; the bound allows other CPUs' kernels float noise)."""
    monkeypatch.setattr(reward, "grade", parity)
    train.main(start(sft_model) + ["--bf16"] + DIAGNOSTIC + ["--run_dir", str(tmp_path)])
    without, with_ = metrics(tmp_path), metrics(runs["vine"])
    assert [r.keys() for r in without] == [r.keys() for r in with_]
    for a, b in zip(without, with_):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    a, b = weights(tmp_path / "checkpoint"), weights(runs["vine"] / "checkpoint")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def logprob_gap(family: str, device: str) -> float:
    """The largest |sampler - trainer| logprob of the same tokens under bf16 autocast on device: 3 tiny random models
    of the family, 2 prompts x 3 answers of up to 10 tokens each (tests/test_cuda.py runs it on CUDA)."""
    worst = 0.0
    for seed in range(3):
        model = make_model(family, 320, seed=seed).to(device)
        gen = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (5, 11)]
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = rollout.sample(model, prompts, num_samples=3, max_new_tokens=10, temperature=0.6, top_p=0.9,
                                 eos_token_id=2, generator=gen)
            for row, (ids, logprobs) in enumerate(zip(out.response_ids, out.logprobs)):
                prompt = prompts[row // 3]
                seq = torch.tensor([prompt + ids], device=device)
                with torch.no_grad():
                    trainer = ppo.token_logprobs(model, seq, torch.ones_like(seq), 0.6)[0, len(prompt) - 1 :]
                assert logprobs.dtype == torch.float32 and trainer.dtype == torch.float32
                worst = max(worst, float((logprobs.to(device) - trainer).abs().max()))
    return worst


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sampler_and_trainer_logprobs_agree_under_bf16_autocast(family):
    worst = logprob_gap(family, "cpu")
    assert 0 < worst <= BF16_LOGPROB_TOLERANCE, worst  # > 0: autocast did change the arithmetic


def peaked_model_folder(folder, tokenizer, family: str = "llama"):
    """A tiny random model whose logits are large, as a trained model's are (the output layer scaled up: tiny random
    models have logits near 0, which hide bf16 rounding), saved with its tokenizer for train.load_models."""
    model = make_model(family, len(tokenizer), positions=1024)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_under_bf16_the_reference_scores_tokens_as_the_policy_does(tmp_path, tokenizer, family):
    """The KL to the reference is 0 at iteration 0: the policy and the reference as train.load_models builds them
    under --bf16 give the same logprobs on 700-token sequences (the reference's bf16 Linear weights are what autocast
    casts the policy's to), the rotary buffers stay float32, and the output layer hands float32 logits on."""
    folder = peaked_model_folder(tmp_path / "model", tokenizer, family)
    args = train.parse_args(TINY + ["--model", str(folder), "--bf16", "--run_dir", str(tmp_path / "run")])
    policy, reference, _ = train.load_models(args, [])
    head = reference.get_output_embeddings()
    assert all(b.dtype == torch.float32 for b in reference.buffers()) and head.weight.dtype == torch.float32
    assert {m.weight.dtype for m in reference.modules() if isinstance(m, torch.nn.Linear) and m is not head} == {
        torch.bfloat16}
    ids = torch.randint(3, len(tokenizer), (3, 700), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), train.autocast(args):
        logits = policy(ids).logits
        logprobs, ref_logprobs = (ppo.token_logprobs(m, ids, torch.ones_like(ids), 0.6) for m in (policy, reference))
        hidden = policy.model(ids).last_hidden_state  # the final norm's output, float32
    assert logits.dtype == torch.float32 and logits.abs().mean() > 1, "large float32 logits"
    with torch.no_grad():
        assert torch.allclose(logits, torch.nn.functional.linear(hidden.float(), policy.lm_head.weight), atol=1e-4)
    gap = (logprobs - ref_logprobs).abs()
    assert float(gap.mean()) <= 1e-4 and float(gap.max()) <= 1e-6  # before: mean 0.05, max 0.3
