"""What only a CUDA GPU can check (marker cuda; skipped without one): benchmarks/gpu_check.py runs these with
python -m pytest -m cuda. tests/test_bf16.py checks the same code path on CPU."""

import json

import pytest
import torch
from conftest import TINY, make_model
from test_bf16 import BF16_LOGPROB_TOLERANCE, parity
from transformers import AutoModelForCausalLM

import ppo
import reward
import rollout
import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_defaults_turn_on_bf16_and_checkpointing(tmp_path):
    args = train.parse_args(TINY + ["--model", "tiny", "--device", "cuda", "--run_dir", str(tmp_path)])
    assert args.bf16 and args.gradient_checkpointing
    with train.autocast(args):
        x = torch.ones(2, 2, device="cuda")
        assert x.mm(x).dtype == torch.bfloat16


def test_sampler_and_trainer_logprobs_agree_under_cuda_autocast():
    worst = 0.0
    for seed in range(3):
        model = make_model("llama", 320, seed=seed).cuda()
        gen = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (5, 11)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = rollout.sample(model, prompts, num_samples=3, max_new_tokens=10, temperature=0.6, top_p=0.9,
                                 eos_token_id=2, generator=gen)
            for row, (ids, logprobs) in enumerate(zip(out.response_ids, out.logprobs)):
                prompt = prompts[row // 3]
                seq = torch.tensor([prompt + ids], device="cuda")
                with torch.no_grad():
                    trainer = ppo.token_logprobs(model, seq, torch.ones_like(seq), 0.6)[0, len(prompt) - 1 :]
                worst = max(worst, float((logprobs.cuda() - trainer).abs().max()))
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
