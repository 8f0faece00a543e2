"""Shared-prefix attention for decoding many rows that continue a few prefixes (the MC rollouts of rollout.py).

The K continuations of a step state, and the states nested in one answer, all continue one "root" prefix. The plain
way copies the root's keys and values into every row's KV cache, and every decoding step each row reads its own copy.
Here the root's keys and values are kept once, and one decoding step's attention of a row is split in two parts that
are merged exactly (Hydragen, Juravsky et al. 2024; FlashInfer's cascade attention):

    prefix part   the queries of all rows of one root, stacked, against the root's first prefix_len keys: one
                  matrix-matrix product per root (all roots at once, rows padded to the root with the most rows)
    suffix part   each row's query against its own generated keys (the cache returns them)
    merge         o = o_1 exp(lse_1 - lse) + o_2 exp(lse_2 - lse),  lse = log(exp(lse_1) + exp(lse_2))

where o_i is part i's softmax-weighted values and lse_i the log-sum-exp of its scores. Exact: the softmax over the
union of the two key sets, split by parts (tests/test_attention.py: equal to SDPA within 1e-5). The scores and the
merge are float32 (under bf16 autocast too); the products run in the inputs' dtype.

It plugs into a Hugging Face model through its attention interface: use(model) registers `shared_prefix_attention`
as the model's attention implementation; a forward call given shared_prefix=SharedPrefix(...) runs the split, any
other call runs the model's usual SDPA attention (and SDPA's mask), so prefill and training are unchanged.

Letters: B rows, R roots, N the most rows of one root, Hq query heads, H key/value heads, G = Hq / H, T root length,
S generated tokens so far, D head dim. This file imports no project file.
"""

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "shared_prefix"
MASKED = -1e30  # a score no softmax keeps (finite, so that a padded row of no key gives no NaN)


@dataclass
class SharedPrefix:
    """What the attention needs besides the cache: every layer's root keys and values (R, H, T, D), each row's root
    (B,) and prefix length (B,), and the grouping of rows by root (group_rows)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    row_root: torch.Tensor
    prefix_len: torch.Tensor
    slot: torch.Tensor = None  # (B,) each row's place among the (R, N) padded rows
    valid: torch.Tensor = None  # (R, N, T) True where a padded row's query may see a root key

    def group_rows(self) -> "SharedPrefix":
        """Place the rows, grouped by root, in an (R, N) grid, and mark the root keys each may see: positions below
        its prefix length (a nested prefix reads only the start of its root). Call again when rows change."""
        num_roots, root_len = self.layers[0][0].shape[0], self.layers[0][0].shape[2]
        order = torch.argsort(self.row_root, stable=True)  # rows of root 0 first, then root 1, ...
        counts = torch.bincount(self.row_root, minlength=num_roots)  # (R,)
        starts = torch.cumsum(counts, 0) - counts  # (R,) the first sorted position of each root
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device) - starts[self.row_root[order]]
        width = int(counts.max())
        self.slot = self.row_root * width + rank  # (B,)
        lengths = torch.zeros(num_roots * width, dtype=self.prefix_len.dtype, device=self.prefix_len.device)
        lengths[self.slot] = self.prefix_len  # padded rows: length 0, no key
        positions = torch.arange(root_len, device=lengths.device)
        self.valid = (positions[None, :] < lengths[:, None]).view(num_roots, width, root_len)
        return self


def supports(model) -> bool:
    """Can model take this attention (a Hugging Face model whose attention layers call the attention interface)?"""
    return hasattr(model, "set_attn_implementation") and getattr(model.config, "_attn_implementation", None) in (
        "sdpa", NAME)


def use(model) -> contextlib.AbstractContextManager:
    """Within the block, model's attention is shared_prefix_attention (registered once); on exit its own again."""
    AttentionInterface.register(NAME, shared_prefix_attention)
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


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, shared_prefix=None, **kwargs):
    """The attention implementation: prefix + suffix parts merged (module docstring) when shared_prefix is given
    (query (B, Hq, 1, D); key, value (B, H, S, D): the rows' generated tokens), else SDPA. Returns the output as
    (B, 1, Hq, D), as Hugging Face's attention functions do, and no weights."""
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    root_keys, root_values = shared_prefix.layers[module.layer_idx]
    out = merged_attention(query[:, :, 0], key, value, root_keys, root_values, shared_prefix, scaling)  # (B, Hq, D)
    return out[:, None], None


