"""attention.py, the shared-prefix attention of the MC rollouts: the merged prefix + suffix attention equals SDPA over
the concatenated keys on random inputs (grouped-query heads, nested and one-token prefixes, roots with different
numbers of rows); through a Hugging Face model, rollout.sample gives the copy path's tokens and logprobs (Llama and
Qwen2, several chunks, stops, stop strings, bf16 autocast); the rule that picks it; more rows per chunk."""

import math

import pytest
import torch
from conftest import make_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import attention
import reward
import rollout


def random_case(seed: int, kv_heads: int = 2, groups: int = 2, dim: int = 16, generated: int = 4):
    """3 roots of 1, 5 and 9 tokens (padded to 9), 7 rows continuing them with prefix lengths 1..9 (one-token
    prefixes included), each with `generated` tokens of its own."""
    g = torch.Generator().manual_seed(seed)
    root_len, row_root = 9, torch.tensor([0, 1, 1, 2, 2, 2, 2])
    prefix_len = torch.tensor([1, 5, 2, 9, 4, 1, 7])
    root_keys, root_values = (torch.randn(3, kv_heads, root_len, dim, generator=g) for _ in range(2))
    query = torch.randn(7, kv_heads * groups, dim, generator=g)
    keys, values = (torch.randn(7, kv_heads, generated, dim, generator=g) for _ in range(2))
    return query, keys, values, root_keys, root_values, row_root, prefix_len


def reference(query, keys, values, root_keys, root_values, row_root, prefix_len) -> torch.Tensor:
    """SDPA, one row at a time, over the row's own prefix of its root followed by its generated tokens."""
    groups = query.shape[1] // keys.shape[1]
    out = []
    for b in range(len(query)):
        r, n = int(row_root[b]), int(prefix_len[b])
        k = torch.cat([root_keys[r, :, :n], keys[b]], dim=1).repeat_interleave(groups, dim=0)  # query head h: kv h // G
        v = torch.cat([root_values[r, :, :n], values[b]], dim=1).repeat_interleave(groups, dim=0)
        out.append(torch.nn.functional.scaled_dot_product_attention(query[b][:, None], k, v)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("seed, kv_heads, groups", [(0, 2, 2), (1, 4, 1), (2, 1, 4)])
def test_the_merged_attention_equals_sdpa_over_prefix_and_suffix(seed, kv_heads, groups):
    query, keys, values, root_keys, root_values, row_root, prefix_len = random_case(seed, kv_heads, groups)
    shared = attention.SharedPrefix([(root_keys, root_values)], row_root, prefix_len).group_rows()
    out = attention.merged_attention(query, keys, values, root_keys, root_values, shared, 1 / math.sqrt(16))
    expected = reference(query, keys, values, root_keys, root_values, row_root, prefix_len)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert shared.valid.shape == (3, 4, 9) and shared.valid.sum() == int(prefix_len.sum())  # root 2 has 4 rows


def test_rows_are_grouped_by_root_after_rows_drop():
    query, keys, values, root_keys, root_values, row_root, prefix_len = random_case(3)
    keep = torch.tensor([6, 1, 3])  # rows reordered and dropped, as DecodeCache.drop_rows leaves them
    shared = attention.SharedPrefix([(root_keys, root_values)], row_root[keep], prefix_len[keep]).group_rows()
    out = attention.merged_attention(query[keep], keys[keep], values[keep], root_keys, root_values, shared, 0.25)
    rows = (query[keep], keys[keep], values[keep])
    expected = reference(*rows, root_keys, root_values, row_root[keep], prefix_len[keep])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_without_a_shared_prefix_it_is_sdpa_and_the_model_gets_its_attention_back():
    model = make_model("llama", 64)
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    plain = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0]
    assert torch.equal(attention.shared_prefix_attention(module, q, k, v, mask, scaling=0.25)[0], plain)
    assert attention.supports(model)
    with attention.use(model):
        assert model.config._attn_implementation == attention.NAME
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("max_batch_tokens", [1 << 18, 200])  # one chunk; several (differently cut on each path)
def test_sample_shared_gives_the_copy_paths_tokens_and_logprobs(tokenizer, family, max_batch_tokens):
    """Greedy, nested prefixes (a root and two of its prefixes), a one-token prefix, K = 3, rows that stop at different
    steps (their length limits differ; an EOS bias) and at the paper's stop string; and K = 1."""
    model = make_model(family, len(tokenizer))
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, len(tokenizer), (40,), generator=g).tolist()
    prefixes = [base[:1], base[:10], base[:25], base, [5, 6, 7, 8] + base[:12], [9]]
    with torch.no_grad():
        model.lm_head.weight[2] += 0.5 * model.lm_head.weight.std()  # EOS now and then: rows stop at different steps
    for num_samples in (3, 1):
        kwargs = dict(num_samples=num_samples, max_new_tokens=20, temperature=0.0, top_p=1.0, eos_token_id=2,
                      stop_strings=reward.STOP_STRINGS, tokenizer=tokenizer, max_batch_tokens=max_batch_tokens,
                      max_length=45)  # the 40-token prefix may make 5 tokens only
        copied, shared = (rollout.sample(model, prefixes, shared=s, **kwargs) for s in (False, True))
        assert shared.response_ids == copied.response_ids and shared.finished == copied.finished
        assert len({len(r) for r in copied.response_ids}) > 1, "rows should stop at different steps"
        for a, b in zip(shared.logprobs, copied.logprobs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_under_bf16_autocast_the_shared_logprobs_stay_close(tokenizer):
    model = make_model("qwen2", len(tokenizer))
    prefixes = [list(range(3, 30)), list(range(3, 12)), [7, 8, 9]]
    kwargs = dict(num_samples=4, max_new_tokens=8, temperature=0.0, top_p=1.0, eos_token_id=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        copied, shared = (rollout.sample(model, prefixes, shared=s, **kwargs) for s in (False, True))
    gaps = [float((a - b).abs().max()) for a, b in zip(shared.logprobs, copied.logprobs)
            if len(a) and len(a) == len(b)]
    assert gaps and max(gaps) < 0.05, gaps  # bf16: different roundings of the same sums


def test_sharing_is_used_where_it_was_measured_to_pay():
    assert rollout.sharing_pays(list(range(64)), 8)  # the answers: 64 prompts x 8
    assert rollout.sharing_pays([0] * 5, 9)  # one answer's 5 nested states x K = 9
    assert not rollout.sharing_pays([0, 1], 9)  # 18 rows
    assert not rollout.sharing_pays(list(range(32)), 2)  # 2 rows per root
    assert not rollout.sharing_pays(list(range(64)), 1)  # nothing shared (evaluation's greedy answers)


def test_a_chunk_holds_more_rows_when_roots_are_shared():
    lens, roots = [300] * 8 + [100] * 8, list(range(8)) + [8 + i // 2 for i in range(8)]
    kwargs = dict(num_samples=9, max_new_tokens=100, max_batch_tokens=20_000)
    copied = rollout.plan_chunks(lens, roots, **kwargs)
    shared = rollout.plan_chunks(lens, roots, shared=True, **kwargs)
    # copied: 9 rows x (300 + 100) per long prefix, 5 a chunk, then 9 x 200 per short one; shared: 12 roots padded
    # to 300 once, + 16 x 9 rows x 100: 18,000 tokens, all in one chunk
    assert [len(c) for c in copied] == [5, 5, 6] and len(shared) == 1 and sorted(shared[0]) == list(range(16))
