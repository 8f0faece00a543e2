"""Tests for ppo.py: logprobs against a slow per-prefix loop, whitening, the clipped loss and KL against hand-computed
numbers, micro-batching == one pass, and the ratio guard; the baselines' pieces (GAE, the clipped value loss, the value
head, GRPO and RLOO advantages) against hand-computed numbers. CPU only, a few seconds."""

import math
import random

import pytest
import torch
from conftest import make_model

from transformers import AutoModelForCausalLM, LlamaConfig

from ppo import (
    RATIO_THRESHOLD,
    Episode,
    ValueModel,
    accumulate_stats,
    critic_advantages,
    gae,
    group_advantages,
    lr_lambda,
    masked_mean,
    masked_whiten,
    ppo_loss,
    ratio_guard_exceeded,
    token_logprobs,
    value_loss,
)

VOCAB = 50
PAD = 0


def right_padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (never pad/bos/eos) right-padded with PAD to max(lengths): (B, T) ids and attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    input_ids = torch.full((len(lengths), T), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for b, n in enumerate(lengths):
        input_ids[b, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        attention_mask[b, :n] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_equal_slow_prefix_loop(family, temperature):
    model = make_model(family, VOCAB, seed=1)
    lengths = [9, 5, 7]
    input_ids, attention_mask = right_padded_batch(lengths)
    with torch.no_grad():
        logprobs, entropy = token_logprobs(model, input_ids, attention_mask, temperature, return_entropy=True)
        assert logprobs.shape == entropy.shape == (3, 8) and logprobs.dtype == torch.float32
        for b, n in enumerate(lengths):
            for t in range(n - 1):
                # Slow path: run the model on the unpadded prefix ids[:t+1] alone; its last logits score token t+1.
                last = model(input_ids=input_ids[b : b + 1, : t + 1]).logits[0, -1] / temperature
                expected = torch.log_softmax(last, dim=-1)
                assert logprobs[b, t].item() == pytest.approx(expected[input_ids[b, t + 1]].item(), abs=1e-5)
                hand_entropy = -(expected.exp() * expected).sum()
                assert entropy[b, t].item() == pytest.approx(hand_entropy.item(), abs=1e-5)
            # Positions whose predicted token is padding are zeroed.
            assert torch.all(logprobs[b, n - 1 :] == 0) and torch.all(entropy[b, n - 1 :] == 0)


def test_token_logprobs_temperature_changes_values_and_padding_does_not():
    model = make_model("qwen2", VOCAB, seed=2)
    input_ids, attention_mask = right_padded_batch([6, 6])
    with torch.no_grad():
        at_1 = token_logprobs(model, input_ids, attention_mask, 1.0)
        at_06 = token_logprobs(model, input_ids, attention_mask, 0.6)
        assert not torch.allclose(at_1, at_06, atol=1e-3), "temperature must change the logprobs"
        # Same rows, padded with 4 extra pad tokens: the real tokens' logprobs must not move.
        padded_ids = torch.cat([input_ids, torch.full((2, 4), PAD)], dim=1)
        padded_mask = torch.cat([attention_mask, torch.zeros((2, 4), dtype=torch.long)], dim=1)
        padded = token_logprobs(model, padded_ids, padded_mask, 0.6)
    torch.testing.assert_close(padded[:, :5], at_06, atol=1e-5, rtol=0)
    assert torch.all(padded[:, 5:] == 0)


def test_token_logprobs_float32_under_bf16_autocast():
    model = make_model("llama", VOCAB, seed=5)
    input_ids, attention_mask = right_padded_batch([7, 4])
    with torch.no_grad():
        exact = token_logprobs(model, input_ids, attention_mask, 0.6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, entropy = token_logprobs(model, input_ids, attention_mask, 0.6, return_entropy=True)
    assert low.dtype == entropy.dtype == torch.float32
    assert not torch.equal(low, exact), "autocast should really have run the model in bf16"
    torch.testing.assert_close(low, exact, atol=0.1, rtol=0)  # bf16 matmuls: close, not equal


def test_token_logprobs_gradient_flows_and_left_padding_is_refused():
    model = make_model("llama", VOCAB, seed=3)
    input_ids, attention_mask = right_padded_batch([5, 3])
    logprobs, entropy = token_logprobs(model, input_ids, attention_mask, 0.6, return_entropy=True)
    assert logprobs.requires_grad and not entropy.requires_grad
    with pytest.raises(AssertionError, match="right-padded"):
        token_logprobs(model, input_ids, attention_mask.flip(1), 0.6)


# --------------------------------------------------------------------------------------- masked_mean / masked_whiten


def test_masked_mean_hand_example():
    x = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))


def test_masked_whiten_hand_example():
    x = torch.tensor([[1.0, 2.0, 3.0, 1000.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased var ((1-2)^2 + 0 + (3-2)^2) / (3-1) = 1, so the result is [-1, 0, 1] / sqrt(1 + eps); pad -> 0.
    expected = torch.tensor([[-1.0, 0.0, 1.0, 0.0]]) / math.sqrt(1.0 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), expected)


def test_masked_whiten_mean_zero_unbiased_std_one_padding_ignored():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, generator=g) * 3.0 + 5.0
    mask = torch.rand(4, 10, generator=g) > 0.3
    white = masked_whiten(x, mask)
    kept = white[mask]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)
    assert kept.std(unbiased=False).item() != pytest.approx(1.0, abs=1e-5), "biased std must differ here"
    assert torch.all(white[~mask] == 0)
    # Changing the padded entries changes nothing.
    torch.testing.assert_close(masked_whiten(torch.where(mask, x, 1e6), mask), white)


# ------------------------------------------------------------------------------------------------------ ppo_loss


def hand_batch():
    """Six response tokens in two rows plus one padded slot per row, eps = 0.2. Per token (A, ratio) -> pg, d pg/d logp:
    (+1, 1.1) inside            pg = -1.1   grad = -A*ratio = -1.1
    (+1, 1.5) above, A>0        pg = -1.2   clipped, grad 0
    (-1, 0.5) below, A<0        pg = +0.8   clipped, grad 0
    (-1, 1.5) above, A<0        pg = +1.5   unclipped (pessimistic side), grad = +1.5
    (+1, 0.5) below, A>0        pg = -0.5   unclipped, grad = -0.5
    (+2, 0.9) inside            pg = -1.8   grad = -1.8
    """
    advantages = torch.tensor([[1.0, 1.0, -1.0, 7.0], [-1.0, 1.0, 2.0, -7.0]])
    ratios = torch.tensor([[1.1, 1.5, 0.5, 30.0], [1.5, 0.5, 0.9, 30.0]])  # the 30s sit on padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    old_logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.2, -4.0, -1.0]])
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)
    return logprobs, old_logprobs, advantages, mask


