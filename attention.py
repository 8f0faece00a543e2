"""The KV cache that rollout.sample decodes with, held in blocks, and the attention that reads it: the mechanics of
rollout.py's departure 4 (the paper samples with vLLM), with no departure of its own.

Memory in blocks (vLLM's paged attention, Kwon et al. 2023): each layer has one pool (NB, H, 2, BLOCK, D) of keys and
values side by side, made once per sample call. A root (rollout.find_roots) holds ceil(T / BLOCK) blocks, written by
its prefill; each row's generated tokens take a block every BLOCK tokens (scheduler.py decides who holds what), so
the cache holds what the rows contain. Block 0 is scratch: padding writes and reads it, always masked.

One decoding step of row b, which continues a prefix of L_b tokens of its root:

    root part    its query against the root's keys [0, L_b); a root's rows stacked: one product per root
    block part   its query against each block of its own keys: one batched product over (row, block) pairs
    merge        the parts merged by their log-sum-exp (Hydragen, Juravsky et al. 2024):
                 o = sum_i o_i exp(lse_i - lse),  lse = log sum_i exp(lse_i)

Exact: the softmax over the union of the key sets, split into parts (tests/test_attention.py: SDPA's within 1e-5);
scores and the merge in float32. use(model) plugs paged_attention into the model's attention interface: a forward
call given paged=Step(...) runs the above, any other call the model's usual SDPA.

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
    """The pools, one per layer, (NB, H, 2, BLOCK, D): keys at [:, :, 0], values at [:, :, 1]. A row's block is zeroed
    when taken (Step.fresh_blocks), so that no masked slot holds a NaN."""

    def __init__(self, config, num_blocks: int, dtype: torch.dtype, device: torch.device):
        layers, heads, dim = kv_shape(config)
        self.layers = [torch.empty((num_blocks, heads, 2, BLOCK, dim), dtype=dtype, device=device)
                       for _ in range(layers)]
        for pool in self.layers:
            pool[0].zero_()
        self.no_mask = NO_MASK.to(device)  # what the decoding steps pass as their attention mask, made once
        self.roots = {}  # layer -> (roots version, the live roots gathered (R, H, 2, T, D)): made once per version

    def write_roots(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, blocks: torch.Tensor) -> None:
        """The prefill's keys and values of R roots, (R, H, T, D), into their blocks (R, ceil(T / BLOCK)), padding
        into block 0."""
        pool, (num_roots, heads, length, dim) = self.layers[layer_idx], keys.shape
        new = torch.stack([keys, values], dim=2)  # (R, H, 2, T, D)
        new = torch.nn.functional.pad(new, (0, 0, 0, blocks.shape[1] * BLOCK - length))  # padded to whole blocks
        new = new.view(num_roots, heads, 2, -1, BLOCK, dim).permute(0, 3, 1, 2, 4, 5)  # (R, blocks, H, 2, BLOCK, D)
        pool.index_copy_(0, blocks.flatten(), new.reshape(-1, heads, 2, BLOCK, dim).to(pool.dtype))


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
    """What a decoding step's attention reads besides the pools (scheduler.Scheduler.step_inputs makes its tensors)."""

    cache: BlockCache
    write_block: torch.Tensor  # (B,) the block of each row's fed token
    write_slot: torch.Tensor  # (B,) its slot in that block
    root_blocks: torch.Tensor  # (R, NR) each live root's blocks, padded with block 0
    grid_slot: torch.Tensor  # (B,) each row's place among the (R, N) grid rows: rows of root r at r * N, r * N + 1, ...
    visible: torch.Tensor  # (R, N, NR * BLOCK) True where a grid row may see a root position (t < L_b)
    pair_row: torch.Tensor  # (M,) the row of each (row, block) pair
    pair_block: torch.Tensor  # (M,) its block
    pair_visible: torch.Tensor  # (M, BLOCK) True on the block's written slots
    fresh_blocks: torch.Tensor  # (F,) blocks rows took for this step: zeroed before the fed tokens are written
    roots_version: int = 0  # changes when roots are admitted: their gathered keys and values are kept until then
    grid_is_rows: bool = False  # every root has N rows, in order: grid_slot is 0, 1, ..., B - 1
    pairs_are_rows: bool = False  # every row reads one block of its own: pair_row is 0, 1, ..., B - 1
    root_bias: torch.Tensor | None = None  # made from visible by the first layer, kept for the others
    pair_bias: torch.Tensor | None = None  # the same from pair_visible


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
    """With paged (a decoding step, query (B, Hq, 1, D)): write the fed keys and values, then the root and block parts,
    merged; else SDPA. Returns (B, 1, Hq, D) and no weights, as Hugging Face's attention functions do."""
    if paged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    pool = paged.cache.layers[module.layer_idx]  # (NB, H, 2, BLOCK, D)
    if paged.fresh_blocks.numel():
        pool.index_fill_(0, paged.fresh_blocks, 0)
    pool[paged.write_block, :, :, paged.write_slot] = torch.stack([key[:, :, 0], value[:, :, 0]], dim=2).to(pool.dtype)
    rows, num_heads, _, dim = query.shape
    q = (query[:, :, 0] * scaling).reshape(rows, pool.shape[1], -1, dim)  # (B, H, G, D): G query heads per K/V head
    root_out, root_lse = root_part(q, live_roots(module.layer_idx, paged), paged)  # (B, H, G, D), (B, H, G)
    pair_out, pair_lse = block_part(q, pool, paged)  # (M, H, G, D), (M, H, G)
    out = merge(root_out, root_lse, pair_out, pair_lse, paged.pair_row)  # (B, H, G, D)
    return out.to(query.dtype).reshape(rows, 1, num_heads, dim), None


