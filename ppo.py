"""The PPO half of VinePPO: token log-probabilities, advantage whitening, the clipped loss and the KL to the reference;
and the baselines' advantages: the paper's PPO critic (value head, GAE, clipped value loss), GRPO and RLOO.

VinePPO changes only where the advantages come from (vine.py); the policy update is ordinary PPO-clip, shared with the
paper's PPO baseline (docs/paper.md §3, §1.3 "trainer side", §7 pitfalls 6-9, 13, 14, §8 pseudocode):

    logprobs   = log softmax(logits / 0.6)[next token]          float32, right-padded batches, causal shift by one
    A          = whiten(token advantages) over one 64-episode minibatch (unbiased var, eps 1e-8)
    ratio      = exp(logprobs - old_logprobs)
    L_policy   = sum_tokens max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) / (response tokens in the minibatch)
    k3         = clamp(exp(ref - logp) - (ref - logp) - 1, 0, 10)                        per token
    L_kl       = beta * sum_tokens k3 / (sequences in the minibatch)     (sum over tokens, mean over sequences)
    L          = L_policy + L_kl;  the minibatch is skipped when its mean ratio exceeds 10 (the ratio guard)

There is no entropy bonus; entropy is computed for logging only. train.py owns the loop (epochs, minibatches,
micro-batches, AdamW, grad clipping); this file holds the math and imports no project file: the Episode that the
update consumes and its right-padded batches (make_batch, aligned with token_logprobs), the losses, and the paper's
LR schedule (lr_lambda, DeepSpeed's WarmupDecayLR).

The baselines (train.py --advantage: critic_advantages, outcome_advantages) give
every response token an advantage that the same whitening and clipped loss then use:

    critic     PPO (docs/paper.md §3 table, pitfall 16): ValueModel = a copy of the SFT model + a linear head;
               reward R on the last response token, GAE with gamma = lambda = 1:  A_t = R - V_old(s_t), G_t = R
               L_value = 0.5 * sum_tokens max((V - G)^2, (clamp(V, V_old - 0.2, V_old + 0.2) - G)^2) / tokens
    grpo       A = (R - mean of the prompt's group) / (std of the group + 1e-4)     (Shao et al. 2024, §4.1.2)
    rloo       A = R - mean R of the other answers to the same prompt              (Ahmadian et al. 2024, §3)

Test: python -m pytest tests/test_ppo.py -x -q

Shape letters: B sequences, T tokens (prompt + response, right-padded), V vocabulary.

Departures from the paper's code (ppo_trainer.py):
1. The policy loss is divided by the response-token count of the WHOLE minibatch and the KL term by its sequence count,
   both computed once before micro-batching, so gradient accumulation gives exactly the one-pass gradient. The paper's
   single-GPU gradient-accumulation path takes a token mean per micro-batch; its multi-GPU runs (accumulation 1) take a
   token mean per device's share and average the gradients over devices. Both differ slightly from ours when sequence
   lengths vary.
2. Whitening is meant to be applied once over the whole minibatch (docs/paper.md pitfall 6), which matches the paper's
multi-GPU runs
   (statistics all-reduced over GPUs) and not its gradient-accumulation path (statistics per micro-batch).
3. The ratio guard is judged on the mean ratio of the whole minibatch. The paper judges each device's micro-batch
   (PPOTrainer._compute_actor_loss) and multiplies its loss by 0, which still lets AdamW take a step on its momentum
   with a zero gradient; train.py skips the optimizer step instead (train.py departure 2 says why).
4. token_logprobs returns 0 at positions whose predicted token is padding, so an unmasked pad can never give a
   non-finite ratio. The paper masks them with labels -100 instead; the result under the response mask is the same.
5. The value loss is divided by the response tokens of the whole minibatch, like the policy loss (departure 1).
6. GRPO's std is the sample std (Bessel), as torch.std and TRL; the paper that names it does not say. Whitening per
   minibatch rescales all advantages together afterwards, so the choice cannot change the update's direction.
7. Under bf16 the output layer runs in float32 (float32_head) and the frozen reference keeps the policy's precision
   recipe (store_in_bf16); the paper's DeepSpeed runs compute bf16 logits and hold a bf16 reference.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

RATIO_THRESHOLD = 10.0  # the paper's ratio guard (ratio_threshold=10): skip a minibatch whose mean ratio exceeds it


# ---------------------------------------------------------------------------------------------------------------------
# Episodes and their right-padded batches, aligned with token_logprobs


@dataclass
class Episode:
    """One sampled answer with what the PPO update needs of it (docs/paper.md §1.1 step 5, §8), and what the run's
    credit view (train.py --log-samples) shows of it."""

    prompt_ids: list[int]  # BOS + the prompt
    response_ids: list[int]  # the sampled tokens, then EOS if the answer finished (docs/paper.md pitfall 10)
    finished: bool  # stopped by EOS or the stop string with an answer (reward.counts_as_finished); else no EOS
    reward: float  # R, the 0/1 grade of the answer
    advantages: list[float]  # one per response token, EOS included; set by the advantage phase
    old_logprobs: torch.Tensor | None = None  # (P+R-1,) logprob of every next token under pi_old (old_and_ref_logprobs)
    ref_logprobs: torch.Tensor | None = None  # (P+R-1,) the same under the reference model; None when kl_coef = 0
    old_values: torch.Tensor | None = None  # (P+R-1,) V_old of the state before every next token (critic only)
    returns: list[float] | None = None  # G_t, one per response token (critic only)
    values: list[float] | None = None  # V(s_0) .. V(s_m), the MC values of its step states (vine only)
    whitened: list[list[float]] | None = None  # logged answers only: per epoch, its tokens' advantages as whitened


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


def pad_right(seqs: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists (docs/paper.md pitfall 9: the trainer's batches are right-padded). Returns ids and
    attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    return ids.to(device), attention_mask.to(device)


def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack per-episode float vectors (logprobs, critic values) into (B, width), zero-padded on the right."""
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The policy's loss


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    *,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every next token under the tempered policy (docs/paper.md §3, pitfalls 8 and 9).

    logprobs[b, t] = log softmax(logits[b, t] / temperature)[input_ids[b, t + 1]]
    entropy[b, t]  = -sum_v p_v log p_v of that same tempered distribution (for logging; no gradient)

    Batches must be right-padded (attention_mask[:, 0] == 1, as the paper asserts), so the real tokens of every row sit
    at positions 0..L-1 and need no position-id fix. Positions whose predicted token is padding get logprob 0 and
    entropy 0; the caller still masks prompt tokens with its response mask. Top-p is not applied (docs/paper.md pitfall
    8). Memory: log_softmax is never materialised; we gather the chosen logits and subtract the logsumexp, so the one
    (B, T-1, V) float32 tensor kept for backward is the tempered logits (about 2 GB for B=16, T=1024, V=32k); the logits
    are float32 already when the model's head is (float32_head, as train.py sets it). The entropy is computed one
    sequence at a time, so it adds only (T-1, V) tensors.
    """
    assert input_ids.shape == attention_mask.shape, f"{input_ids.shape=} != {attention_mask.shape=}"
    assert bool(attention_mask[:, 0].all()), "batch must be right-padded: every row must start with a real token"
    assert bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()), "padding must be on the right only"
    assert temperature > 0, f"temperature must be positive, got {temperature}"
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    # Causal shift: the logits at position t score the token at position t+1, so drop the last position's logits
    # (it predicts a token we do not have) and the first token as a target (nothing predicts it).
    logits = logits[:, :-1].float() / temperature  # (B, T-1, V) float32 (a no-op after float32_head)
    targets = input_ids[:, 1:]  # (B, T-1)
    target_mask = attention_mask[:, 1:].bool()  # (B, T-1) True where the predicted token is real (not padding)
    log_normalizer = torch.logsumexp(logits, dim=-1)  # (B, T-1)
    chosen = logits.gather(dim=-1, index=targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    logprobs = torch.where(target_mask, chosen - log_normalizer, 0.0)  # (B, T-1) padding targets -> 0
    if not return_entropy:
        return logprobs
    with torch.no_grad():
        # H = -sum_v p_v (x_v - lse) = lse - sum_v p_v x_v. One row at a time keeps the softmax to (T-1, V).
        entropy = torch.empty_like(logprobs)  # (B, T-1)
        for b in range(logits.shape[0]):
            probs = torch.softmax(logits[b], dim=-1)  # (T-1, V)
            expected_logit = (probs * logits[b]).sum(-1)  # (T-1,) sum_v p_v x_v, an elementwise float32 sum
            entropy[b] = log_normalizer[b].detach() - expected_logit
        entropy = torch.where(target_mask, entropy, 0.0)  # (B, T-1)
    return logprobs, entropy


def float32_head(model: torch.nn.Module) -> None:
    """Make the model's output layer run in float32 outside autocast, so that the logits which become logprobs (here
    and in the sampler) are never rounded to bf16: a logit of 20 has a bf16 step of 0.125, and dividing by T = 0.6
    makes it larger (departure 7). Its input, the final norm's output, is float32 already. Costs the head's matmul
    at float32 speed (~6% of a 1.1B model's FLOPs); MiniMax-M1 (arXiv:2506.13585, §3.3) made the same change."""
    head = model.get_output_embeddings()
    head.forward = functools.partial(float32_forward, head.forward)  # instance attribute: state dict unchanged


def float32_forward(forward, hidden: torch.Tensor) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        return forward(hidden.float())


def store_in_bf16(model: torch.nn.Module) -> None:
    """Store every Linear weight of a frozen model in bf16 except the output layer's (float32_head): bf16 autocast
    casts them to bf16 in every forward pass anyway, so the model computes exactly what it did with float32 weights
    (the same casts, kernels and float32 norms, embeddings and rotary buffers) in about half the memory. The
    reference stored so scores tokens bit for bit as the policy does at iteration 0: the KL starts at 0."""
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(torch.bfloat16)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over all entries (dim=None) or along `dim`.

    Masked-out entries are excluded with torch.where, so a nan or inf there cannot leak in. Along a dim, a row with an
    empty mask returns 0; over everything, an empty mask is an error.
    """
    mask = mask.bool()
    total = torch.where(mask, x, 0.0).sum() if dim is None else torch.where(mask, x, 0.0).sum(dim)
    if dim is None:
        count = mask.sum()
        assert count > 0, "masked_mean over an empty mask"
        return total / count
    return total / mask.sum(dim).clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; masked-out entries become 0 (docs/paper.md §1.3).

    var is unbiased (Bessel: sum (x - mean)^2 / (n - 1)), as in the paper's trainer. Call it ONCE over the response
    tokens of the whole 64-episode minibatch, before splitting it into micro-batches (docs/paper.md pitfall 6). If all
    advantages are equal, var = 0 and every token gets 0 (the eps keeps it finite).
    """
    mask = mask.bool()
    num = int(mask.sum())
    assert num >= 2, f"need at least 2 masked entries for an unbiased variance, got {num}"
    mean = masked_mean(x, mask)
    centered = torch.where(mask, x - mean, 0.0)
    var = (centered**2).sum() / (num - 1)
    return centered * torch.rsqrt(var + eps)


def ppo_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_eps: float, ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip loss plus the k3 KL-to-reference loss term (docs/paper.md §3, pitfalls 7 and 14; §8 pseudocode).

    All tensors are (B, T-1) and aligned with token_logprobs; mask is 1 where the predicted token is a response token
    (EOS included) and 0 for prompt tokens and padding. Gradient flows through `logprobs` only.

        ratio    = exp(logprobs - old_logprobs)
        pg       = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps))      per token
        L_policy = sum(pg * mask) / num_tokens
        k3       = clamp(exp(ref - logprobs) - (ref - logprobs) - 1, 0, 10)     unbiased estimate of KL(pi || pi_ref)
        L_kl     = kl_coef * sum(k3 * mask) / num_seqs     (kl_to_reference; none if ref_logprobs is None or kl_coef 0)

    num_tokens / num_seqs: response tokens / sequences of the WHOLE minibatch, counted once before micro-batching
    (default: this call's); summing the micro-batches' losses gives the minibatch loss and gradient exactly. stats
    (the README's metrics table) are floats divided the same way, so they sum too ("ratio/max" takes the max,
    accumulate_stats); loss/approx_kl is k3 of KL(pi_old || pi), as cleanrl's (http://joschu.net/blog/kl-approx.html).
    """
    shapes = {logprobs.shape, old_logprobs.shape, advantages.shape, mask.shape}
    assert len(shapes) == 1, f"all inputs must share one (B, T-1) shape, got {shapes}"
    mask = mask.bool()  # (B, T-1) response tokens, EOS included
    num_tokens = float(mask.sum()) if num_tokens is None else float(num_tokens)
    num_seqs = float(logprobs.shape[0]) if num_seqs is None else float(num_seqs)
    assert num_tokens > 0 and num_seqs > 0, f"empty minibatch: {num_tokens=} {num_seqs=}"
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()

    # Masking before exp (not only after) keeps a huge value at a prompt or pad position from making inf * 0 = nan
    # in the backward pass.
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # (B, T-1)
    ratio = torch.exp(log_ratio)  # (B, T-1)
    pg_unclipped = -advantages * ratio  # (B, T-1)
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T-1)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # (B, T-1) pessimistic bound; gradient 0 where the clip wins
    policy_loss = torch.where(mask, pg, 0.0).sum() / num_tokens  # prompt and padding tokens masked out

    kl_loss, kl_ref = torch.zeros((), device=logprobs.device), None
    if ref_logprobs is not None and kl_coef != 0.0:
        kl_ref = kl_to_reference(logprobs, ref_logprobs, mask, num_seqs)
        kl_loss = kl_coef * kl_ref
    loss = policy_loss + kl_loss

    with torch.no_grad():
        clipped = (pg_clipped > pg_unclipped) & mask  # (B, T-1)
        approx_kl = (ratio - 1.0) - log_ratio  # (B, T-1) k3 estimator of KL(pi_old || pi)
        stats = {
            "loss/policy": policy_loss.detach(),
            "loss/kl": kl_loss.detach(),
            "loss/total": loss.detach(),
            "loss/clipfrac": clipped.sum() / num_tokens,
            "loss/approx_kl": torch.where(mask, approx_kl, 0.0).sum() / num_tokens,
            "ratio/mean": torch.where(mask, ratio, 0.0).sum() / num_tokens,
            "ratio/max": torch.where(mask, ratio, 0.0).max(),  # ratios are positive, so the masked 0s never win
        }
        if kl_ref is not None:
            stats["kl/ref"] = kl_ref.detach()
        values = torch.stack(list(stats.values())).tolist()  # one device sync for all stats
    return loss, dict(zip(stats, values))


def kl_to_reference(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, num_seqs: float):
    """The k3 estimate of KL(pi || pi_ref), summed over the response tokens and divided by num_seqs (docs/paper.md §3):
    k3 = clamp(exp(ref - logprobs) - (ref - logprobs) - 1, 0, 10) per token. All (B, T-1), mask bool; gradient
    through logprobs only."""
    assert ref_logprobs.shape == logprobs.shape, f"{ref_logprobs.shape=} != {logprobs.shape=}"
    ref_log_ratio = torch.where(mask, ref_logprobs.detach() - logprobs, 0.0)  # (B, T-1) log(pi_ref / pi)
    # k3 > 10 already for d > 3 or d < -11, so clamping d to [-20, 20] changes neither the clamped k3 nor its
    # (zero) gradient there; it only stops exp(d) from overflowing to inf and the backward from giving nan.
    ref_log_ratio = torch.clamp(ref_log_ratio, -20.0, 20.0)
    k3 = torch.exp(ref_log_ratio) - ref_log_ratio - 1.0  # (B, T-1) >= 0
    k3 = torch.clamp(k3, 0.0, 10.0)  # per-token clamp as the paper; gradient 0 above 10
    return torch.where(mask, k3, 0.0).sum() / num_seqs  # sum over tokens, mean over sequences


def accumulate_stats(total: dict[str, float], stats: dict[str, float]) -> dict[str, float]:
    """Combine ppo_loss stats of micro-batches of one minibatch: sum every key, except keys ending in /max (max).

    Start with total = {}. Because ppo_loss divides by the minibatch's num_tokens / num_seqs, the sums are the
    minibatch's means.
    """
    merged = dict(total)
    for key, value in stats.items():
        if key not in merged:
            merged[key] = value
        elif key.endswith("/max"):
            merged[key] = max(merged[key], value)
        else:
            merged[key] += value
    return merged


def ratio_guard_exceeded(stats: dict[str, float], threshold: float = RATIO_THRESHOLD) -> bool:
    """The paper's ratio guard (docs/paper.md §3, pitfall 14): True if this minibatch must be skipped.

    stats are the ppo_loss stats of the WHOLE minibatch (accumulate_stats over its micro-batches), so
    stats["ratio/mean"] is the mean of exp(logprobs - old_logprobs) over all its response tokens. A mean above 10
    means the policy moved far from pi_old (or the old logprobs are stale or misaligned) and the update would be
    garbage; train.py then zeroes the gradients and does not step the optimizer.
    """
    return stats["ratio/mean"] > threshold


# ---------------------------------------------------------------------------------------------------------------------
# Baselines' advantages (train.py --advantage critic | grpo | rloo): everything above is shared by all estimators


class ValueModel(torch.nn.Module):
    """The PPO baseline's critic (docs/paper.md §3 "Critic"; official models/pretrained_with_value_head.py): the
    transformer of a copy of the SFT policy (its LM head dropped) and a linear head hidden -> 1 on the last hidden
    state, weight ~ N(0, 1/sqrt(hidden + 1)), bias 0. forward(ids, mask)[b, t] = V(prompt + tokens 0..t of row b),
    the value of the state after reading token t, in float32."""

    def __init__(self, causal_lm: torch.nn.Module, generator: torch.Generator | None = None):
        super().__init__()
        self.body = causal_lm.base_model  # the transformer without the LM head (LlamaModel for a Llama)
        hidden_size = causal_lm.config.hidden_size
        self.head = torch.nn.Linear(hidden_size, 1)
        with torch.no_grad():
            weight = torch.randn(self.head.weight.shape, generator=generator) / (hidden_size + 1) ** 0.5
            self.head.weight.copy_(weight)
            self.head.bias.zero_()
        self.head.to(next(self.body.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(hidden).squeeze(-1).float()  # (B, T)

    @torch.no_grad()
    def predict(self, seqs: list[list[int]], pad_id: int, batch_size: int) -> list[torch.Tensor]:
        """V of the state after each token of every sequence, one (len,) float32 CPU tensor per sequence, in eval
        mode without gradients, batch_size right-padded sequences per forward pass."""
        self.eval()
        out = []
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            ids, attention_mask = pad_right(chunk, pad_id, self.head.weight.device)
            values = self(ids, attention_mask)  # (B, T)
            out += [values[j, : len(s)].cpu() for j, s in enumerate(chunk)]
        return out

    def state_values(self, states: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
        """V(s) of whole states (prompt + a response prefix): the value at a state's last token (docs/paper.md §3:
        V(s_0) is read at the last prompt token). The value diagnostic's critic_values (vine.value_diagnostic)."""
        return [float(v[-1]) for v in self.predict(states, pad_id, batch_size)]


