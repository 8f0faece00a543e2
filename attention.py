"""The KV cache that rollout.sample decodes with, held in blocks, and the attention that reads it.

Memory in blocks (vLLM's paged attention, Kwon et al. 2023): every layer has one pool of keys and one of values,
(NB, H, BLOCK, D) in the compute dtype, made once per sample call. A root (a prefix of the call that others start
with, rollout.find_roots) holds ceil(T / BLOCK) blocks, written by the prefill; each row's generated tokens hold
blocks of their own, one more every BLOCK tokens. So the cache holds what the rows contain, not what they might
grow to, and a block that a finished row frees is taken by the next one (rollout.Scheduler decides who holds what).
Block 0 is scratch: padding writes to it and reads from it, always masked.

One decoding step of row b, which continues a prefix of L_b tokens of its root and has fed i_b + 1 tokens of its own:

    root part    its query against the root's keys [0, L_b); the queries of all rows of one root stacked, so a root
                 is one matrix product for all its rows (its blocks gathered into (H, T, D) once per layer)
    block part   its query against each block of its own keys: one batched matrix product over every (row, block)
                 pair, the last block masked past its written slots (flash-decoding, split over blocks)
    merge        every part of a row merged by its log-sum-exp (Hydragen, Juravsky et al. 2024):
                 o = sum_i o_i exp(lse_i - lse),  lse = log sum_i exp(lse_i)

where o_i is part i's softmax-weighted values and lse_i the log-sum-exp of its scores. Exact: the softmax over the
union of the key sets, split into parts (tests/test_attention.py: equal to SDPA within 1e-5). Scores and the merge are
float32; the products run in the compute dtype. Compute and memory follow the tokens the rows hold: no row is padded
to the longest one.

It plugs into a Hugging Face model through its attention interface: use(model) makes `paged_attention` the model's
attention; a forward call given paged=Step(...) runs the above, any other call (the prefill, training) the model's
usual SDPA.

Letters: B rows, R roots, N the most rows of one root, M (row, block) pairs, Hq query heads, H key/value heads,
G = Hq / H, T root positions, D head dim. This file imports no project file.
"""

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "paged"
BLOCK = 32  # tokens per block: a row wastes half a block on average, and one (row, block) pair is one small product
MASKED = -1e30  # a score no softmax keeps (finite, so that a padded grid row of no key gives no NaN)
NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # a 4D mask is used as given; paged_attention ignores it


class BlockCache:
    """The keys and values pools, one pair per layer, (NB, H, BLOCK, D) each, zeroed (a masked slot then holds no
    NaN that a zero weight could turn into one)."""

    def __init__(self, config, num_blocks: int, dtype: torch.dtype, device: torch.device):
        layers, heads, dim = kv_shape(config)
        shape = (num_blocks, heads, BLOCK, dim)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(layers)]
        self.no_mask = NO_MASK.to(device)  # what the decoding steps pass as their attention mask, made once

    def write_roots(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, blocks: torch.Tensor) -> None:
        """The prefill's keys and values of R roots, (R, H, T, D), into their blocks (R, ceil(T / BLOCK)), padding
        into block 0."""
        for pool, new in zip(self.layers[layer_idx], (keys, values)):
            num_roots, heads, length, dim = new.shape
            width = blocks.shape[1] * BLOCK
            new = torch.nn.functional.pad(new, (0, 0, 0, width - length))  # (R, H, width, D)
            new = new.view(num_roots, heads, -1, BLOCK, dim).transpose(1, 2).reshape(-1, heads, BLOCK, dim)
            pool.index_copy_(0, blocks.flatten(), new.to(pool.dtype))


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a Hugging Face decoder config."""
    config = config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, dim


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one cached token holds in the pools."""
    layers, heads, dim = kv_shape(config)
    return 2 * layers * heads * dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class Step:
    """What one decoding step's attention reads besides the pools (rollout.Scheduler.step_inputs makes it): where the
    fed token's keys and values go, the live roots' blocks, the rows grouped by root, and the (row, block) pairs."""

    cache: BlockCache
    write_block: torch.Tensor  # (B,) the block of each row's fed token
    write_slot: torch.Tensor  # (B,) its slot in that block
    root_blocks: torch.Tensor  # (R, NR) each live root's blocks, padded with block 0
    grid_slot: torch.Tensor  # (B,) each row's place among the (R, N) grid rows: rows of root r at r * N, r * N + 1, ...
    visible: torch.Tensor  # (R, N, NR * BLOCK) True where a grid row may see a root position (t < L_b)
    pair_row: torch.Tensor  # (M,) the row of each (row, block) pair
    pair_block: torch.Tensor  # (M,) its block
    pair_visible: torch.Tensor  # (M, BLOCK) True on the block's written slots


def supports(model) -> bool:
    """Can model take this attention (a Hugging Face model whose attention layers call the attention interface)?"""
    return hasattr(model, "set_attn_implementation") and getattr(model.config, "_attn_implementation", None) in (
        "sdpa", NAME)


