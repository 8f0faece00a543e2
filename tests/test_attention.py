"""attention.py, the KV cache in blocks and the attention that reads it: the root part + (row, block) parts merged by
log-sum-exp equal SDPA over the row's keys (grouped-query heads, nested and one-token prefixes, rows of 1 to 3 blocks,
roots with different numbers of rows); the merge by hand; the prefill's keys land in the root's blocks; without a
Step it is the model's SDPA, and use() gives the model its attention back."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import attention
from attention import BLOCK


def random_case(seed: int, kv_heads: int, groups: int, dim: int = 8):
    """3 roots of 1, 40 and 70 tokens in blocks, 7 rows continuing them with prefix lengths 1..70 (one-token prefixes
    included) and 1 to 3 blocks of generated tokens each (the last one fed now). Returns the pools, the Step, the
    queries and, per row, its keys and values in order (root prefix, then its own), for SDPA."""
    g = torch.Generator().manual_seed(seed)
    root_len, row_root = [1, 40, 70], [0, 1, 1, 2, 2, 2, 2]
    prefix_len, generated = [1, 40, 3, 70, 33, 1, 64], [5, 33, 1, 64, 70, 2, 32]
    cache = attention.BlockCache(SimpleNamespace(get_text_config=lambda: SimpleNamespace(
        num_hidden_layers=1, num_key_value_heads=kv_heads, head_dim=dim)), 40, torch.float32, torch.device("cpu"))
    pool = cache.layers[0]
    pool.normal_(generator=g)  # stale contents: masked slots must not matter
    keys, values = pool[:, :, 0], pool[:, :, 1]
    free = iter(torch.randperm(39, generator=g).add(1).tolist())  # blocks in any order, never block 0
    root_blocks = [[next(free) for _ in range(-(-n // BLOCK))] for n in root_len]
    row_blocks = [[next(free) for _ in range(-(-n // BLOCK))] for n in generated]
    flat = lambda pool, blocks, n: pool[blocks].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :n]  # noqa: E731
    seqs = [tuple(torch.cat([flat(p, root_blocks[r], n), flat(p, row_blocks[b], generated[b])], dim=1)
                  for p in (keys, values)) for b, (r, n) in enumerate(zip(row_root, prefix_len))]
    width, widest = 4, 3  # grid: root 2 has 4 rows; roots padded to 3 blocks
    grid_slot = torch.tensor([0, 4, 5, 8, 9, 10, 11])
    grid_len = torch.zeros(3 * width, dtype=torch.long)
    grid_len[grid_slot] = torch.tensor(prefix_len)
    pairs = [(b, blk, BLOCK if j < len(row_blocks[b]) - 1 else generated[b] - BLOCK * j)
             for b in range(7) for j, blk in enumerate(row_blocks[b])]
    step = attention.Step(
        cache, write_block=torch.tensor([0] * 7), write_slot=torch.tensor([0] * 7),  # the fed keys: scratch here
        root_blocks=torch.tensor([rb + [0] * (widest - len(rb)) for rb in root_blocks]), grid_slot=grid_slot,
        visible=torch.arange(widest * BLOCK) < grid_len.view(3, width, 1),
        pair_row=torch.tensor([p[0] for p in pairs]), pair_block=torch.tensor([p[1] for p in pairs]),
        pair_visible=torch.arange(BLOCK) < torch.tensor([p[2] for p in pairs])[:, None],
        fresh_blocks=torch.zeros(0, dtype=torch.long))
    query = torch.randn(7, kv_heads * groups, 1, dim, generator=g)
    return step, query, seqs


@pytest.mark.parametrize("seed, kv_heads, groups", [(0, 2, 2), (1, 4, 1), (2, 1, 4)])
def test_paged_attention_equals_sdpa_over_each_rows_keys(seed, kv_heads, groups):
    step, query, seqs = random_case(seed, kv_heads, groups)
    module = SimpleNamespace(layer_idx=0)
    fed = torch.zeros(7, kv_heads, 1, 8)  # written to scratch block 0, which nothing visible reads
    out, _ = attention.paged_attention(module, query, fed, fed, None, scaling=1 / math.sqrt(8), paged=step)
    for b, (k, v) in enumerate(seqs):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[b], k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0))  # head h: kv h // G
        torch.testing.assert_close(out[b, 0], expected[:, 0], atol=1e-5, rtol=1e-5)


def test_the_fed_tokens_keys_and_values_go_to_their_block_and_slot():
    step, query, _ = random_case(3, 2, 2)
    step.write_block, step.write_slot = torch.tensor([5, 6, 7, 8, 9, 10, 11]), torch.arange(7) * 4
    fed_keys, fed_values = torch.randn(7, 2, 1, 8), torch.randn(7, 2, 1, 8)
    attention.paged_attention(SimpleNamespace(layer_idx=0), query, fed_keys, fed_values, None, scaling=0.3, paged=step)
    keys, values = step.cache.layers[0][:, :, 0], step.cache.layers[0][:, :, 1]
    for b in range(7):
        assert torch.equal(keys[5 + b, :, 4 * b], fed_keys[b, :, 0])
        assert torch.equal(values[5 + b, :, 4 * b], fed_values[b, :, 0])


def test_merge_by_hand():
    """A root part with scores [0, ln 3] over values 1 and 2, and one block part with score ln 2 over value 4: the
    weights are 1/6, 3/6 and 2/6. Row 1's block part has a score 100 higher than its root part's: it alone counts."""
    root_out = torch.tensor([(1 * 1 + 2 * 3) / 4, 5.0]).view(2, 1, 1, 1)  # (B, H=1, G=1, D=1) normalised
    root_lse = torch.tensor([math.log(4.0), 0.0]).view(2, 1, 1)
    pair_out, pair_lse = torch.tensor([4.0, 7.0]).view(2, 1, 1, 1), torch.tensor([math.log(2.0), 100.0]).view(2, 1, 1)
    out = attention.merge(root_out, root_lse, pair_out, pair_lse, torch.tensor([0, 1]))
    assert out.flatten().tolist() == pytest.approx([(1 + 2 * 3 + 4 * 2) / 6, 7.0])


def test_the_prefill_keys_land_in_the_roots_blocks():
    cache = attention.BlockCache(SimpleNamespace(get_text_config=lambda: SimpleNamespace(
        num_hidden_layers=2, num_key_value_heads=2, head_dim=4)), 8, torch.float32, torch.device("cpu"))
    keys, values = torch.randn(2, 2, 40, 4), torch.randn(2, 2, 40, 4)  # roots of 40 and (padded) 33 tokens
    cache.write_roots(1, keys, values, torch.tensor([[3, 5], [7, 0]]))  # the second root needs 2 blocks: padded
    pool_keys, pool_values = cache.layers[1][:, :, 0], cache.layers[1][:, :, 1]
    assert torch.equal(pool_keys[3], keys[0, :, :BLOCK]) and torch.equal(pool_keys[5, :, :8], keys[0, :, BLOCK:])
    assert torch.equal(pool_values[7], values[1, :, :BLOCK])
    gathered = attention.gather_roots(cache.layers[1], torch.tensor([[3, 5]]))  # (R, H, 2, T, D)
    assert torch.equal(gathered[0, :, 0, :40], keys[0]) and torch.equal(gathered[0, :, 1, :40], values[0])
    assert not cache.layers[0][0].any(), "block 0, scratch, starts zeroed"


def test_without_a_step_it_is_sdpa_and_the_model_gets_its_attention_back():
    model = make_model("llama", 64)
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    plain = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0]
    assert torch.equal(attention.paged_attention(module, q, k, v, mask, scaling=0.25)[0], plain)
    assert attention.supports(model)
    with attention.use(model):
        assert model.config._attn_implementation == attention.NAME
    assert model.config._attn_implementation == "sdpa"


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer():
    config = make_model("llama", 64).config  # 2 layers, 2 key/value heads of 16
    assert attention.kv_bytes_per_token(config, torch.float32) == 2 * 2 * 2 * 16 * 4
    assert attention.kv_bytes_per_token(config, torch.bfloat16) == 2 * 2 * 2 * 16 * 2