def gae(rewards: list[float], values: list[float], *, gamma: float = 1.0, lam: float = 1.0) -> tuple[list, list]:
    """Generalised advantage estimation over one answer's response tokens (Schulman et al. 2016, eq. 16; docs/paper.md
    §3 "PPO reward / returns"). values[t] = V_old(s_t), the state before token t; the state after the last token is
    terminal (value 0, finished or not).

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);   A_t = delta_t + gamma * lam * A_{t+1};   G_t = A_t + V(s_t)

    The paper's PPO runs gamma = lam = 1 with the 0/1 reward on the last token only, so A_t = R - V_old(s_t) and
    G_t = R. Returns (advantages, returns), one per token."""
    assert len(rewards) == len(values), f"{len(rewards)=} != {len(values)=}"
    advantages, next_value, next_advantage = [0.0] * len(values), 0.0, 0.0
    for t in reversed(range(len(values))):
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = advantages[t] = delta + gamma * lam * next_advantage
        next_value = values[t]
    return advantages, [a + v for a, v in zip(advantages, values)]


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The critic's clipped value loss (docs/paper.md §3 "Value loss"; official _compute_critics_loss), all (B, T-1):

        V_clipped = clamp(V, V_old - clip_range, V_old + clip_range)
        L_value   = 0.5 * sum(max((V - G)^2, (V_clipped - G)^2) * mask) / num_tokens

    V is clamped itself, as the official trainer does: inside the range V_clipped is exactly V, so the two branches
    are equal there. (V_old + clamp(V - V_old, ...) is V only up to rounding, and a token whose value was not clipped
    could then count as clipped.) Gradient flows through `values` only, and not at all where the clipped branch is
    the larger: there V is outside the range, where the clamp has no gradient. num_tokens as in ppo_loss (the whole
    minibatch's response tokens). stats: critic/loss, critic/clipfrac (the fraction of tokens where the clipped
    branch is the larger), critic/abs_error (|V - G|), already divided by num_tokens so that accumulate_stats sums
    micro-batches into minibatch means."""
    assert values.shape == old_values.shape == returns.shape == mask.shape, "all inputs must share one shape"
    mask = mask.bool()
    num_tokens = float(mask.sum()) if num_tokens is None else float(num_tokens)
    old_values, returns = old_values.detach(), returns.detach()
    clipped = torch.clamp(values, old_values - clip_range, old_values + clip_range)  # (B, T-1)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * torch.where(mask, torch.maximum(unclipped_error, clipped_error), 0.0).sum() / num_tokens
    with torch.no_grad():
        stats = {
            "critic/loss": loss.detach(),
            "critic/clipfrac": ((clipped_error > unclipped_error) & mask).sum() / num_tokens,
            "critic/abs_error": torch.where(mask, (values - returns).abs(), 0.0).sum() / num_tokens,
        }
        values_list = torch.stack(list(stats.values())).tolist()
    return loss, dict(zip(stats, values_list))


def critic_loss(
    model: ValueModel, chunk: list[Episode], batch: dict, *, clip_range: float, num_tokens: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The critic's clipped value loss (value_loss) on one micro-batch (make_batch of chunk), against the returns G_t
    and the V_old of critic_advantages, normalised by the whole minibatch's response tokens."""
    width = batch["mask"].shape[1]
    device = batch["mask"].device
    old_values = pad_rows([e.old_values for e in chunk], width).to(device)
    returns = torch.zeros_like(batch["mask"])  # (B, T-1) G_t at the position that predicts token t
    for j, e in enumerate(chunk):
        p = len(e.prompt_ids)
        returns[j, p - 1 : p - 1 + len(e.returns)] = torch.tensor(e.returns)
    values = model(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, T-1)
    return value_loss(values, old_values, returns, batch["mask"], clip_range=clip_range, num_tokens=num_tokens)


