"""Memory plan: the GPU memory train.py needs, phase by phase, and which settings fit a 1.1B or a 7B model on one GPU.

    python tools/memory_plan.py                      # 1.1B and 7B on 24/40/80 GB GPUs: components and fits
    python tools/memory_plan.py --model PATH         # a local Hugging Face config (a folder or its config.json)
    python tools/memory_plan.py --micro-batch-size 4 --seq-len 1024 --max-batch-tokens 65536 --critic
    python tools/memory_plan.py --gpus 8 --gpu-gb 80               # per GPU, sharded over 8 GPUs (torchrun, FSDP2)

memory_plan(config, gpu_bytes=...) returns bytes per component and the peak of each phase of one train.py iteration
(docs/paper.md §1.1): sampling (answers and MC rollouts, rollout.sample), the old and reference logprobs
(train.old_and_ref_logprobs), the PPO micro-batches (forward + backward) and the AdamW step. It counts what
torch.cuda.max_memory_allocated counts, live tensors; benchmarks/bench_gpu.py measures that on a GPU beside the plan.

Letters: P parameters, h hidden size, i intermediate size, a attention heads, g key/value heads, d head dim, L layers,
V vocabulary, n = micro_batch x seq_len tokens, E = micro_batch x (seq_len - 1) x V logits.

What each phase holds (train.py on CUDA: float32 weights, bf16 autocast, --bf16 and --gradient-checkpointing on):
  fixed        policy weights 4P (float32), AdamW moments 8P (exp_avg, exp_avg_sq; from the first step on),
               the frozen reference (ppo.store_in_bf16: its matmul weights but the LM head's in bf16, the rest
               float32; none when --kl-coef 0), and with --advantage critic the critic's weights and moments
               12 P_critic (ppo.ValueModel: the transformer without its LM head, plus a hidden -> 1 head).
  sampling     + the KV cache, max_batch_tokens (rounded up to blocks, + one scratch block) x kv_bytes_per_token
               (attention.BlockCache; rollout.default_budget: on CUDA without --max-batch-tokens,
               KV_MEMORY_FRACTION of the memory free then less the weight copies and logits below:
               kv_default_tokens), + one prefill pass's own cache (rollout.prefill:
               rollout.PREFILL_BATCH_TOKENS tokens), + bf16 copies of the matmul weights (autocast caches them for
               the sampling call), + the decode step's float32 logits and top-p buffers, ~40 bytes per row and
               vocabulary entry (an estimate, not measured) for at most scheduler.MAX_ROWS rows.
  logprobs     + bf16 copies of every matmul weight but the LM head's (autocast caches them for the whole no_grad
               block; the head runs in float32, ppo.float32_head) + the logits (+ one float32 hidden state with
               checkpointing on: the cost of its enable_input_require_grads hook).
  PPO          + gradients 4P (and the critic's) + the activations saved for backward + the logits, at the worse of
               three moments: the end of the forward, the LM head's backward, one checkpointed layer's recompute.
  AdamW step   + gradients + one float32 temporary per parameter (torch's foreach AdamW computes sqrt(exp_avg_sq)
               for all parameters at once, torch/optim/adam.py _multi_tensor_adam).

How the activations are counted (checked on CPU in tests/test_memory_plan.py against the tensors autograd saves):
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (§4.1), count the bytes each
op of a GPT layer saves for backward: 34 s b h + 5 a s^2 b with 16-bit activations and dropout. We redo that count
for Hugging Face's Llama layer as it runs here: bf16 autocast over float32 weights, RMSNorm and the residual stream
in float32, no dropout, SDPA attention (no s^2 scores, but the padding mask is saved per layer), SwiGLU MLP. Per token
and layer, in bytes (w = 2 under autocast, 4 in float32):
    16 h + 8                 float32 layer input and its normalised copy, the same after attention, two 1/rms
    10 h  (float32: 8 h)     autocast's bf16 cast of the norm output, once per projection (q, k, v; gate, up)
    4 w a d + 4 a + w s      q, k and v (k, v repeated to all heads: a mask rules out SDPA's GQA path), the output,
                             a float32 log-sum-exp per head, the padding mask as an additive bias (B, 1, s, s)
    4 w i                    gate output, SiLU output, up output, their product
i.e. 34 h + 8 i + 4 a + 8 + 2 s under autocast when a d = h. Gradient checkpointing (non-reentrant, Hugging Face's
default) keeps only each layer's float32 input (4 h) and recomputes one layer at a time in the backward pass.
The logits: the LM head's float32 output (4 n V: it runs outside autocast, ppo.float32_head) and the tempered
logits / T (4 E) at the end of the forward (ppo.token_logprobs); in the backward 20 E: the saved tempered logits plus
the float32 temporaries of the logsumexp and gather gradients. The PPO micro-batch and logprob peaks agree with
torch's MemTracker on CPU within 2% (tests/test_memory_plan.py); the same composite ops run on CUDA.

Several GPUs (--gpus N, torchrun; distributed.py): FSDP2 shards the weights, gradients, AdamW moments and temporary,
and the reference, so each GPU holds 1/N of them (SHARDED; tests/test_distributed.py measures half on 2 ranks). On
top: the whole policy while sampling, which runs on gathered weights (and the whole critic for its values, after the
sampling: --advantage critic); the whole policy and reference
for the logprobs; in the PPO micro-batch the root's weights (embedding, final norm, LM head), two layers' (the one
running and the next, prefetched) and one layer's unreduced gradients (gathered_bytes). Not counted: NCCL's own
buffers (a few hundred MB), and the CPU memory of loading (every rank reads the float32 model before sharding it).

The KV cache is stored in the compute dtype: bf16 under autocast (the attention's products cast the keys and values
to it anyway), so a cached token costs 2 x L x g x d x 2 bytes, float32 2 x L x g x d x 4.

"Fits": the planned peak is at most 90% of the GPU minus RESERVED (the CUDA context and cuBLAS workspaces live outside
PyTorch's allocator); "tight": within that 10%, where the caching allocator's fragmentation may still run out.

Not counted: the prefill's forward activations (passes of <= rollout.PREFILL_BATCH_TOKENS tokens), the critic's own
forward and backward (smaller than the policy's: no logits), CUDA-side padding of the attention mask and log-sum-exp
to multiples of 16 or 32. All are small next to what is counted for the settings in the table. The GPU sizes are
nominal: an "80 GB" H100 shows about 79.6 GiB to CUDA.
"""