def merged_attention(query, key, value, root_keys, root_values, shared: SharedPrefix, scaling) -> torch.Tensor:
    """query (B, Hq, D); key, value (B, H, S, D); root_keys, root_values (R, H, T, D). Returns (B, Hq, D)."""
    rows, num_heads, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(rows, kv_heads, num_heads // kv_heads, dim)  # (B, H, G, D): grouped-query heads share a K/V
    prefix_out, prefix_lse = prefix_part(q, root_keys, root_values, shared, scaling)  # (B, H, G, D), (B, H, G)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling  # (B, H, G, S): all S are the row's own
    suffix_lse = torch.logsumexp(scores, dim=-1)  # (B, H, G)
    suffix_out = torch.matmul(torch.exp(scores - suffix_lse[..., None]).to(value.dtype), value)  # (B, H, G, D)
    lse = torch.logaddexp(prefix_lse, suffix_lse)
    out = prefix_out.float() * torch.exp(prefix_lse - lse)[..., None] + suffix_out.float() * torch.exp(
        suffix_lse - lse
    )[..., None]
    return out.to(query.dtype).reshape(rows, num_heads, dim)


def prefix_part(q, root_keys, root_values, shared: SharedPrefix, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's attention over its root's first prefix_len keys, computed root by root with the rows of a root
    stacked (one batched matrix-matrix product over the R roots). q (B, H, G, D). Returns the normalised output
    (B, H, G, D) and the log-sum-exp of the scores (B, H, G)."""
    rows, kv_heads, groups, dim = q.shape
    num_roots, _, root_len, _ = root_keys.shape
    width = shared.valid.shape[1]  # N
    padded = q.new_zeros(num_roots * width, kv_heads, groups, dim)
    padded[shared.slot] = q
    padded = padded.view(num_roots, width, kv_heads, groups, dim).permute(0, 2, 1, 3, 4)  # (R, H, N, G, D)
    padded = padded.reshape(num_roots, kv_heads, width * groups, dim)
    scores = torch.matmul(padded, root_keys.transpose(-1, -2)).float() * scaling  # (R, H, N G, T)
    scores = scores.view(num_roots, kv_heads, width, groups, root_len)
    scores = scores.masked_fill(~shared.valid[:, None, :, None, :], MASKED)  # a row sees its own prefix only
    lse = torch.logsumexp(scores, dim=-1)  # (R, H, N, G)
    weights = torch.exp(scores - lse[..., None]).to(root_values.dtype).view(num_roots, kv_heads, width * groups, -1)
    out = torch.matmul(weights, root_values).view(num_roots, kv_heads, width, groups, dim)  # (R, H, N, G, D)
    out = out.permute(0, 2, 1, 3, 4).reshape(num_roots * width, kv_heads, groups, dim)[shared.slot]
    lse = lse.permute(0, 2, 1, 3).reshape(num_roots * width, kv_heads, groups)[shared.slot]
    return out, lse


# ---------------------------------------------------------------------------------------------------------------------
# The KV cache of one chunk's decoding (rollout.decode_chunk), either way


NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # a 4D mask is used as given; shared_prefix_attention ignores it


class DecodeCache:
    """Preallocated per-layer keys and values buffers (B, H, slots, D) that a StaticCache writes into, B rows of
    num_samples per prefix, and what each decoding step's forward needs (inputs).

    shared False (the copy path): slots [0, T_root) of row b hold its root's keys and values (expanded, not
    recomputed), and the attention mask hides the slots a nested prefix must not see (the rest of its root, the
    padding up to the chunk's longest root); generated token t goes to slot T_root + t.
    shared True: the roots stay once, in `layers` (SharedPrefix), and the buffers hold only the generated tokens,
    token t at slot t; shared_prefix_attention reads both.

    Why not a plain cache: a DynamicCache re-allocates and copies the whole cache at every step, and a StaticCache
    attends over all its slots at every step (with max_new_tokens=1024, mostly empty ones). Instead views points each
    StaticLayer at the filled slots before each step; its update() writes the new token's keys / values at slot
    cumulative_length in place. The unwritten slots are never read, so the buffers need no zeroing."""

    def __init__(self, model, layers: list[tuple[torch.Tensor, torch.Tensor]], prefix_root: torch.Tensor,
                 prefix_len: torch.Tensor, num_samples: int, max_new: int, shared: bool):
        num_prefixes, root_len = prefix_root.shape[0], layers[0][0].shape[2]
        row_prefix = torch.arange(num_prefixes, device=prefix_root.device).repeat_interleave(num_samples)  # (B,)
        self.offset = 0 if shared else root_len  # the slot of the first generated token
        self.buffers = []
        for root_keys, root_values in layers:  # (R, H, T_root, D)
            pair = []
            for roots in (root_keys, root_values):
                buffer = roots.new_empty((num_prefixes * num_samples, roots.shape[1], self.offset + max_new,
                                          roots.shape[3]))
                if not shared:  # the K rows of a prefix copy one source: its root
                    buffer.view(num_prefixes, num_samples, *buffer.shape[1:])[:, :, :, :root_len] = (
                        roots.index_select(0, prefix_root)[:, None])
                pair.append(buffer)
            self.buffers.append(tuple(pair))
        self.cache = StaticCache(config=model.config, max_cache_len=1)
        for layer, (keys, values) in zip(self.cache.layers, self.buffers):
            layer.lazy_initialization(keys, values)  # device and dtype; a (B, H, 1, D) placeholder we replace
            layer.cumulative_length.fill_(self.offset)
        self.shared = SharedPrefix(layers, prefix_root[row_prefix], prefix_len).group_rows() if shared else None
        # copy path (B, slots): row b sees its own prefix, slots < prefix_len[b], and the generated slots >= T_root;
        # shared: one 4D mask, made once on the device
        slots = torch.arange(self.offset + max_new, device=prefix_len.device)[None]  # (1, slots)
        self.mask = NO_MASK.to(prefix_len.device) if shared else (slots < prefix_len[:, None]) | (slots >= root_len)

    def inputs(self, num_rows: int, step: int) -> dict:
        """The cache arguments of step's forward (its token goes to slot offset + step), views set on the rows
        [0, num_rows) and the slots in use."""
        length = self.offset + step + 1
        for layer, (keys, values) in zip(self.cache.layers, self.buffers):
            layer.keys, layer.values = keys[:num_rows, :, :length], values[:num_rows, :, :length]
            layer.max_cache_len = length  # the mask and the attention cover exactly these slots
        if self.shared is None:
            return dict(cache=self.cache, attention_mask=self.mask[:, :length])
        return dict(cache=self.cache, attention_mask=self.mask, shared_prefix=self.shared)

    def drop_rows(self, live: list[int], step: int) -> list[int]:
        """Compact the batch to the rows at positions `live` (ascending), in place: every dead position below
        n = len(live) takes the live row of a position >= n (the slots written before step only). Copies only the
        moved rows and allocates nothing big (fresh tensors would be slow on CPU: first-touch page faults).
        Returns order: order[new position] = old position."""
        n, live_set, length = len(live), set(live), self.offset + step
        holes = [pos for pos in range(n) if pos not in live_set]  # dead positions that stay inside the batch
        movers = [pos for pos in live if pos >= n]  # live rows beyond it, as many as holes
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            dst, src = torch.tensor(holes), torch.tensor(movers)
            for pair in self.buffers:
                for buffer in pair:  # sources >= n > destinations: no overlap
                    buffer[dst.to(buffer.device), :, :length] = buffer[src.to(buffer.device), :, :length]
        keep = torch.tensor(order, device=self.buffers[0][0].device)
        if self.shared is None:
            self.mask = self.mask[keep]
        else:
            self.shared.row_root, self.shared.prefix_len = self.shared.row_root[keep], self.shared.prefix_len[keep]
            self.shared.group_rows()
        return order