def test_ppo_loss_hand_computed_value_gradient_and_stats():
    logprobs, old_logprobs, advantages, mask = hand_batch()
    loss, stats = ppo_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    expected = (-1.1 - 1.2 + 0.8 + 1.5 - 0.5 - 1.8) / 6  # = -2.3 / 6
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["loss/policy"] == pytest.approx(expected, abs=1e-6) and stats["loss/kl"] == 0.0
    loss.backward()
    expected_grad = torch.tensor([[-1.1, 0.0, 0.0, 0.0], [1.5, -0.5, -1.8, 0.0]]) / 6
    torch.testing.assert_close(logprobs.grad, expected_grad, atol=1e-6, rtol=0)
    # Clipped branch active on 2 of 6 tokens (A>0 with ratio 1.5, A<0 with ratio 0.5).
    assert stats["loss/clipfrac"] == pytest.approx(2 / 6)
    ratios = [1.1, 1.5, 0.5, 1.5, 0.5, 0.9]
    assert stats["ratio/mean"] == pytest.approx(sum(ratios) / 6, abs=1e-6)
    assert stats["ratio/max"] == pytest.approx(1.5, abs=1e-6), "padding's ratio 30 must be ignored"
    approx_kl = sum((r - 1) - math.log(r) for r in ratios) / 6
    assert stats["loss/approx_kl"] == pytest.approx(approx_kl, abs=1e-6)