import argparse
import os
import sys

from transformers import AutoConfig, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rollout  # noqa: E402  the engine's constants: one source of truth
import scheduler  # noqa: E402
from attention import BLOCK  # noqa: E402

GiB = 2**30
RESERVED = GiB  # CUDA context, cuBLAS workspaces: outside torch's allocator
GPU_SIZES_GB = (24, 40, 80)  # GPU memory sizes as sold, in GiB (24 GB = 24 GiB on an RTX 4090, 80 GB on an A100/H100)
MICRO_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # divisors of the paper's minibatch of 64 episodes
MAX_BATCH_TOKENS = tuple(2**k for k in range(12, 22))  # 4096 .. 2097152 cached tokens


def tinyllama_config() -> LlamaConfig:
    """RhoMath-1.1B's architecture: the TinyLlama-1.1B Llama config (docs/paper.md §9)."""
    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def deepseekmath_7b_config() -> LlamaConfig:
    """DeepSeekMath-7B's architecture (a Llama-7B with a 102400-token vocabulary, no GQA)."""
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=30,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=102400,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=100000,
        eos_token_id=100001,
    )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def parameter_counts(config) -> dict[str, int]:
    """Parameters of a Llama-style causal LM: total, in matmuls (what autocast casts to bf16), of the LM head, and
    of the critic (ppo.ValueModel: the transformer without the LM head + a hidden -> 1 head with bias).

    Per layer: q (h x a d), k and v (h x g d each), o (a d x h), gate, up and down (3 h i), two RMSNorm weights (2 h),
    plus biases where attention_bias / mlp_bias are set. Then the embedding V h, the final norm h, the LM head V h
    (none of its own when tie_word_embeddings)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * head_dim(config), kv_heads(config) * head_dim(config)
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv + h if getattr(config, "attention_bias", False) else 0)
    mlp = 3 * h * i + (2 * i + h if getattr(config, "mlp_bias", False) else 0)
    layer_matmuls = h * q + 2 * h * kv + q * h + 3 * h * i
    tied = getattr(config, "tie_word_embeddings", False)
    total = config.num_hidden_layers * (attention + mlp + 2 * h) + v * h + h + (0 if tied else v * h)
    return {
        "total": total,
        "matmul": config.num_hidden_layers * layer_matmuls + v * h,  # the LM head multiplies even when tied
        "lm_head": v * h,
        "critic": total - (0 if tied else v * h) + h + 1,
    }


def kv_bytes_per_token(config, bf16: bool) -> int:
    """Bytes one cached token costs in rollout's KV cache (attention.BlockCache): keys and values of every layer, in
    the compute dtype: 2 x L x g x d x (2 under autocast, else 4)."""
    return 2 * config.num_hidden_layers * kv_heads(config) * head_dim(config) * (2 if bf16 else 4)


def layer_activation_bytes(config, seq_len: int, bf16: bool) -> int:
    """Bytes one decoder layer saves for backward per token, without checkpointing (module docstring)."""
    h, i, a = config.hidden_size, config.intermediate_size, config.num_attention_heads
    q, w = a * head_dim(config), 2 if bf16 else 4
    residual = 4 * 4 * h + 2 * 4  # float32: input, normalised input, after attention, normalised again; two 1/rms
    matmul_inputs = 5 * 2 * h if bf16 else 2 * 4 * h  # autocast: one bf16 cast per projection; float32: shared
    attention = 4 * w * q + 4 * a + w * seq_len  # q, k, v, output; log-sum-exp; the mask bias (B, 1, s, s)
    mlp = 4 * w * i  # gate out, SiLU out, up out, product
    return residual + matmul_inputs + attention + mlp


def head_activation_bytes(config, bf16: bool) -> int:
    """Bytes per token saved outside the layers: the final RMSNorm (input, normalised, 1/rms), the LM head's float32
    input (it runs in float32, ppo.float32_head) and the int64 token id of the embedding lookup."""
    h = config.hidden_size
    return 4 * h + 4 * h + 4 + 4 * h + 8


def model_state_bytes(counts: dict[str, int], critic: bool, reference: bool, bf16: bool) -> dict[str, int]:
    """Bytes of the weights, gradients and AdamW state of the policy and of the critic, of the reference model, and of
    autocast's bf16 weight copies, from parameter_counts (module docstring, "fixed", "logprobs", "PPO")."""
    p, p_critic = counts["total"], counts["critic"] if critic else 0
    body = counts["matmul"] - counts["lm_head"]  # the matmul weights autocast casts: all but the float32 head
    return {
        "policy_weights": 4 * p,
        "policy_grads": 4 * p,
        "adam_moments": 8 * p,
        "adam_step_temp": 4 * max(p, p_critic),
        "reference": (2 * body + 4 * (p - body) if bf16 else 4 * p) if reference else 0,  # ppo.store_in_bf16
        "critic_weights": 4 * p_critic,
        "critic_grads": 4 * p_critic,
        "critic_moments": 8 * p_critic,
        "autocast_weights": 2 * body if bf16 else 0,
    }


