"""What only a CUDA GPU can check (marker cuda; skipped without one): benchmarks/gpu_check.py runs these with
python -m pytest -m cuda. tests/test_bf16.py checks the same code path on CPU."""

import json

import pytest
import torch
from conftest import TINY, parity
from test_distributed import torchrun
from test_bf16 import BF16_LOGPROB_TOLERANCE, logprob_gap
from transformers import AutoModelForCausalLM

import reward
import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_defaults_turn_on_bf16_and_checkpointing(tmp_path):
    args = train.parse_args(TINY + ["--model", "tiny", "--device", "cuda", "--run_dir", str(tmp_path)])
    assert args.bf16 and args.gradient_checkpointing
    with train.autocast(args):
        x = torch.ones(2, 2, device="cuda")
        assert x.mm(x).dtype == torch.bfloat16


def test_sampler_and_trainer_logprobs_agree_under_cuda_autocast():
    worst = logprob_gap("llama", "cuda")
    print(f"CUDA bf16: sampler - trainer logprobs, max |difference| {worst:.4f}")
    assert worst <= BF16_LOGPROB_TOLERANCE, worst


@pytest.mark.parametrize("advantage", ["vine", "critic"])
def test_two_iterations_on_cuda(tmp_path, monkeypatch, advantage):
    monkeypatch.setattr(reward, "grade", parity)
    argv = TINY + ["--model", "tiny", "--device", "cuda", "--num_iterations", "2", "--samples_per_prompt", "4",
                   "--minibatch_size", "4", "--value_diagnostic", "2", "--advantage", advantage]
    train.main(argv + ["--run_dir", str(tmp_path)])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    init = AutoModelForCausalLM.from_pretrained(tmp_path / "init").state_dict()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("advantage", ["vine", "critic"])
def test_two_gpus_shard_with_fsdp2_over_nccl(tmp_path, advantage):
    """torchrun on 2 GPUs (NCCL, bf16 autocast, checkpointing): the policy, critic and reference sharded with FSDP2;
    2 iterations, a checkpoint that from_pretrained loads, and a resume that continues it."""
    argv = TINY + ["--model", "tiny", "--device", "cuda", "--num_iterations", "2", "--samples_per_prompt", "4",
                   "--minibatch_size", "4", "--threads", "1", "--advantage", advantage, "--run_dir", str(tmp_path)]
    first = torchrun(2, *argv, "--stop_after", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, *argv, "--resume", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1] and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bf16", [False, True])
def test_the_engine_on_cuda_draws_the_same_with_any_budget(tokenizer, bf16):
    """rollout.sample on the GPU (blocks, refills, preemption by recomputation): greedy tokens of nested prefixes with
    a budget of a few blocks equal those with room for everything, in float32; under bf16 most rows decode alike and
    their logprobs agree within bf16's rounding."""
    import rollout
    from conftest import make_model

    model = make_model("qwen2", len(tokenizer)).cuda()
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, len(tokenizer), (60,), generator=g).tolist()
    prefixes = [base[:1], base[:20], base[:45], base, [5, 6, 7] + base[:30]]
    kwargs = dict(num_samples=9, max_new_tokens=40, temperature=0.0, top_p=1.0, eos_token_id=2)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        roomy, tight = (rollout.sample(model, prefixes, max_batch_tokens=b, **kwargs) for b in (1 << 16, 256))
    assert tight.stats["preempted_rows"] > 0 or tight.stats["prefill_passes"] > roomy.stats["prefill_passes"]
    if not bf16:
        assert tight.response_ids == roomy.response_ids
    same = [(a, b) for a, b, x, y in zip(tight.logprobs, roomy.logprobs, tight.response_ids, roomy.response_ids)
            if x == y]
    assert len(same) >= len(prefixes), "most rows should decode alike"
    gap = max(float((a - b).abs().max()) for a, b in same if len(a))
    assert gap < (BF16_LOGPROB_TOLERANCE if bf16 else 1e-4), gap


def test_under_cuda_bf16_the_reference_scores_as_the_policy_on_a_model_with_large_logits(tmp_path, tokenizer):
    """train.load_models on CUDA (--bf16 by default): the policy and the reference give the same logprobs at
    iteration 0 on a model whose logits are large (the tiny random models' are near 0 and hide rounding), and the
    logits are float32."""
    from test_bf16 import peaked_model_folder

    import ppo

    folder = peaked_model_folder(tmp_path / "model", tokenizer)
    args = train.parse_args(TINY + ["--model", str(folder), "--device", "cuda", "--run_dir", str(tmp_path / "run")])
    policy, reference, _ = train.load_models(args, [])
    ids = torch.randint(3, len(tokenizer), (3, 700), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad(), train.autocast(args):
        assert policy(ids).logits.dtype == torch.float32
        a, b = (ppo.token_logprobs(m, ids, torch.ones_like(ids), 0.6) for m in (policy, reference))
    gap = (a - b).abs()
    print(f"CUDA bf16: policy - reference logprobs, mean |difference| {float(gap.mean()):.2e}")
    assert float(gap.mean()) <= 1e-4
