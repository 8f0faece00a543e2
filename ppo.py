"""The PPO half of VinePPO: token logprobs, whitening, the clipped loss and the KL to the reference; and the
baselines' advantages (train.py --advantage): the paper's PPO critic (ValueModel, gae, value_loss), GRPO and RLOO.
VinePPO changes only where the advantages come from (vine.py); the update is the paper's PPO-clip (docs/paper.md §3,
§8, pitfalls 6-9, 13, 14):

    logprobs = log softmax(logits / 0.6)[next token]           float32, right-padded batches, causal shift by one
    A        = whiten(token advantages) over one 64-episode minibatch
    L        = PPO-clip token mean + beta * k3 KL (sum over tokens, mean over sequences)           (ppo_loss)
    skip the minibatch when its mean ratio exceeds 10 (the ratio guard); no entropy bonus

train.py owns the loop (epochs, micro-batches, AdamW); this file holds the math. Test: pytest tests/test_ppo.py -q
Shapes: B sequences, T tokens (prompt + response, right-padded), V vocabulary; P, R an episode's prompt, response.

Departures from the paper's code (ppo_trainer.py):
1. The losses are divided by the WHOLE minibatch's response tokens (the KL term: its sequences), so that micro-batches
   sum to the one-pass gradient; the paper takes a mean per micro-batch or device.
2. Advantages are whitened once per minibatch (pitfall 6), as in the paper's multi-GPU runs, not per micro-batch.
3. The ratio guard judges the whole minibatch (train.py departure 2).
4. token_logprobs gives 0 where the predicted token is padding (the paper masks with labels -100).
5. The value loss is divided like the policy loss (departure 1).
6. GRPO's std is the sample std (Bessel), as torch.std and TRL; its paper does not say.
7. Under bf16 the output layer runs in float32 (float32_head) and the frozen reference keeps the policy's precision
   recipe (store_in_bf16); the paper computes bf16 logits and holds a bf16 reference.
"""

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

RATIO_THRESHOLD = 10.0  # the paper's ratio_threshold


# ---------------------------------------------------------------------------------------------------------------------
# Episodes and their batches


@dataclass
class Episode:
    """One sampled answer and what the update (and train.py --log-samples) needs of it."""

    prompt_ids: list[int]  # BOS + the prompt
    response_ids: list[int]  # the sampled tokens, then EOS if finished (docs/paper.md pitfall 10)
    finished: bool  # reward.counts_as_finished; else no EOS
    reward: float  # R, the 0/1 grade
    advantages: list[float]  # one per response token, EOS included
    old_logprobs: torch.Tensor | None = None  # (P+R-1,) logprob of every next token under pi_old
    ref_logprobs: torch.Tensor | None = None  # (P+R-1,) the same under the reference; None if kl_coef = 0
    old_values: torch.Tensor | None = None  # (P+R-1,) V_old of the state before every next token (critic only)
    returns: list[float] | None = None  # G_t per response token (critic only)
    values: list[float] | None = None  # V(s_0) .. V(s_m), MC values (vine only)
    whitened: list[list[float]] | None = None  # per epoch, the advantages whitened (logged answers only)
    steps: list[int] | None = None  # the step of each sampled token, EOS excluded (vine.step_map, made once)

    @property
    def answer_ids(self) -> list[int]:
        """The sampled tokens without the EOS: what steps maps."""
        return self.response_ids[: len(self.response_ids) - self.finished]

    @property
    def num_steps(self) -> int:
        """n, the steps up to the one holding the last token (1 for an empty answer)."""
        return self.steps[-1] + 1 if self.steps else 1