def root_part(q, roots: tuple[torch.Tensor, torch.Tensor], paged: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's attention over its root's first L_b keys, a root's rows stacked. q (B, H, G, D), scaled. Returns
    the output (B, H, G, D) and log-sum-exp (B, H, G)."""
    rows, heads, groups, dim = q.shape
    num_roots, width, length = paged.visible.shape  # R, N, T
    root_keys, root_values = roots  # (R, H, T, D)
    grid = q
    if not paged.grid_is_rows:
        grid = q.new_zeros(num_roots * width, heads, groups, dim)
        grid[paged.grid_slot] = q
    grid = grid.view(num_roots, width, heads, groups, dim).transpose(1, 2).reshape(num_roots, heads, -1, dim)
    if paged.root_bias is None:  # once per step: (R, 1, N G, T), each grid row's visible root positions, G times
        visible = paged.visible[:, :, None, :].expand(-1, -1, groups, -1).reshape(num_roots, 1, width * groups, length)
        paged.root_bias = mask_bias(visible, root_keys.dtype)
    out, lse = attend(grid.to(root_keys.dtype), root_keys, root_values, paged.root_bias)  # (R, H, N G, D), (R, H, N G)
    out, lse = out.view(num_roots, heads, width, groups, dim), lse.view(num_roots, heads, width, groups)
    out = out.transpose(1, 2).reshape(num_roots * width, heads, groups, dim)
    lse = lse.transpose(1, 2).reshape(num_roots * width, heads, groups)
    if paged.grid_is_rows:
        return out, lse
    return out.index_select(0, paged.grid_slot), lse.index_select(0, paged.grid_slot)


def live_roots(layer: int, paged: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """The live roots' keys and values (R, H, T, D) of a layer, gathered once per version of the live roots."""
    version, gathered = paged.cache.roots.get(layer, (None, None))
    if version != paged.roots_version:
        gathered = gather_roots(paged.cache.layers[layer], paged.root_blocks)
        paged.cache.roots[layer] = (paged.roots_version, gathered)
    return gathered[:, :, 0], gathered[:, :, 1]


def gather_roots(pool: torch.Tensor, root_blocks: torch.Tensor) -> torch.Tensor:
    """pool (NB, H, 2, BLOCK, D), root_blocks (R, NR) -> the roots' keys and values (R, H, 2, NR * BLOCK, D)."""
    (num_roots, width), (_, heads, _, block, dim) = root_blocks.shape, pool.shape
    blocks = pool.index_select(0, root_blocks.flatten()).view(num_roots, width, heads, 2, block, dim)
    return blocks.permute(0, 2, 3, 1, 4, 5).reshape(num_roots, heads, 2, width * block, dim)


def block_part(q, pool, paged: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's attention over each block of its own keys. q (B, H, G, D), scaled. Returns each (row, block) pair's
    output (M, H, G, D) and log-sum-exp (M, H, G)."""
    blocks = pool.index_select(0, paged.pair_block)  # (M, H, 2, BLOCK, D): keys and values in one gather
    pair_q = (q if paged.pairs_are_rows else q.index_select(0, paged.pair_row)).to(blocks.dtype)  # (M, H, G, D)
    if paged.pair_bias is None:  # once per step: (M, 1, 1, BLOCK), the block's written slots
        paged.pair_bias = mask_bias(paged.pair_visible[:, None, None, :], blocks.dtype)
    return attend(pair_q, blocks[:, :, 0], blocks[:, :, 1], paged.pair_bias)


def mask_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, MASKED elsewhere: the additive mask attend takes."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, MASKED)


def attend(q, keys, values, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T + bias) v and the scores' log-sum-exp (float32). q (X, H, L, D), scaled; keys, values (X, H, S,
    D); bias (X, 1, L or 1, S). On a CPU, SDPA's flash kernel (by its private name: it returns the log-sum-exp)."""
    if q.device.type == "cpu":
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = flash(q, keys, values, attn_mask=bias, scale=1.0)
        return out, lse.float()
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() + bias  # (X, H, L, S)
    lse = torch.logsumexp(scores, dim=-1)  # (X, H, L)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(values.dtype), values), lse


def merge(root_out, root_lse, pair_out, pair_lse, pair_row) -> torch.Tensor:
    """Each row's root part (B, H, G, D) merged with its (row, block) parts (M, H, G, D), pair_row (M,) their rows:
        o = sum_i o_i exp(lse_i - lse),  lse = log sum_i exp(lse_i)   (from each row's largest lse_i), float32"""
    top = root_lse.scatter_reduce(0, pair_row[:, None, None].expand_as(pair_lse), pair_lse, "amax")  # (B, H, G)
    root_weight = torch.exp(root_lse - top)  # (B, H, G) <= 1, stable
    pair_weight = torch.exp(pair_lse - top.index_select(0, pair_row))  # (M, H, G)
    total = root_weight.index_add(0, pair_row, pair_weight)  # (B, H, G) = exp(lse - top)
    out = (root_out.float() * root_weight[..., None]).index_add_(0, pair_row, pair_out.float() * pair_weight[..., None])
    return out / total[..., None]