# Under torchrun, FSDP2 shards these over the GPUs (distributed.shard_model): each rank holds 1/N of each.
SHARDED = ("policy_weights", "policy_grads", "adam_moments", "adam_step_temp", "reference", "critic_weights",
           "critic_grads", "critic_moments")


def gathered_bytes(config, counts: dict[str, int], gpus: int, critic: bool, reference: bool, bf16: bool) -> dict:
    """What a rank holds whole on top of its shards when gpus > 1 (module docstring, "Several GPUs"): the whole policy
    while sampling (distributed.full_weights), and the critic for its values, the whole policy and reference for
    the logprobs, and in
    the update the root's weights (embedding, final norm, LM head), two layers' (the one running and the next,
    prefetched) and one layer's gradients before they are reduced. All 0 on one GPU."""
    if gpus == 1:
        return {"full_weights": 0, "full_critic": 0, "full_reference": 0, "update_gathered": 0}
    p, tied = counts["total"], getattr(config, "tie_word_embeddings", False)
    root = config.vocab_size * config.hidden_size * (1 if tied else 2) + config.hidden_size
    layer = (p - root) // config.num_hidden_layers
    w = 2 if bf16 else 4  # the layers are gathered in bf16 on CUDA (distributed.mixed_precision), the root float32
    return {
        "full_weights": 4 * root + w * (p - root),
        "full_critic": 4 * counts["critic"] if critic else 0,
        "full_reference": 4 * root + w * (p - root) if reference else 0,
        "update_gathered": 4 * root + w * 3 * layer,
    }