def use(model) -> contextlib.AbstractContextManager:
    """Within the block, model's attention is paged_attention (registered once); on exit its own again."""
    AttentionInterface.register(NAME, paged_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return swapped_attention(model)


@contextlib.contextmanager
def swapped_attention(model):
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def paged_attention(module, query, key, value, attention_mask, scaling=None, paged: Step | None = None, **kwargs):
    """The attention implementation: with paged (one decoding step; query (B, Hq, 1, D), key and value (B, H, 1, D),
    the fed tokens'), write the fed keys and values to their blocks, then the root and block parts, merged (module
    docstring); else SDPA. Returns (B, 1, Hq, D), as Hugging Face's attention functions do, and no weights."""
    if paged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    keys, values = paged.cache.layers[module.layer_idx]  # (NB, H, BLOCK, D)
    keys[paged.write_block, :, paged.write_slot] = key[:, :, 0].to(keys.dtype)
    values[paged.write_block, :, paged.write_slot] = value[:, :, 0].to(values.dtype)
    rows, num_heads, _, dim = query.shape
    q = query[:, :, 0].reshape(rows, keys.shape[1], -1, dim)  # (B, H, G, D): grouped-query heads share a K/V head
    root_out, root_lse = root_part(q, keys, values, paged, scaling)  # (B, H, G, D), (B, H, G)
    pair_out, pair_lse = block_part(q, keys, values, paged, scaling)  # (M, H, G, D), (M, H, G)
    owner = torch.cat([torch.arange(rows, device=q.device), paged.pair_row])  # (B + M,) the row of every part
    out = merge(torch.cat([root_out, pair_out]), torch.cat([root_lse, pair_lse]), owner, rows)  # (B, H, G, D)
    return out.to(query.dtype).reshape(rows, 1, num_heads, dim), None


def root_part(q, keys, values, paged: Step, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's attention over its root's first L_b keys, root by root, the rows of a root stacked (one batched
    matrix product over the R roots). q (B, H, G, D). Returns the normalised output (B, H, G, D) and the log-sum-exp
    of the scores (B, H, G)."""
    rows, heads, groups, dim = q.shape
    num_roots, width, length = paged.visible.shape  # R, N, T
    root_keys, root_values = (gather_roots(pool, paged.root_blocks) for pool in (keys, values))  # (R, H, T, D)
    grid = q.new_zeros(num_roots * width, heads, groups, dim)
    grid[paged.grid_slot] = q
    grid = grid.view(num_roots, width, heads, groups, dim).transpose(1, 2).reshape(num_roots, heads, -1, dim)
    scores = torch.matmul(grid.to(root_keys.dtype), root_keys.transpose(-1, -2)).float() * scaling  # (R, H, N G, T)
    scores = scores.view(num_roots, heads, width, groups, length)
    scores = scores.masked_fill(~paged.visible[:, None, :, None, :], MASKED)  # a row sees its own prefix only
    lse = torch.logsumexp(scores, dim=-1)  # (R, H, N, G)
    weights = torch.exp(scores - lse[..., None]).to(root_values.dtype).view(num_roots, heads, -1, length)
    out = torch.matmul(weights, root_values).view(num_roots, heads, width, groups, dim)  # (R, H, N, G, D)
    out = out.transpose(1, 2).reshape(num_roots * width, heads, groups, dim)[paged.grid_slot]
    lse = lse.transpose(1, 2).reshape(num_roots * width, heads, groups)[paged.grid_slot]
    return out, lse


def gather_roots(pool: torch.Tensor, root_blocks: torch.Tensor) -> torch.Tensor:
    """The live roots' keys (or values) from their blocks: pool (NB, H, BLOCK, D), root_blocks (R, NR). Returns
    (R, H, NR * BLOCK, D)."""
    num_roots, width = root_blocks.shape
    blocks = pool[root_blocks.flatten()].view(num_roots, width, *pool.shape[1:])  # (R, NR, H, BLOCK, D)
    return blocks.transpose(1, 2).reshape(num_roots, pool.shape[1], width * pool.shape[2], pool.shape[3])


def block_part(q, keys, values, paged: Step, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's attention over each block of its own keys: one product per (row, block) pair. q (B, H, G, D).
    Returns each pair's normalised output (M, H, G, D) and log-sum-exp (M, H, G)."""
    block_keys, block_values = keys[paged.pair_block], values[paged.pair_block]  # (M, H, BLOCK, D)
    pair_q = q[paged.pair_row].to(block_keys.dtype)  # (M, H, G, D)
    scores = torch.matmul(pair_q, block_keys.transpose(-1, -2)).float() * scaling  # (M, H, G, BLOCK)
    scores = scores.masked_fill(~paged.pair_visible[:, None, None, :], MASKED)  # slots not yet written
    lse = torch.logsumexp(scores, dim=-1)  # (M, H, G)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(block_values.dtype), block_values)  # (M, H, G, D)
    return out, lse


def merge(outs: torch.Tensor, lses: torch.Tensor, owner: torch.Tensor, rows: int) -> torch.Tensor:
    """Merge parts of attention by their log-sum-exp: outs (P, H, G, D), lses (P, H, G), owner (P,) the row of each
    part. Returns (B, H, G, D) float32: o = sum_i o_i exp(lse_i - lse), lse = log sum_i exp(lse_i)."""
    top = lses.new_full((rows, *lses.shape[1:]), MASKED).scatter_reduce_(  # (B, H, G) each row's largest
        0, owner[:, None, None].expand_as(lses), lses, "amax")
    weights = torch.exp(lses - top[owner])  # (P, H, G) <= 1, stable
    total = torch.zeros_like(top).index_add_(0, owner, weights)  # (B, H, G) = exp(lse - top)
    out = torch.zeros((rows, *outs.shape[1:]), device=outs.device)  # (B, H, G, D)
    out.index_add_(0, owner, outs.float() * weights[..., None])
    return out / total[..., None]