def test_ppo_loss_num_tokens_override_and_zero_kl_terms():
    logprobs, old_logprobs, advantages, mask = hand_batch()
    loss, _ = ppo_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, num_tokens=23.0)
    assert loss.item() == pytest.approx(-2.3 / 23, abs=1e-6)
    ref = old_logprobs - 1.0
    for kwargs in [dict(ref_logprobs=None, kl_coef=1.0), dict(ref_logprobs=ref, kl_coef=0.0)]:
        loss_no_kl, stats = ppo_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, **kwargs)
        assert loss_no_kl.item() == pytest.approx(-2.3 / 6, abs=1e-6) and stats["loss/kl"] == 0.0


def test_kl_term_zero_at_reference_hand_value_and_clamp():
    # logprobs == ref and A == 0: the loss and its gradient are exactly 0.
    logprobs = torch.tensor([[-1.0, -2.0, -0.3]], requires_grad=True)
    zeros = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    loss, stats = ppo_loss(
        logprobs, logprobs.detach(), zeros, mask, clip_eps=0.2, ref_logprobs=logprobs.detach(), kl_coef=0.5
    )
    loss.backward()
    assert loss.item() == 0.0 and stats["loss/kl"] == 0.0
    assert torch.all(logprobs.grad == 0)

    # ref - logp = d per token: d=1 -> e - 2; d=-1 -> 1/e; d=5 -> e^5 - 6 = 142.4, clamped to 10 (gradient 0).
    # Two sequences, mask drops the last token of row 1, kl_coef 0.5, sum over tokens then mean over the 2 sequences.
    logprobs = torch.tensor([[-1.0, -2.0], [-6.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -3.0], [-1.0, 100.0]])  # d = [[1, -1], [5, 101 (masked)]]
    mask = torch.tensor([[1, 1], [1, 0]])
    zeros = torch.zeros(2, 2)
    loss, stats = ppo_loss(logprobs, logprobs.detach(), zeros, mask, clip_eps=0.2, ref_logprobs=ref, kl_coef=0.5)
    expected = 0.5 * ((math.e - 2) + math.exp(-1) + 10.0) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-5) and stats["loss/kl"] == pytest.approx(expected, abs=1e-5)
    assert stats["kl/ref"] == pytest.approx(expected / 0.5, abs=1e-5)  # the KL itself, without kl_coef
    loss.backward()
    # d k3 / d logp = 1 - exp(d): pulls logp toward ref; zero where clamped or masked.
    expected_grad = 0.5 / 2 * torch.tensor([[1 - math.e, 1 - math.exp(-1)], [0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected_grad, atol=1e-6, rtol=0)

    # A response token absurdly far from the reference (exp(200) overflows float32): k3 = 10, gradient exactly 0.
    logprobs = torch.tensor([[-201.0]], requires_grad=True)
    loss, _ = ppo_loss(
        logprobs,
        logprobs.detach(),
        torch.zeros(1, 1),
        torch.ones(1, 1),
        clip_eps=0.2,
        ref_logprobs=torch.tensor([[-1.0]]),
        kl_coef=0.5,
    )
    loss.backward()
    assert loss.item() == pytest.approx(5.0) and logprobs.grad.item() == 0.0


# ------------------------------------------------------------------------------------------------- micro-batching


def minibatch_loss_and_grads(model, batches, mask_rows, old, adv, ref, *, num_tokens=None, num_seqs=None):
    """Accumulate .backward() over micro-batches; return the flat gradient and the accumulated stats."""
    model.zero_grad()
    total = {}
    for rows in batches:
        T = int(mask_rows["attention_mask"][rows].sum(1).max())  # trim each micro-batch to its own longest row
        ids, att = mask_rows["input_ids"][rows, :T], mask_rows["attention_mask"][rows, :T]
        logprobs = token_logprobs(model, ids, att, 0.6)
        loss, stats = ppo_loss(
            logprobs,
            old[rows, : T - 1],
            adv[rows, : T - 1],
            mask_rows["response_mask"][rows, : T - 1],
            clip_eps=0.2,
            ref_logprobs=ref[rows, : T - 1],
            kl_coef=0.05,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
        )
        loss.backward()
        total = accumulate_stats(total, stats)
    return torch.cat([p.grad.flatten() for p in model.parameters()]), total


def test_micro_batches_with_global_counts_equal_one_pass():
    model = make_model("llama", VOCAB, seed=4)
    lengths, prompt_len = [16, 6, 12, 5], 3  # very different response lengths
    input_ids, attention_mask = right_padded_batch(lengths, seed=4)
    response_mask = attention_mask[:, 1:].clone()  # (B, T-1) predicted token is a response token ...
    response_mask[:, : prompt_len - 1] = 0  # ... not a prompt token (targets 1..prompt_len-1 are prompt)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        base = token_logprobs(model, input_ids, attention_mask, 0.6)
    old = base + 0.3 * torch.randn(base.shape, generator=g)  # ratios both inside and outside the clip range
    ref = base + 0.5 * torch.randn(base.shape, generator=g)
    adv = masked_whiten(torch.randn(base.shape, generator=g), response_mask)  # whitened once over the minibatch
    data = dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask)

    one_pass, full_stats = minibatch_loss_and_grads(model, [[0, 1, 2, 3]], data, old, adv, ref)
    assert 0 < full_stats["loss/clipfrac"] < 1, "the test needs some clipped and some unclipped tokens"
    num_tokens, num_seqs = float(response_mask.sum()), 4.0
    split, split_stats = minibatch_loss_and_grads(
        model, [[0, 1], [2, 3]], data, old, adv, ref, num_tokens=num_tokens, num_seqs=num_seqs
    )
    torch.testing.assert_close(split, one_pass, atol=1e-5, rtol=0)
    for key, value in full_stats.items():
        assert split_stats[key] == pytest.approx(value, abs=1e-5), key

    # A per-micro-batch mean (each call's own counts, averaged over the 2 micro-batches as plain gradient accumulation
    # would) gives a different gradient: the global counts matter.
    per_micro, _ = minibatch_loss_and_grads(model, [[0, 1], [2, 3]], data, old, adv, ref)
    assert (per_micro / 2 - one_pass).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------ ratio guard


@pytest.mark.parametrize("mean_ratio, exceeded", [(11.0, True), (9.5, False), (1.0, False)])
def test_ratio_guard_over_micro_batches(mean_ratio, exceeded):
    # 4 response tokens in 2 micro-batches; ratios [1, 1, 1, 4*mean - 3] so that the minibatch mean is mean_ratio.
    ratios = torch.tensor([[1.0, 1.0], [1.0, 4 * mean_ratio - 3]])
    old = torch.full((2, 2), -2.0)
    logprobs = old + ratios.log()
    total = {}
    for row in range(2):
        _, stats = ppo_loss(
            logprobs[row : row + 1],
            old[row : row + 1],
            torch.ones(1, 2),
            torch.ones(1, 2),
            clip_eps=0.2,
            num_tokens=4.0,
            num_seqs=2.0,
        )
        total = accumulate_stats(total, stats)
    assert total["ratio/mean"] == pytest.approx(mean_ratio, rel=1e-5)
    assert total["ratio/max"] == pytest.approx(4 * mean_ratio - 3, rel=1e-5)
    assert ratio_guard_exceeded(total) is exceeded
    assert RATIO_THRESHOLD == 10.0
    assert not ratio_guard_exceeded({"ratio/mean": 10.0}), "the paper skips only above 10"
    assert ratio_guard_exceeded({"ratio/mean": 10.001})


# ---------------------------------------------------------------------------------------------------------------------
# The baselines: the paper's PPO critic (GAE, value loss, value head), GRPO, RLOO


def test_gae_with_lambda_1_is_reward_minus_value_and_the_return_is_the_reward():
    values = [0.2, 0.5, 0.9, 0.4]
    advantages, returns = gae([0.0, 0.0, 0.0, 1.0], values)  # gamma = lambda = 1, reward on the last token only
    assert advantages == pytest.approx([0.8, 0.5, 0.1, 0.6]) and returns == pytest.approx([1.0] * 4)
    advantages, returns = gae([0.0, 0.0, 0.0, 0.0], values)  # an unfinished or wrong answer: R = 0
    assert advantages == pytest.approx([-0.2, -0.5, -0.9, -0.4]) and returns == pytest.approx([0.0] * 4)
    assert gae([], []) == ([], [])


def test_gae_general_gamma_lambda_by_hand():
    # delta = r_t + g V_{t+1} - V_t: d1 = 1 + 0 - 0.5 = 0.5; d0 = 0 + 0.9 * 0.5 - 0.2 = 0.25
    # A1 = 0.5; A0 = 0.25 + 0.9 * 0.8 * 0.5 = 0.61; G = A + V
    advantages, returns = gae([0.0, 1.0], [0.2, 0.5], gamma=0.9, lam=0.8)
    assert advantages == pytest.approx([0.61, 0.5]) and returns == pytest.approx([0.81, 1.0])


def test_value_loss_against_the_formula_clip_inactive_and_active():
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    new = torch.tensor([[0.6, 0.9, 0.1, 0.0]], requires_grad=True)  # moves of +0.1 (inside 0.2), +0.4, -0.4, -0.5
    returns = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    loss, stats = value_loss(new, old, returns, mask, clip_range=0.2)
    # token 0: max(0.4^2, 0.4^2) = 0.16 (clip inactive); token 1: max(0.1^2, (0.7 - 1)^2 = 0.09) = 0.09 (clipped wins);
    # token 2: max(0.1^2, (0.3 - 0)^2) = 0.09 (clipped wins); loss = 0.5 * (0.16 + 0.09 + 0.09) / 3
    assert loss.item() == pytest.approx(0.5 * 0.34 / 3)
    assert stats["critic/clipfrac"] == pytest.approx(2 / 3) and stats["critic/loss"] == pytest.approx(loss.item())
    assert stats["critic/abs_error"] == pytest.approx((0.4 + 0.1 + 0.1) / 3)
    loss.backward()
    # d/dV of 0.5 (V - G)^2 / 3 = (V - G) / 3 where the unclipped branch wins; 0 where the clipped one does or masked
    assert new.grad[0].tolist() == pytest.approx([(0.6 - 1.0) / 3, 0.0, 0.0, 0.0])


def test_value_loss_counts_no_clip_inside_the_range_whatever_the_rounding():
    """Inside the clip range the clipped value is V itself, so no token counts as clipped and the gradient is the
    unclipped one. Values near 0 of both signs (a fresh head's) expose the rounding of the old form, V_old +
    clamp(V - V_old, -c, c), which counted several percent of such tokens as clipped."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(64, 64, generator=g) * 0.02  # (B, T) V_old near 0
    new = (torch.randn(64, 64, generator=g) * 0.02).requires_grad_()  # V, drawn apart from V_old (measured 9% clipped)
    assert float((new.detach() - old).abs().max()) < 0.2, "every value inside the clip range"
    returns = (torch.rand(64, 64, generator=g) < 0.5).float()
    loss, stats = value_loss(new, old, returns, torch.ones(64, 64), clip_range=0.2)
    assert stats["critic/clipfrac"] == 0.0
    loss.backward()
    torch.testing.assert_close(new.grad, (new.detach() - returns) / (64 * 64), rtol=1e-6, atol=0.0)


def test_value_loss_without_clipping_is_half_mean_squared_error_and_counts_override():
    new = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    returns = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    mask = torch.ones(2, 2)
    loss, _ = value_loss(new, new, returns, mask)  # V = V_old: the clip is inactive
    assert loss.item() == pytest.approx(0.5 * ((0.9**2) + 0.2**2 + 0.7**2 + 0.6**2) / 4)
    half, _ = value_loss(new, new, returns, mask, num_tokens=8)  # the whole minibatch's count, as in ppo_loss
    assert half.item() == pytest.approx(loss.item() / 2)


def test_value_head_initialisation_and_output():
    hidden = 1024
    config = LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    torch.manual_seed(0)
    critic = ValueModel(AutoModelForCausalLM.from_config(config), generator=torch.Generator().manual_seed(0))
    weight = critic.head.weight.detach().flatten()  # (hidden,) ~ N(0, 1 / sqrt(hidden + 1))
    sigma = 1 / math.sqrt(hidden + 1)
    assert abs(weight.mean().item()) < 4 * sigma / math.sqrt(hidden)
    assert weight.std().item() == pytest.approx(sigma, rel=0.1)
    assert torch.equal(critic.head.bias, torch.zeros(1))
    assert not any(name.startswith("lm_head") for name, _ in critic.named_parameters()), "the LM head is dropped"
    ids, mask = right_padded_batch([5, 3])
    values = critic(ids % 32, mask)
    assert values.shape == (2, 5) and values.dtype == torch.float32
    # causal: a row's values do not depend on what follows, so the padded row agrees with itself unpadded
    assert torch.allclose(values[1, :3], critic(ids[1:, :3] % 32, mask[1:, :3])[0], atol=1e-5)


def tiny_episodes(num: int, seed: int = 0) -> list[Episode]:
    """num unfinished episodes with reward 0 (no EOS): one prompt, random responses and advantages."""
    rng = random.Random(seed)
    episodes = []
    for _ in range(num):
        response = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 6))]
        episodes.append(Episode([1, 5, 6, 7], response, False, 0.0, [rng.uniform(-1, 1) for _ in response]))
    return episodes


def test_critic_advantages_are_reward_minus_old_value_with_the_reward_on_the_last_token():
    critic = ValueModel(make_model("llama", VOCAB, seed=1), generator=torch.Generator().manual_seed(0))
    episodes = tiny_episodes(3)
    episodes[0].response_ids.append(2)  # a finished, right answer: R = 1 on its EOS
    episodes[0].finished, episodes[0].reward = True, 1.0
    critic_advantages(critic, episodes, PAD, batch_size=2)
    for e in episodes:
        p, r = len(e.prompt_ids), len(e.response_ids)
        with torch.no_grad():
            values = critic(torch.tensor([e.prompt_ids + e.response_ids]), torch.ones(1, p + r, dtype=torch.long))
        v_old = values[0, p - 1 : p - 1 + r]  # V(state before response token t) is read at position p - 1 + t
        assert e.advantages == pytest.approx((e.reward - v_old).tolist(), abs=1e-5)  # GAE, lambda = 1: R - V_old
        assert e.returns == pytest.approx([e.reward] * r)
        assert torch.allclose(e.old_values, values[0, :-1], atol=1e-6)
    states = [e.prompt_ids + e.response_ids[:1] for e in episodes]  # state_values: V at each state's last token
    expected = [float(e.old_values[len(e.prompt_ids)]) for e in episodes]
    assert critic.state_values(states, PAD, batch_size=2) == pytest.approx(expected, abs=1e-5)


def test_group_advantages_by_hand():
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # three prompts, three answers each; the last all right
    rloo = group_advantages(rewards, 3, "rloo")  # R - mean of the other two
    assert rloo == pytest.approx([1.0, -0.5, -0.5, -1.0, 0.5, 0.5, 0.0, 0.0, 0.0])
    grpo = group_advantages(rewards, 3, "grpo")  # group 1: mean 1/3, sample std sqrt(1/3)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert grpo[:3] == pytest.approx([(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4)])
    assert grpo[3:6] == pytest.approx([-x for x in grpo[:3]])
    assert grpo[6:] == [0.0, 0.0, 0.0] and all(math.isfinite(a) for a in grpo)  # equal rewards: 0, no division by 0
    assert group_advantages([0.0, 0.0], 2, "grpo") == [0.0, 0.0]
    with pytest.raises(AssertionError):
        group_advantages([1.0, 0.0, 1.0], 2, "rloo")  # not whole groups


def test_lr_schedule_is_deepspeeds_warmup_decay_as_its_engine_steps_it():
    """DeepSpeed 0.14.1 WarmupDecayLR, W = 4 warmup steps, T = 20: gamma(i) = log(i + 1) / log(4) for i < 4, then
    (20 - i) / 16; optimizer step s runs at gamma(s - 1) and step 0 at the optimizer's own (peak) rate."""
    lr = lambda s: lr_lambda(s, warmup_steps=4, total_steps=20)  # noqa: E731
    assert lr(0) == 1.0  # before the engine's first scheduler step
    assert lr(1) == 0.0  # gamma(0) = log(1) / log(4)
    assert lr(2) == pytest.approx(0.5) and lr(3) == pytest.approx(math.log(3) / math.log(4))  # log(2) / log(4)
    assert lr(4) == pytest.approx(1.0) and lr(5) == 1.0  # gamma(3) = log(4) / log(4); gamma(4) = 16 / 16
    assert lr(6) == pytest.approx(15 / 16) and lr(20) == pytest.approx(1 / 16) and lr(21) == 0.0 and lr(30) == 0.0
    # DeepSpeed raises W to 2 so that log(W) > 0: with W = 0 or 1 the second step runs at 0, the third at the peak
    for w in (0, 1):
        assert [lr_lambda(s, warmup_steps=w, total_steps=10) for s in range(4)] == [1.0, 0.0, 1.0, 1.0]
