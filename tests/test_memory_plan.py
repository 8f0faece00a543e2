"""Tests for tools/memory_plan.py: its bytes against tensors measured on CPU (a tiny Llama's parameters,
gradients and AdamW state, the reference and the critic; rollout's KV-cache buffers; what autograd saves in a
forward pass; the peak of a PPO micro-batch) and against sizes computed by hand."""

import copy
import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import attention
import ppo
import rollout
from conftest import load_script

memory_plan = load_script("tools/memory_plan")


def tiny_config(**overrides) -> LlamaConfig:
    """TinyLlama's layout at toy size: GQA (4 heads, 2 KV heads of 16), SwiGLU, untied LM head."""
    kwargs = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)
    kwargs.update(num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    kwargs.update(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaConfig(**{**kwargs, **overrides})


def make_model(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def right_padded_batch(batch: int, seq_len: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask with one row padded on the right, as ppo.make_batch builds them."""
    ids = torch.randint(3, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, seq_len - 10 :] = 0
    return ids, mask


def remember_storage(storages: dict, tensor: torch.Tensor) -> torch.Tensor:
    """saved_tensors_hooks pack hook: note the bytes of the storage behind each saved tensor (views share one)."""
    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return tensor


def unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@pytest.mark.parametrize("tied", [False, True])
def test_weights_gradients_and_adamw_state_equal_a_real_model_after_one_step(tied):
    config = tiny_config(tie_word_embeddings=tied)
    model = make_model(config)
    plan = memory_plan.memory_plan(config, gpu_bytes=0, critic=True)
    assert sum(p.nbytes for p in model.parameters()) == plan["policy_weights"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.randint(3, config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert sum(p.grad.nbytes for p in model.parameters()) == plan["policy_grads"]
    optimizer.step()
    state = list(optimizer.state.values())
    assert len(state) == len(list(model.parameters()))
    assert {key for s in state for key in s} == {"step", "exp_avg", "exp_avg_sq"}  # step: one scalar each
    assert sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes for s in state) == plan["adam_moments"]
    # the reference as train.load_models makes it on CUDA (ppo.store_in_bf16), the critic as train.load_critic
    reference = copy.deepcopy(model)
    ppo.store_in_bf16(reference)
    assert sum(p.nbytes for p in reference.parameters()) == plan["reference"]
    assert sum(p.nbytes for p in ppo.ValueModel(copy.deepcopy(model)).parameters()) == plan["critic_weights"]


def test_parameter_counts_of_the_table_models_equal_hugging_face_models_and_a_hand_count():
    # 1.1B: embedding and LM head 32000 x 2048 each; per layer q, o 2048^2, k, v 2048 x 256, MLP 3 x 2048 x 5632,
    # two norms 2 x 2048: 44,044,288 x 22 layers; final norm 2048
    tiny_llama = 2 * 32000 * 2048 + 22 * (2 * 2048**2 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048) + 2048
    # 7B: 2 x 102400 x 4096; per layer 4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096 = 202,383,360 x 30; final norm
    seven_b = 2 * 102400 * 4096 + 30 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    assert (tiny_llama, seven_b) == (1_100_048_384, 6_910_365_696)
    for config, expected in [
        (memory_plan.tinyllama_config(), tiny_llama),
        (memory_plan.deepseekmath_7b_config(), seven_b),
    ]:
        with torch.device("meta"):  # the real module tree, no memory
            model = AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == memory_plan.parameter_counts(config)["total"] == expected


@pytest.mark.parametrize("autocast", [False, True])
def test_kv_cache_bytes_equal_rollouts_pool(autocast):
    """The pool rollout.sample makes for a budget of max_batch_tokens (more prefixes than it holds), in the compute
    dtype: bf16 under autocast."""
    config = tiny_config()
    model = make_model(config).eval()
    prefixes = [[1, 3 + i] + list(range(50, 90)) for i in range(40)]  # 40 roots of 2 blocks, 2 rows of 4 blocks each
    roots = rollout.find_roots(prefixes)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        cache = rollout.make_cache(model, prefixes, roots, [100] * 40, 2, 1000, torch.device("cpu"))
    plan = memory_plan.memory_plan(config, gpu_bytes=0, max_batch_tokens=1000, bf16=autocast)
    assert sum(pool.nbytes for pool in cache.layers) == plan["kv_cache"]
    assert cache.layers[0].dtype == (torch.bfloat16 if autocast else torch.float32)


def test_kv_bytes_per_token_by_hand():
    # keys and values x layers x KV heads x head dim x 2 bytes under autocast (bf16 cache), 4 in float32
    assert memory_plan.kv_bytes_per_token(memory_plan.tinyllama_config(), bf16=True) == 2 * 22 * 4 * 64 * 2 == 22_528
    assert memory_plan.kv_bytes_per_token(memory_plan.tinyllama_config(), bf16=False) == 2 * 22 * 4 * 64 * 4
    assert memory_plan.kv_bytes_per_token(memory_plan.deepseekmath_7b_config(), bf16=True) == 2 * 30 * 32 * 128 * 2
    config = memory_plan.tinyllama_config()
    assert memory_plan.kv_bytes_per_token(config, True) == attention.kv_bytes_per_token(config, torch.bfloat16)
    plan = memory_plan.memory_plan(config, gpu_bytes=0, max_batch_tokens=2**18)
    assert plan["kv_cache"] == 22_528 * (2**18 + 32)  # 8,192 blocks of 32 tokens and the scratch block: 5.9 GB


def test_the_default_kv_cache_is_the_engines_rule_on_the_gpu_it_plans():
    """rollout.default_budget on CUDA: KV_MEMORY_FRACTION of the free memory less the bf16 weight copies and a step's
    logits; the plan's free memory when sampling starts is the GPU's minus the context, the fixed state and (several
    GPUs) the gathered weights. What it takes fits the sampling peak."""
    config = memory_plan.tinyllama_config()
    for gib in (24, 40, 80):
        plan = memory_plan.memory_plan(config, gpu_bytes=gib * 2**30)
        free = plan["usable"] - plan["fixed"] - 2 * 1_100_048_384 - 40 * 1024 * 32000
        assert plan["kv_default_tokens"] == int(rollout.KV_MEMORY_FRACTION * free) // (2 * 22 * 4 * 64 * 2)
        at_default = memory_plan.memory_plan(config, gpu_bytes=gib * 2**30, max_batch_tokens=plan["kv_default_tokens"])
        assert at_default["sampling_peak"] <= at_default["usable"]
    assert 2_000_000 < plan["kv_default_tokens"] < 3_000_000  # ~2.6M tokens, 55 GiB, on an 80 GB GPU at 1.1B


@pytest.mark.parametrize("autocast", [False, True])
def test_activation_bytes_equal_what_autograd_saves(autocast):
    """Without checkpointing, the layers' activations and (under autocast) the bf16 weight copies are exactly the
    tensors autograd saves in the forward pass (CPU autocast casts the same ops to bf16 as CUDA's for this model)."""
    config = tiny_config()
    model = make_model(config).train()
    ppo.float32_head(model)  # as train.load_models: the head's input and weight stay float32
    batch, seq_len = 3, 40
    ids, mask = right_padded_batch(batch, seq_len, config.vocab_size)
    storages = {}
    hooks = torch.autograd.graph.saved_tensors_hooks(functools.partial(remember_storage, storages), unchanged)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), hooks:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved by reference, not copies
    saved = sum(nbytes for ptr, nbytes in storages.items() if ptr not in parameters)
    plan = memory_plan.memory_plan(
        config, gpu_bytes=0, micro_batch_size=batch, seq_len=seq_len, bf16=autocast, gradient_checkpointing=False
    )
    assert saved == plan["activations_full"] + plan["autocast_weights"]
    if autocast:  # 34 h + 8 i + 4 a + 8 + 2 s bytes per token and layer (the module docstring)
        assert memory_plan.layer_activation_bytes(config, seq_len, bf16=True) == 34 * 64 + 8 * 176 + 4 * 4 + 8 + 2 * 40


def token_logprobs_pass(model, ids, mask, *, autocast: bool, training: bool) -> None:
    """A micro-batch as train.py runs it: in eval mode without gradients (old/ref logprobs), or in train mode with
    the entropy and a backward pass outside the autocast block (ppo.ppo_loss's gradient has the same shapes)."""
    model.train(training)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(training):
        out = ppo.token_logprobs(model, ids, mask, 0.6, return_entropy=training)
    if training:
        out[0].sum().backward()


def tracked_peak(mem_tracker, model, *args, **kwargs) -> int:
    """Peak bytes of live CPU tensors during token_logprobs_pass, weights and gradients included."""
    tracker = mem_tracker.MemTracker()
    tracker.track_external(model)
    with tracker:
        token_logprobs_pass(model, *args, **kwargs)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("checkpointing, autocast", [(True, True), (False, False)])  # train.py on CUDA; on CPU
def test_ppo_micro_batch_and_logprob_peaks_match_torch_memtracker(checkpointing, autocast):
    """The peak of a no_grad logprob pass and of a PPO micro-batch (forward + backward, gradients already there),
    measured by torch's MemTracker (live tensors on CPU), within 2% of the plan. The vocabulary is large next to the
    hidden size so that the logits dominate, as for the 1.1B model."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")  # a private torch tool
    config = tiny_config(vocab_size=1000)
    model = make_model(config)
    ppo.float32_head(model)  # as train.load_models
    if checkpointing:
        model.activation_checkpointing_enable()
    batch, seq_len = 3, 48
    ids, mask = right_padded_batch(batch, seq_len, config.vocab_size)
    weights = sum(p.nbytes for p in model.parameters())  # as many bytes again in gradients once they exist
    plan = memory_plan.memory_plan(
        config,
        gpu_bytes=0,
        micro_batch_size=batch,
        seq_len=seq_len,
        gradient_checkpointing=checkpointing,
        reference=False,
        bf16=autocast,
    )
    logprobs_peak = tracked_peak(mem_tracker, model, ids, mask, autocast=autocast, training=False)
    token_logprobs_pass(model, ids, mask, autocast=autocast, training=True)  # the gradients of a first micro-batch
    training_peak = tracked_peak(mem_tracker, model, ids, mask, autocast=autocast, training=True)
    planned_logprobs = plan["logprobs_peak"] - plan["adam_moments"]  # no optimizer here, and no gradient yet
    planned_training = plan["training_peak"] - plan["adam_moments"]
    assert logprobs_peak - weights == pytest.approx(planned_logprobs - weights, rel=0.02)
    assert training_peak - 2 * weights == pytest.approx(planned_training - 2 * weights, rel=0.02)


def test_a_7b_model_does_not_fit_one_80gb_gpu_and_the_1b_fits_at_the_paper_settings():
    seven_b, tiny_llama = memory_plan.deepseekmath_7b_config(), memory_plan.tinyllama_config()
    plan = memory_plan.memory_plan(seven_b, gpu_bytes=80 * 2**30)
    float32 = 2 * 102400 * 4096 + (2 * 30 + 1) * 4096  # the embedding, the LM head and the RMSNorm weights
    reference = 2 * (6_910_365_696 - float32) + 4 * float32  # the layers' matmul weights in bf16
    assert plan["fixed"] == (4 + 8) * 6_910_365_696 + reference  # float32 weights, AdamW moments, the reference
    assert plan["fixed"] > plan["usable"] and memory_plan.fit_status(plan["peak"], plan["usable"]) == "no"
    assert memory_plan.largest_fitting(seven_b, 80 * 2**30) == (None, None)
    plan = memory_plan.memory_plan(tiny_llama, gpu_bytes=80 * 2**30)  # micro-batch 8, 2048 tokens, 2^18 KV tokens
    assert memory_plan.fit_status(plan["peak"], plan["usable"]) == "yes"
    without = memory_plan.memory_plan(tiny_llama, gpu_bytes=80 * 2**30, gradient_checkpointing=False)
    assert plan["training_peak"] < without["training_peak"]
    assert plan["activations_checkpointed"] < plan["activations_full"]
    with_critic = memory_plan.memory_plan(tiny_llama, gpu_bytes=80 * 2**30, critic=True)
    critic_params = 1_100_048_384 - 32000 * 2048 + 2048 + 1  # the transformer without the LM head, + value head
    assert with_critic["fixed"] - plan["fixed"] == 12 * critic_params


def test_cli_prints_the_table_and_reads_a_local_config(tmp_path, capsys):
    memory_plan.main([])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("1.1B ", "7B "))]
    assert len(rows) == 2 * 3 * 2 + 3 * 2  # models x GPU sizes x (vine, critic), then the torchrun table's 3 runs
    assert "Sharded under torchrun (FSDP2)" in out and any(r.split()[:3] == ["7B", "8", "vine"] for r in rows)
    assert "1.100B parameters" in out and "6.910B parameters" in out
    tiny_config().save_pretrained(tmp_path / "tiny")
    memory_plan.main(["--model", str(tmp_path / "tiny"), "--gpu-gb", "24"])
    out = capsys.readouterr().out
    count = memory_plan.parameter_counts(tiny_config())["total"]
    assert f"tiny: {count / 1e9:.3f}B parameters" in out
    assert len([line for line in out.splitlines() if line.startswith("tiny ")]) == 2


def test_the_papers_7b_run_fits_8_gpus_of_80_gb_with_the_documented_settings():
    """docs/torchrun.md's command: DeepSeekMath-7B on 8 x 80 GB, --micro-batch-size 4 --max-batch-tokens 32768; on one
    GPU the same run does not fit at any setting."""
    config = memory_plan.deepseekmath_7b_config()
    plan = memory_plan.memory_plan(config, gpu_bytes=80 * 2**30, gpus=8, micro_batch_size=4, max_batch_tokens=32768)
    assert memory_plan.fit_status(plan["peak"], plan["usable"]) == "yes", plan["peak"] / 2**30
    assert memory_plan.largest_fitting(config, 80 * 2**30) == (None, None)
    one = memory_plan.memory_plan(config, gpu_bytes=80 * 2**30)
    assert plan["fixed"] == pytest.approx(one["fixed"] / 8, rel=1e-6)  # the shards: 1/8 of one GPU's fixed state


# ---------------------------------------------------------------------------------------------------------------------
# bad input: refused by argparse in one line with exit code 2, never a traceback nor a plan of a GPU that cannot be


def refusal(capsys, argv: list[str]) -> str:
    """memory_plan.main(argv) must stop with exit code 2 and an error line last on stderr; returns that line."""
    with pytest.raises(SystemExit) as stop:
        memory_plan.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "error: " in err.strip().splitlines()[-1] and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "option",
    [
        ("--gpus", "0"),  # divided by zero
        ("--gpus", "-2"),  # negative shards: "fits: yes"
        ("--gpu-gb", "0"),
        ("--gpu-gb", "80", "-24"),
        ("--micro-batch-size", "0"),  # "fits: yes"
        ("--seq-len", "-10"),
        ("--max-batch-tokens", "0"),
    ],
    ids=" ".join,
)
def test_sizes_below_one_are_refused(capsys, option):
    assert f"argument {option[0]}: must be at least 1" in refusal(capsys, list(option))


CONFIGS = {  # a config.json -> what the refusal names
    "zero-layers": (dict(num_hidden_layers=0), "num_hidden_layers is 0"),  # printed as "fits: yes"
    "negative-layers": (dict(num_hidden_layers=-3), "num_hidden_layers is -3"),
    "zero-heads": (dict(num_attention_heads=0), "ZeroDivisionError"),  # transformers' own check divides by it
    "no-intermediate-size": (dict(intermediate_size=None), "intermediate_size"),  # as a GPT-2 config has none
    "too-many-kv-heads": (dict(num_key_value_heads=8), "num_key_value_heads"),
    "unknown-type": (dict(model_type="no-such-model"), "transformers cannot read it"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_a_config_without_positive_sizes_is_refused_naming_them(tmp_path, capsys, name):
    change, named = CONFIGS[name]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({**tiny_config().to_dict(), **change}))
    line = refusal(capsys, ["--model", str(tmp_path / "model"), "--gpu-gb", "24"])
    assert "--model" in line and named in line


def test_a_config_that_is_not_json_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{")
    assert "transformers cannot read it" in refusal(capsys, ["--model", str(tmp_path / "config.json")])