def make_batch(episodes: list[Episode], pad_id: int, device: str) -> dict:
    """Tensors of a list of episodes, aligned with token_logprobs."""
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
    """Right-padded ids and attention mask of token lists (docs/paper.md pitfall 9)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    return ids.to(device), attention_mask.to(device)


def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-episode float vectors stacked into (B, width), zero-padded on the right."""
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
    """Under the tempered policy, no top-p, right-padded (docs/paper.md pitfalls 8, 9); 0 on padding (departure 4):

    logprobs[b, t] = log softmax(logits[b, t] / temperature)[input_ids[b, t + 1]]
    entropy[b, t]  = -sum_v p_v log p_v of that distribution (for logging; no gradient)
    """
    assert input_ids.shape == attention_mask.shape, f"{input_ids.shape=} != {attention_mask.shape=}"
    assert bool(attention_mask[:, 0].all()), "batch must be right-padded: every row must start with a real token"
    assert bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()), "padding must be on the right only"
    assert temperature > 0, f"temperature must be positive, got {temperature}"
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    # Causal shift: the logits at t score token t+1: drop the last logits and the first token as a target.
    logits = logits[:, :-1].float() / temperature  # (B, T-1, V) float32
    targets = input_ids[:, 1:]  # (B, T-1)
    target_mask = attention_mask[:, 1:].bool()  # (B, T-1) False where the predicted token is padding
    log_normalizer = torch.logsumexp(logits, dim=-1)  # (B, T-1)
    chosen = logits.gather(dim=-1, index=targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    logprobs = torch.where(target_mask, chosen - log_normalizer, 0.0)  # (B, T-1) padding targets -> 0
    if not return_entropy:
        return logprobs
    with torch.no_grad():
        # H = -sum_v p_v (x_v - lse) = lse - sum_v p_v x_v, one row at a time
        entropy = torch.empty_like(logprobs)  # (B, T-1)
        for b in range(logits.shape[0]):
            probs = torch.softmax(logits[b], dim=-1)  # (T-1, V)
            expected_logit = (probs * logits[b]).sum(-1)  # (T-1,) sum_v p_v x_v
            entropy[b] = log_normalizer[b].detach() - expected_logit
        entropy = torch.where(target_mask, entropy, 0.0)  # (B, T-1) padding targets -> 0
    return logprobs, entropy


def float32_head(model: torch.nn.Module) -> None:
    """The output layer in float32 outside autocast: logits never rounded to bf16 (departure 7; MiniMax-M1 §3.3)."""
    head = model.get_output_embeddings()
    head.forward = functools.partial(float32_forward, head.forward)  # instance attribute: state dict unchanged


def float32_forward(forward, hidden: torch.Tensor) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        return forward(hidden.float())


def store_in_bf16(model: torch.nn.Module) -> None:
    """A frozen model's Linear weights but the head's in bf16, as autocast casts them: the reference then scores
    tokens bit for bit as the policy at iteration 0 (departure 7)."""
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(torch.bfloat16)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over all or along dim; nothing off the mask leaks in; an empty row gives 0."""
    mask = mask.bool()
    total = torch.where(mask, x, 0.0).sum() if dim is None else torch.where(mask, x, 0.0).sum(dim)
    if dim is None:
        count = mask.sum()
        assert count > 0, "masked_mean over an empty mask"
        return total / count
    return total / mask.sum(dim).clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries, 0 elsewhere, var = sum (x - mean)^2 / (n - 1), once per
    minibatch (docs/paper.md §1.3, departure 2)."""
    mask = mask.bool()
    num = int(mask.sum())
    assert num >= 2, f"need at least 2 masked entries for an unbiased variance, got {num}"
    mean = masked_mean(x, mask)
    centered = torch.where(mask, x - mean, 0.0)
    var = (centered**2).sum() / (num - 1)
    return centered * torch.rsqrt(var + eps)



def keep_whitened(minibatch: list[Episode], whitened: torch.Tensor) -> None:
    """Episodes marked for the credit view (whitened = []) keep each update's whitened advantages of their tokens."""
    for j, e in enumerate(minibatch):
        if e.whitened is not None:
            p = len(e.prompt_ids)
            e.whitened.append(whitened[j, p - 1 : p - 1 + len(e.response_ids)].tolist())


def ppo_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_eps: float, ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip loss plus the k3 KL to the reference (docs/paper.md pitfall 7), all (B, T-1); mask: the response tokens
    with EOS. Gradient through `logprobs` only.

        ratio    = exp(logprobs - old_logprobs)
        pg       = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps))      per token
        L_policy = sum(pg * mask) / num_tokens
        k3       = clamp(exp(ref - logprobs) - (ref - logprobs) - 1, 0, 10)     estimates KL(pi || pi_ref)
        L_kl     = kl_coef * sum(k3 * mask) / num_seqs                          (kl_to_reference)

    num_tokens / num_seqs: the whole minibatch's (departure 1); loss/approx_kl is k3 of KL(pi_old || pi).
    """
    shapes = {logprobs.shape, old_logprobs.shape, advantages.shape, mask.shape}
    assert len(shapes) == 1, f"all inputs must share one (B, T-1) shape, got {shapes}"
    mask = mask.bool()  # (B, T-1) response tokens, EOS included
    num_tokens = float(mask.sum()) if num_tokens is None else float(num_tokens)
    num_seqs = float(logprobs.shape[0]) if num_seqs is None else float(num_seqs)
    assert num_tokens > 0 and num_seqs > 0, f"empty minibatch: {num_tokens=} {num_seqs=}"
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()

    # mask before exp: a huge value off the mask would give inf * 0 = nan in backward
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
        approx_kl = (ratio - 1.0) - log_ratio  # (B, T-1)
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
        values = torch.stack(list(stats.values())).tolist()
    return loss, dict(zip(stats, values))


def kl_to_reference(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, num_seqs: float):
    """sum(k3 * mask) / num_seqs, all (B, T-1), mask bool (docs/paper.md §3):
    k3 = clamp(exp(ref - logprobs) - (ref - logprobs) - 1, 0, 10) per token."""
    assert ref_logprobs.shape == logprobs.shape, f"{ref_logprobs.shape=} != {logprobs.shape=}"
    ref_log_ratio = torch.where(mask, ref_logprobs.detach() - logprobs, 0.0)  # (B, T-1) log(pi_ref / pi)
    # k3 > 10 already for d outside [-11, 3]: this clamp only stops exp(d) overflowing
    ref_log_ratio = torch.clamp(ref_log_ratio, -20.0, 20.0)
    k3 = torch.exp(ref_log_ratio) - ref_log_ratio - 1.0  # (B, T-1) >= 0
    k3 = torch.clamp(k3, 0.0, 10.0)  # per-token clamp as the paper; gradient 0 above 10
    return torch.where(mask, k3, 0.0).sum() / num_seqs  # sum over tokens, mean over sequences


def accumulate_stats(total: dict[str, float], stats: dict[str, float]) -> dict[str, float]:
    """Sum the ppo_loss stats of a minibatch's micro-batches (max for keys ending in /max), from total = {}."""
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
    """The paper's ratio guard (docs/paper.md pitfall 14; departure 3): is the minibatch's mean ratio over threshold?"""
    return stats["ratio/mean"] > threshold