def sampling_bytes(config, bf16: bool, max_batch_tokens: int) -> dict[str, int]:
    """Bytes of sampling: the KV cache (rollout.make_cache's pool), one prefill pass's own cache (float32 keys under
    autocast: the rotary embedding promotes them) and the decode step's logits and top-p buffers (module docstring,
    "sampling")."""
    blocks = max_batch_tokens // BLOCK + (max_batch_tokens % BLOCK > 0) + 1  # + the scratch block
    per_layer_token = config.num_hidden_layers * kv_heads(config) * head_dim(config)
    return {
        "kv_cache": kv_bytes_per_token(config, bf16) * BLOCK * blocks,
        "kv_prefill": per_layer_token * ((4 + 2) if bf16 else 8) * rollout.PREFILL_BATCH_TOKENS,
        "decode_logits": 40 * min(scheduler.MAX_ROWS, blocks) * config.vocab_size,
    }


def checkpointed_saved_bytes(config, micro_batch_size: int, seq_len: int, bf16: bool) -> int:
    """Bytes a micro-batch keeps through its forward with gradient checkpointing on: each layer's float32 input, what
    the final norm and the LM head save, and the float32 rotary cos and sin (shared by the micro-batch)."""
    n = micro_batch_size * seq_len  # tokens of one micro-batch
    rope = 2 * seq_len * head_dim(config) * 4  # float32 cos and sin, shared by the micro-batch
    return n * (config.num_hidden_layers * 4 * config.hidden_size + head_activation_bytes(config, bf16)) + rope


def activation_bytes(config, micro_batch_size: int, seq_len: int, bf16: bool) -> dict[str, int]:
    """Bytes of one PPO micro-batch's activations with checkpointing on (what it keeps + the one layer being
    recomputed) and off (every layer), and of its logits at the end of the forward and in the LM head's backward
    (module docstring, "How the activations are counted")."""
    w = 2 if bf16 else 4
    n = micro_batch_size * seq_len  # tokens of one micro-batch
    e = micro_batch_size * (seq_len - 1) * config.vocab_size  # tempered logits: the last position predicts nothing
    rope = 2 * seq_len * head_dim(config) * 4  # float32 cos and sin, shared by the micro-batch
    layer = layer_activation_bytes(config, seq_len, bf16)
    return {
        "activations_checkpointed": checkpointed_saved_bytes(config, micro_batch_size, seq_len, bf16) + n * layer,
        "activations_full": n * (config.num_hidden_layers * layer + head_activation_bytes(config, bf16)) + rope,
        "logits_forward": micro_batch_size * seq_len * config.vocab_size * 4 + 4 * e,  # float32 head, / T
        "logits_backward": 20 * e,
    }