def group_advantages(rewards: list[float], group_size: int, method: str) -> list[float]:
    """One advantage per answer from the rewards of its prompt's group (answers i*group_size .. (i+1)*group_size-1):

        grpo:  (R - mean(group)) / (std(group) + 1e-4)      std with Bessel's correction (departure 6)
        rloo:  R - mean of the OTHER answers of the group  =  group_size / (group_size - 1) * (R - mean(group))

    A group whose rewards are all equal gets 0 everywhere. No values, no extra samples: outcome-only credit, the same
    for every token of an answer."""
    assert group_size >= 2 and len(rewards) % group_size == 0, f"{len(rewards)} rewards in groups of {group_size}"
    assert method in ("grpo", "rloo"), f"unknown method {method!r}"
    groups = torch.tensor(rewards, dtype=torch.float64).view(-1, group_size)  # (prompts, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    if method == "grpo":
        advantages = (groups - mean) / (groups.std(dim=1, keepdim=True) + 1e-4)
    else:
        advantages = groups - (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return advantages.flatten().tolist()


def critic_advantages(model: ValueModel, episodes: list[Episode], pad_id: int, batch_size: int) -> dict:
    """The paper's PPO (docs/paper.md §3 "PPO reward / returns", pitfall 16): V_old of every state from the critic,
    once per iteration before the update (episode.old_values); the reward R on the last response token (EOS if
    present); GAE with gamma = lambda = 1, so every token gets A_t = R - V_old(s_t) and the return G_t = R
    (episode.advantages, episode.returns). Returns the mean V_old(s_0), the critic's guess of the training accuracy."""
    values = model.predict([e.prompt_ids + e.response_ids for e in episodes], pad_id, batch_size)
    for e, v in zip(episodes, values):
        p, r = len(e.prompt_ids), len(e.response_ids)
        e.old_values = v[:-1]  # value t: the state before token t + 1 (aligned as the logprobs)
        rewards = [0.0] * (r - 1) + [e.reward] if r else []
        e.advantages, e.returns = gae(rewards, e.old_values[p - 1 : p - 1 + r].tolist())
    first_values = [float(e.old_values[len(e.prompt_ids) - 1]) for e in episodes]  # V_old(s_0) of every answer
    return {"critic/value_s0": float(np.mean(first_values))}


def outcome_advantages(episodes: list[Episode], group_size: int, method: str) -> None:
    """GRPO or RLOO (group_advantages): one advantage per answer from its problem's group of group_size answers
    (answer j of problem i at i * group_size + j), the same on every token, EOS included; no values, no sampling."""
    per_answer = group_advantages([e.reward for e in episodes], group_size, method)
    for e, a in zip(episodes, per_answer):
        e.advantages = [a] * len(e.response_ids)


# ---------------------------------------------------------------------------------------------------------------------
# The learning-rate schedule of the paper's PPO trainer (DeepSpeed's, docs/paper.md §3)


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier of optimizer step `step` (0-based) under DeepSpeed's WarmupDecayLR as the paper ran it
    (docs/paper.md §3; deepspeed/runtime/lr_schedules.py of DeepSpeed 0.14.1, the official code's pin):

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