# ---------------------------------------------------------------------------------------------------------------------
# Baselines' advantages


class ValueModel(torch.nn.Module):
    """The PPO critic (docs/paper.md §3 "Critic"): the SFT policy's transformer + a linear head.
    forward(ids, mask)[b, t] = V(tokens 0..t of row b)."""

    def __init__(self, causal_lm: torch.nn.Module, generator: torch.Generator | None = None):
        super().__init__()
        self.body = causal_lm.base_model  # without the LM head
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
        """V after each token, one (len,) float32 CPU tensor per sequence."""
        self.eval()
        out = []
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            ids, attention_mask = pad_right(chunk, pad_id, self.head.weight.device)
            values = self(ids, attention_mask)  # (B, T)
            out += [values[j, : len(s)].cpu() for j, s in enumerate(chunk)]
        return out

    def state_values(self, states: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
        """V(s) of whole states, at their last token (vine.value_diagnostic)."""
        return [float(v[-1]) for v in self.predict(states, pad_id, batch_size)]


def gae(rewards: list[float], values: list[float], *, gamma: float = 1.0, lam: float = 1.0) -> tuple[list, list]:
    """GAE over one answer's tokens (Schulman et al. 2016, eq. 16); values[t] = V_old(s_t), before token t; terminal 0.

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);   A_t = delta_t + gamma * lam * A_{t+1};   G_t = A_t + V(s_t)

    Returns (advantages, returns), one per token."""
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
    """The critic's clipped value loss (docs/paper.md §3 "Value loss"), all (B, T-1):

        V_clipped = clamp(V, V_old - clip_range, V_old + clip_range)
        L_value   = 0.5 * sum(max((V - G)^2, (V_clipped - G)^2) * mask) / num_tokens

    Gradient through `values` only; num_tokens as in ppo_loss (departure 5)."""
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


class Critic(NamedTuple):
    """The PPO baseline's value model with its own AdamW and schedule (docs/paper.md §3)."""

    model: ValueModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def critic_loss(
    model: ValueModel, chunk: list[Episode], batch: dict, *, clip_range: float, num_tokens: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """value_loss on one micro-batch (make_batch of chunk), against critic_advantages' G_t and V_old."""
    width = batch["mask"].shape[1]
    device = batch["mask"].device
    old_values = pad_rows([e.old_values for e in chunk], width).to(device)
    returns = torch.zeros_like(batch["mask"])  # (B, T-1) G_t at the position that predicts token t
    for j, e in enumerate(chunk):
        p = len(e.prompt_ids)
        returns[j, p - 1 : p - 1 + len(e.returns)] = torch.tensor(e.returns)
    values = model(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, T-1) causal shift, as the logprobs
    return value_loss(values, old_values, returns, batch["mask"], clip_range=clip_range, num_tokens=num_tokens)


def group_advantages(rewards: list[float], group_size: int, method: str) -> list[float]:
    """One advantage per answer from its prompt's group (answers i*group_size .. (i+1)*group_size-1):

        grpo:  (R - mean(group)) / (std(group) + 1e-4)      std with Bessel's correction (departure 6)
        rloo:  R - mean of the OTHER answers of the group  =  group_size / (group_size - 1) * (R - mean(group))

    GRPO: Shao et al. 2024, §4.1.2; RLOO: Ahmadian et al. 2024, §3."""
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
    """The paper's PPO (docs/paper.md pitfall 16): the critic's V_old of every state, then gae with R on the last
    token, so A_t = R - V_old(s_t) and G_t = R. Returns the mean V_old(s_0), the critic's guess of the accuracy."""
    values = model.predict([e.prompt_ids + e.response_ids for e in episodes], pad_id, batch_size)
    for e, v in zip(episodes, values):
        p, r = len(e.prompt_ids), len(e.response_ids)
        e.old_values = v[:-1]  # causal shift: value t is the state before token t + 1, as the logprobs
        rewards = [0.0] * (r - 1) + [e.reward] if r else []
        e.advantages, e.returns = gae(rewards, e.old_values[p - 1 : p - 1 + r].tolist())
    first_values = [float(e.old_values[len(e.prompt_ids) - 1]) for e in episodes]  # V_old(s_0) of every answer
    return {"critic/value_s0": float(np.mean(first_values))}


def outcome_advantages(episodes: list[Episode], group_size: int, method: str) -> None:
    """GRPO or RLOO (group_advantages) on every token; answer j of problem i at i * group_size + j."""
    per_answer = group_advantages([e.reward for e in episodes], group_size, method)
    for e, a in zip(episodes, per_answer):
        e.advantages = [a] * len(e.response_ids)


# ---------------------------------------------------------------------------------------------------------------------
# The paper's learning-rate schedule (docs/paper.md §3)


def episode_stats(episodes: list[Episode]) -> dict:
    """An iteration's sample statistics (the README's metrics table)."""
    all_advs = [a for e in episodes for a in e.advantages]
    return {
        "reward/mean": float(np.mean([e.reward for e in episodes])),
        "response/length": float(np.mean([len(e.answer_ids) for e in episodes])),
        "response/unfinished": 1.0 - float(np.mean([e.finished for e in episodes])),
        "advantages/zero_frac": float(np.mean([a == 0.0 for a in all_advs])) if all_advs else 1.0,
    }


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier of optimizer step `step` (0-based) under DeepSpeed 0.14.1's WarmupDecayLR:

        gamma(i) = log(i + 1) / log(W)                  for i < W, with W = max(2, warmup_steps)   (log warmup)
        gamma(i) = max(0, (T - i) / max(1, T - W))      for i >= W, T = total_steps                (linear decay)

    The scheduler steps after the optimizer: step s runs at gamma(s - 1), step 0 at the peak rate."""
    if step == 0:
        return 1.0
    i, w = step - 1, max(2, warmup_steps)
    if i < w:
        return math.log(i + 1) / math.log(w)
    return max(0.0, (total_steps - i) / max(1, total_steps - w))