def training_activation_bytes(
    config, plan: dict[str, int], micro_batch_size: int, seq_len: int, checkpointing: bool, bf16: bool
) -> int:
    """Bytes a PPO micro-batch holds beyond the weights, AdamW state and gradients, at its worst moment: with
    checkpointing the worse of the end of the forward, the LM head's backward and one layer's recompute; without it
    every layer's activations and bf16 weight copies, which stay alive until the backward reaches them."""
    if checkpointing:
        n = micro_batch_size * seq_len  # tokens of one micro-batch
        layer = layer_activation_bytes(config, seq_len, bf16)
        saved = checkpointed_saved_bytes(config, micro_batch_size, seq_len, bf16)
        return max(
            plan["autocast_weights"] + saved + plan["logits_forward"],  # end of the forward, autocast cache alive
            saved + plan["logits_backward"],  # the LM head's backward
            saved + 3 * n * layer // 2,  # one layer recomputed, and the gradients through it (1.05-1.33x, on CPU)
        )
    activations = plan["autocast_weights"] + plan["activations_full"]
    return activations + max(plan["logits_forward"], plan["logits_backward"])


def phase_peaks(
    config,
    plan: dict[str, int],
    counts: dict[str, int],
    micro_batch_size: int,
    seq_len: int,
    checkpointing: bool,
    bf16: bool,
) -> dict[str, int]:
    """The fixed bytes (held in every phase) and the peak of each phase, from the components in plan: sampling, the
    old/ref logprobs, the PPO micro-batch and the AdamW step, and the largest of the four."""
    fixed = plan["policy_weights"] + plan["adam_moments"] + plan["reference"]
    fixed += plan["critic_weights"] + plan["critic_moments"]
    grads = plan["policy_grads"] + plan["critic_grads"]
    activations = training_activation_bytes(config, plan, micro_batch_size, seq_len, checkpointing, bf16)
    peaks = {"fixed": fixed}
    casts = plan["autocast_weights"] if not plan["full_weights"] else 0  # several GPUs: layers gathered in bf16
    sampled = plan["kv_cache"] + plan["kv_prefill"] + plan["decode_logits"] + casts
    # several GPUs: the critic's V_old runs after the sampling, on its gathered weights beside the policy's
    peaks["sampling_peak"] = fixed + plan["full_weights"] + max(sampled, plan["full_critic"])
    peaks["logprobs_peak"] = fixed + plan["full_weights"] + plan["full_reference"] + plan["autocast_weights"]
    peaks["logprobs_peak"] += plan["logits_forward"]
    if checkpointing:  # enable_input_require_grads: one more float32 hidden state (measured on CPU)
        peaks["logprobs_peak"] += micro_batch_size * seq_len * 4 * config.hidden_size
    peaks["training_peak"] = fixed + grads + plan["update_gathered"] + activations
    peaks["optimizer_peak"] = fixed + grads + plan["adam_step_temp"]
    peaks["peak"] = max(peaks[k] for k in ("sampling_peak", "logprobs_peak", "training_peak", "optimizer_peak"))
    return peaks


def memory_plan(
    config,
    *,
    gpu_bytes: int,
    micro_batch_size: int = 8,
    seq_len: int = 2048,
    max_batch_tokens: int = 2**18,
    gradient_checkpointing: bool = True,
    critic: bool = False,
    reference: bool = True,
    bf16: bool = True,
    gpus: int = 1,
) -> dict[str, int]:
    """Bytes of each component and the peak of each phase of one train.py iteration (module docstring), for a
    Llama-style config, a GPU of gpu_bytes, and train.py's --micro-batch-size, a padded micro-batch length seq_len
    (at most --max-length), --max-batch-tokens, --max-new-tokens, --gradient-checkpointing, --advantage critic, a
    reference model (--kl-coef > 0), --bf16, and the number of GPUs the state is sharded over (gpus, torchrun). Every
    value is in bytes, per GPU; headroom = usable - peak is negative when it does not fit; kv_default_tokens is the KV
    cache sampling takes on this GPU without --max-batch-tokens."""
    counts = parameter_counts(config)
    plan = model_state_bytes(counts, critic, reference, bf16)
    plan |= {key: -(-plan[key] // gpus) for key in SHARDED}  # ceil: FSDP2 pads the last shard
    plan |= gathered_bytes(config, counts, gpus, critic, reference, bf16)
    plan |= sampling_bytes(config, bf16, max_batch_tokens)
    plan |= activation_bytes(config, micro_batch_size, seq_len, bf16)
    plan |= phase_peaks(config, plan, counts, micro_batch_size, seq_len, gradient_checkpointing, bf16)
    plan["gpu"] = gpu_bytes
    plan["usable"] = gpu_bytes - RESERVED
    plan["headroom"] = plan["usable"] - plan["peak"]
    plan["kv_default_tokens"] = default_kv_tokens(config, plan, bf16)
    return plan


def default_kv_tokens(config, plan: dict[str, int], bf16: bool) -> int:
    """The KV cache rollout.default_budget takes on CUDA without --max-batch-tokens: KV_MEMORY_FRACTION of the memory
    free when sampling starts (all of the GPU but the CUDA context, the fixed state and the gathered weights), less
    autocast's weight copies and a step's logits at scheduler.MAX_ROWS rows."""
    free = plan["usable"] - plan["fixed"] - plan["full_weights"]
    extra = (2 * parameter_counts(config)["total"] if bf16 else 0) + 40 * scheduler.MAX_ROWS * config.vocab_size
    return max(0, int(rollout.KV_MEMORY_FRACTION * (free - extra)) // kv_bytes_per_token(config, bf16))


def fit_status(peak: int, usable: int) -> str:
    """'yes' (peak <= 90% of usable), 'tight' (<= usable: fragmentation may still run out) or 'no'."""
    return "yes" if peak <= 0.9 * usable else "tight" if peak <= usable else "no"


def largest_fitting(config, gpu_bytes: int, **settings) -> tuple[int | None, int | None]:
    """The largest --micro-batch-size (of MICRO_BATCH_SIZES) whose logprob, PPO and AdamW phases fit, and the largest
    --max-batch-tokens (of MAX_BATCH_TOKENS) whose sampling phase fits; None when none does."""
    best_micro, best_tokens = None, None
    for micro in MICRO_BATCH_SIZES:
        plan = memory_plan(config, gpu_bytes=gpu_bytes, **{**settings, "micro_batch_size": micro})
        if max(plan["logprobs_peak"], plan["training_peak"], plan["optimizer_peak"]) <= plan["usable"]:
            best_micro = micro
    for tokens in MAX_BATCH_TOKENS:
        plan = memory_plan(config, gpu_bytes=gpu_bytes, **{**settings, "max_batch_tokens": tokens})
        if plan["sampling_peak"] <= plan["usable"]:
            best_tokens = tokens
    return best_micro, best_tokens


COMPONENTS = [  # (key, label) of the breakdown table
    ("policy_weights", "policy weights, float32"),
    ("policy_grads", "gradients, float32"),
    ("adam_moments", "AdamW moments, 2 x float32"),
    ("adam_step_temp", "AdamW step temporary, float32"),
    ("reference", "reference model (bf16 matmuls on CUDA; --kl-coef > 0)"),
    ("critic_weights", "critic weights (--advantage critic)"),
    ("critic_moments", "critic AdamW moments (+ as much again in grads)"),
    ("autocast_weights", "autocast bf16 weight copies"),
    ("kv_cache", "KV cache at --max-batch-tokens"),
    ("kv_prefill", "one prefill pass's own cache"),
    ("decode_logits", "decode step logits and top-p buffers"),
    ("activations_checkpointed", "activations, checkpointing on"),
    ("activations_full", "activations, checkpointing off"),
    ("logits_forward", "logits at the end of the forward"),
    ("logits_backward", "logits in the LM head's backward"),
    ("sampling_peak", "PEAK sampling (answers, MC rollouts)"),
    ("logprobs_peak", "PEAK old/ref logprobs"),
    ("training_peak", "PEAK PPO micro-batch"),
    ("optimizer_peak", "PEAK AdamW step"),
]


def gib(x: int) -> str:
    return f"{x / GiB:.1f}"


def format_breakdown(models: dict, **settings) -> str:
    """One column per model: every component and phase peak in GiB (the GPU size does not change them)."""
    plans = {name: memory_plan(config, gpu_bytes=0, **settings) for name, config in models.items()}
    width = max(len(label) for _, label in COMPONENTS)
    lines = [f"{'GiB':{width}s}" + "".join(f"{name:>10s}" for name in models)]
    for key, label in COMPONENTS:
        lines.append(f"{label:{width}s}" + "".join(f"{gib(plan[key]):>10s}" for plan in plans.values()))
    return "\n".join(lines)


def format_fits(models: dict, gpu_sizes_gb, **settings) -> str:
    """One row per model x GPU x advantage (vine, critic): the peak at the given settings, whether it fits, the
    largest micro-batch (checkpointing on / off) and --max-batch-tokens that fit, and the KV cache sampling takes on
    CUDA without --max-batch-tokens (kv_default_tokens)."""
    header = f"{'model':6s} {'GPU':>5s} {'advantage':9s} {'fixed':>6s} {'peak':>6s} {'fits':>5s}   largest micro-batch"
    lines = [header + " (ckpt on / off)   largest --max-batch-tokens   KV tokens by default (CUDA)"]
    for name, config in models.items():
        for size in gpu_sizes_gb:
            for advantage in ("vine", "critic"):
                run = {**settings, "critic": advantage == "critic"}
                plan = memory_plan(config, gpu_bytes=size * GiB, **run)
                on, tokens = largest_fitting(config, size * GiB, **{**run, "gradient_checkpointing": True})
                off, _ = largest_fitting(config, size * GiB, **{**run, "gradient_checkpointing": False})
                micro = f"{on or 'none'} / {off or 'none'}"
                lines.append(
                    f"{name:6s} {size:>3d}GB {advantage:9s} {gib(plan['fixed']):>6s} {gib(plan['peak']):>6s} "
                    f"{fit_status(plan['peak'], plan['usable']):>5s}   {micro:>35s}   {tokens or 'none':>26}   "
                    f"{plan['kv_default_tokens']:>27d}"
                )
        fixed = memory_plan(config, gpu_bytes=0, **settings)["fixed"]
        if fixed > max(gpu_sizes_gb) * GiB - RESERVED:
            lines.append(
                f"  {name}: float32 weights, AdamW moments and the reference alone take {gib(fixed)} GiB per GPU; "
                "shard them over several GPUs: torchrun and --gpus N (the paper: DeepSpeed over 8 GPUs)"
            )
    return "\n".join(lines)


SHARDED_RUNS = [("1.1B", 1), ("1.1B", 4), ("7B", 8)]  # (model, GPUs) of the torchrun table


def format_sharded(models: dict, gpu_gb: int, **settings) -> str:
    """The torchrun table: per GPU of gpu_gb, for 1.1B on 1 and 4 GPUs and 7B on 8, vine and critic, each phase's peak
    at the given settings and whether it fits; then the largest --micro-batch-size and --max-batch-tokens that fit
    (largest_fitting) and the peak with both."""
    header = f"{'model':6s} {'GPUs':>4s} {'advantage':9s} {'fixed':>6s} {'sample':>6s} {'logp':>6s} {'PPO':>6s} "
    lines = [header + f"{'fits':>5s}   largest that fit: micro-batch, --max-batch-tokens, peak, fits"]
    for name, gpus in SHARDED_RUNS:
        for advantage in ("vine", "critic"):
            run = {**settings, "critic": advantage == "critic", "gpus": gpus}
            plan = memory_plan(models[name], gpu_bytes=gpu_gb * GiB, **run)
            micro, tokens = largest_fitting(models[name], gpu_gb * GiB, **run)
            peaks = [gib(plan[k]) for k in ("fixed", "sampling_peak", "logprobs_peak", "training_peak")]
            best = ""
            if micro and tokens:
                fitted = memory_plan(models[name], gpu_bytes=gpu_gb * GiB,
                                     **{**run, "micro_batch_size": micro, "max_batch_tokens": tokens})
                best = f"{gib(fitted['peak'])} {fit_status(fitted['peak'], fitted['usable'])}"
            lines.append(
                f"{name:6s} {gpus:>4d} {advantage:9s} " + " ".join(f"{p:>6s}" for p in peaks)
                + f" {fit_status(plan['peak'], plan['usable']):>5s}   {micro or 'none':>4} {tokens or 'none':>8} {best}"
            )
    return "\n".join(lines)


def load_config(path: str):
    """A Hugging Face config from a local folder or a config.json file (nothing is downloaded), with the sizes the plan
    counts: a ValueError says why a file is not one."""
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{path} is not a config.json nor a folder holding one")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001  whatever transformers raises on a file it cannot read or validate
        why = " ".join(str(e).split())[:200]  # one line
        raise ValueError(f"{path}: transformers cannot read it ({type(e).__name__}: {why})") from None
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = getattr(config, key, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {key} is {value!r}, not a positive integer (the plan counts Llama-style models)")
    if not 1 <= kv_heads(config) <= config.num_attention_heads or head_dim(config) < 1:
        raise ValueError(f"{path}: num_key_value_heads is not 1 to num_attention_heads, or head_dim is not positive")
    return config


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local Hugging Face model folder or config.json (default: 1.1B and 7B)")
    parser.add_argument("--gpu-gb", type=positive, nargs="+", default=list(GPU_SIZES_GB), help="GPU sizes in GiB")
    parser.add_argument("--micro-batch-size", type=positive, default=8, help="train.py --micro-batch-size")
    parser.add_argument(
        "--seq-len", type=positive, default=2048, help="padded micro-batch length (worst: --max-length)"
    )
    parser.add_argument("--max-batch-tokens", type=positive, default=2**18, help="train.py --max-batch-tokens")
    parser.add_argument("--no-checkpointing", action="store_true", help="train.py --gradient-checkpointing false")
    parser.add_argument("--critic", action="store_true", help="the breakdown with --advantage critic")
    parser.add_argument("--no-reference", action="store_true", help="--kl-coef 0: no reference model")
    parser.add_argument("--float32", action="store_true", help="train.py --bf16 false: no autocast")
    parser.add_argument("--gpus", type=positive, default=1, help="GPUs the state is sharded over (torchrun, FSDP2)")
    cli = parser.parse_args(argv)
    if cli.model:
        try:
            models = {os.path.basename(os.path.normpath(cli.model))[:8] or "model": load_config(cli.model)}
        except ValueError as e:
            parser.error(f"--model {e}")
    else:
        models = {"1.1B": tinyllama_config(), "7B": deepseekmath_7b_config()}
    settings = dict(
        micro_batch_size=cli.micro_batch_size,
        seq_len=cli.seq_len,
        max_batch_tokens=cli.max_batch_tokens,
        gradient_checkpointing=not cli.no_checkpointing,
        reference=not cli.no_reference,
        bf16=not cli.float32,
        gpus=cli.gpus,
    )
    for name, config in models.items():
        print(f"{name}: {parameter_counts(config)['total'] / 1e9:.3f}B parameters, {config.num_hidden_layers} layers")
    print(
        f"\nSettings: --micro-batch-size {cli.micro_batch_size}, sequences padded to {cli.seq_len} tokens, "
        f"--max-batch-tokens {cli.max_batch_tokens}, checkpointing {'off' if cli.no_checkpointing else 'on'}, "
        f"{'float32' if cli.float32 else 'bf16 autocast'}, reference {'off' if cli.no_reference else 'on'}, "
        f"critic {'on' if cli.critic else 'off'}, {cli.gpus} GPU(s)\n"
    )
    print(format_breakdown(models, **settings, critic=cli.critic))
    print(f"\nFits, with {gib(RESERVED)} GiB reserved for the CUDA context ('tight': within 10% of the rest):\n")
    print(format_fits(models, cli.gpu_gb, **settings))
    if not cli.model:
        print(f"\nSharded under torchrun (FSDP2), per {max(cli.gpu_gb)} GB GPU, GiB (the settings above):\n")
        print(format_sharded(models, max(cli.gpu_gb), **{**settings, "gpus": 1}))


if __name__ == "__main__":
    sys.exit(main())
