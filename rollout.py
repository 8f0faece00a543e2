"""Sampling from a Hugging Face causal LM with its KV cache, with prefix reuse for the MC value rollouts.

VinePPO spends most of its compute here (docs/paper.md §1.2, §6): N answers per prompt, then K continuations from
every step state of every answer. One function, `sample`, serves both uses:

    answers:      sample(model, prompts, num_samples=N, **vars(sampling))  # sample j of prompt i: row i * N + j
    MC rollouts:  sample(model, states, num_samples=K, **vars(sampling))   # a state: prompt + an answer's first tokens

with one Sampling value for both (T, top-p, length budget, end tokens, stop strings), as docs/paper.md pitfall 1
requires.

How it works (plain PyTorch + the model's own forward, no vLLM):
  1. Prefix reuse. The states s_0..s_n of one answer are nested: each is a prefix of the next. For every prefix we
     find the longest prefix of the call that starts with it (its "root", find_roots), compute the root's KV cache
     once, and take every nested prefix's KV cache as the first len(prefix) positions of its root's cache (exact:
     attention is causal, so the keys/values at position t depend only on tokens <= t). Its first-token logits are
     the root's logits at position len(prefix) - 1. The K rows of a prefix are copies of that one cache, never
     recomputed.
  2. Batched prefill. The roots of a chunk go through the model several at a time (prefill): longest first, in
     forward passes of up to PREFILL_BATCH_TOKENS tokens, each right-padded to its longest root, with an attention
     mask and true position_ids as in decoding. A pass takes no root shorter than PREFILL_MIN_FILL x its longest
     (plan_prefill_passes): padding costs as much compute as real tokens. The output layer runs only at the P
     positions whose logits are read, never on (R, T_root, V). Batching changes float rounding only: logprobs differ
     from one pass per root by < 1e-6 on the tests' tiny models and < 1e-5 on the benchmark's model (max abs), with
     the same tokens.
  3. Batched decoding, prefixes read once. When the call has many rows per root (sharing_pays: the MC rollouts, and
     the answers' N samples per prompt), every root's keys and values stay once and each row keeps only its own
     generated tokens; attention.py's shared-prefix attention reads the root (up to the row's prefix length) and the
     row's tokens separately and merges the two exactly by their log-sum-exp, the rows of one root stacked so that the
     prefix part is one matrix-matrix product. Otherwise (one sample per prompt, few rows) row b holds a copy of its
     root's cache, right-padded to the chunk's longest root, and the attention mask hides positions >= len(prefix_b)
     (the rest of the root and the padding); generated tokens go after that hole. Either way position_ids give each
     row its true positions, so rotary / learned position embeddings see exactly what one prefix alone would.
  4. Rows that stop (EOS, stop string, length limit) leave the batch and the KV cache at once (drop_rows), so compute
     follows the live rows, not the longest one. The cache is preallocated and written in place
     (attention.DecodeCache), and attention reads only the slots written so far.
  5. Memory cap: prefixes are processed in chunks whose cache holds at most max_batch_tokens tokens: roots x longest
     root + rows x max_new_tokens when shared, rows x (longest root + max_new_tokens) when copied (plan_chunks).

Sampling follows vLLM (the paper's sampler): logits / temperature, top-p (nucleus), one draw from the renormalised
nucleus with a seeded torch.Generator; temperature 0 is greedy argmax. Log-probabilities are float32
log_softmax(logits / temperature) of the sampled token (raw logits when greedy), before top-p, as the trainer computes
them (docs/paper.md pitfall 8). Under bf16 autocast the logits are cast to float32 first.

What bounds speed (measured on CPU, benchmarks/bench_rollout.py, docs/speed.md): with many rows, attention over the
cache dominates and is memory-bound. Shared, a root is read once per step for all its rows (1.2-1.7x the copies on
the MC and answer workloads); what is left is the rows' own tokens, the model's matmuls on small batches, and the
per-step Python (sampling, stop strings). Where nothing is shared and no row stops early (64 prompts x 64 greedy
tokens), sample ties with one batched Hugging Face generate (~1.0x): both run the same forward passes; the gains come
from prefix reuse and sharing, dropping stopped rows, and top-p without a full sort (2x generate at T=0.6).

Test: python -m pytest tests/test_rollout.py -q.   Benchmark: python benchmarks/bench_rollout.py [--quick].

Departures from the paper's vLLM sampler:
  1. Stop strings cut token ids, not text: the response ends at the last token boundary at or before the start of
     the stop string, so a token that holds text before the stop string is dropped too (vLLM cuts the text exactly).
  2. Stop strings are searched in the generated text only (vLLM does the same), never across the prefix boundary.
  3. Sliding-window attention layers are not supported (a nested prefix cannot be sliced out of a windowed cache).
  4. Different random streams: the same seed gives the same samples here, not vLLM's samples.
  5. Prefix sharing in attention is plain PyTorch (attention.py), not a fused kernel like vLLM's or FlashInfer's
     cascade attention; vLLM shares only what its paged cache holds in common.

Letters: B rows being decoded, P prefixes, R roots, K samples per prefix, T positions, V vocabulary, H key/value
heads, D head dim.
"""

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

import attention

# Default memory cap, in cached tokens per chunk: rows x (longest prefix + max_new_tokens). The KV cache costs
# num_layers * num_kv_heads * head_dim * (key bytes + value bytes) per token; under bf16 autocast the keys stay
# float32 (the rotary embedding's float32 cos/sin promote them; tests/test_memory_plan.py measures it), so 2**18
# tokens is ~8.3 GiB for a 1.1B Llama (22 layers, 4 KV heads of 64), ~0.2 GB for the tests' tiny models. Lower it
# if sampling runs out of memory; tools/memory_plan.py says what fits.
DEFAULT_MAX_BATCH_TOKENS = 2**18
# Prefill forward passes (plan_prefill_passes): at most this many tokens per pass, roots x longest root of the pass,
# and no root shorter than PREFILL_MIN_FILL x the pass's longest (the rest of its row is padding, computed and thrown
# away). Measured on 2 CPU cores with the benchmark's 10M model: passes of ~2k tokens beat one pass per root and also
# passes of 4k-16k tokens (probably as their activations no longer fit in the CPU caches), and one pass over roots of
# 50-150 tokens, all padded to 150, was slower than one pass per root. On a GPU larger passes may pay (not measured).
# The cap also bounds memory: tokens x intermediate size per MLP activation, and tokens x heads x T attention scores
# where the attention kernel materialises them.
PREFILL_BATCH_TOKENS = 2**11
PREFILL_MIN_FILL = 0.9
# The roots' keys and values are shared (attention.py) when a call has at least this many rows and this many rows per
# root (sharing_pays; below, the extra work of grouping and merging costs more than the copies it saves).
SHARE_MIN_ROWS, SHARE_MIN_ROWS_PER_ROOT = 32, 4
# Top-p first looks for the nucleus among this many most probable tokens (nucleus_mask).
TOP_P_CANDIDATES = 64
# Stop strings are searched in the exact decoded text: no special-token skipping, no whitespace clean-up.
DECODE_KWARGS = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class Sampling:
    """The settings of `sample` that the answers and the MC continuations of their step states must share (docs/paper.md
    pitfall 1: T = 0.6, top-p 0.9, the same length budget and stop strings). train.py builds one value and hands it
    to both, sample(model, prefixes, num_samples=K, **vars(sampling)), so the two cannot drift apart."""

    temperature: float  # 0: greedy
    top_p: float
    max_new_tokens: int
    eos_token_id: int | tuple[int, ...]  # every id that ends an answer (stop_token_ids)
    max_length: int | None = None  # most tokens in prefix + continuation
    stop_strings: tuple[str, ...] = ()
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # memory cap of one chunk (module doc, 5.)


@dataclass
class Rollouts:
    response_ids: list[list[int]]  # sampled tokens per sample, without the EOS token and without the stop string
    logprobs: list[torch.Tensor]  # float32 (len(response_ids[i]),): log_softmax(logits / T) of each sampled token
    finished: list[bool]  # True: stopped on EOS or a stop string; False: hit the length limit
    eos: list[int | None]  # the end token that stopped the sample (one of eos_token_id), else None

    @classmethod
    def empty(cls, num_rows: int) -> "Rollouts":
        """num_rows empty, unfinished samples, to be filled in."""
        return cls([[] for _ in range(num_rows)], [torch.zeros(0) for _ in range(num_rows)], [False] * num_rows,
                   [None] * num_rows)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The token ids that end an answer: the tokenizer's EOS and every id in the model's generation_config
    eos_token_id (an int or a list: chat models often list several end tokens, e.g. an end-of-turn token)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p (nucleus) set (Holtzman et al. 2020; vLLM): the smallest set of most probable tokens whose cumulative
    probability reaches top_p. probs: (B, V), rows sum to 1. Returns a bool mask (B, V), True = kept.

    A token is kept iff the mass of the tokens ranked above it is < top_p (so the top token always is). Sorting the
    vocabulary every step costs as much as a small model's forward pass, so two cheaper exact cases come first:
      peaked rows (a trained LM at T=0.6): the TOP_P_CANDIDATES most probable tokens hold >= top_p, the nucleus is
        inside them;
      flat rows (random models): the least probable half holds > 1 - top_p, the dropped tail is inside it; a token is
        dropped iff its mass plus that of all less probable tokens is <= 1 - top_p (= mass above it >= top_p).
    Otherwise, or if the rows of the batch disagree, one full sort."""
    kept = torch.zeros_like(probs, dtype=torch.bool)  # (B, V)
    top, top_idx = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)  # (B, N) descending
    if bool((top.sum(dim=-1) >= top_p).all()):
        return kept.scatter_(-1, top_idx, top.cumsum(dim=-1) - top < top_p)  # exclusive cumsum = mass above
    low, low_idx = probs.topk(probs.shape[-1] // 2, dim=-1, largest=False)  # (B, V/2) ascending
    tail_mass = low.cumsum(dim=-1)  # (B, V/2) mass of each token and all less probable ones
    if bool((tail_mass[:, -1] > 1 - top_p).all()):
        return kept.fill_(True).scatter_(-1, low_idx, tail_mass > 1 - top_p)
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)  # (B, V)
    return kept.scatter_(-1, sorted_idx, sorted_probs.cumsum(dim=-1) - sorted_probs < top_p)


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from probs restricted to nucleus_mask and renormalised. probs: (B, V). Returns (B,).

    Inverse-CDF sampling in vocabulary order: u ~ U(0, kept mass], token = first index whose cumulative kept mass
    >= u (never a dropped token: its cumulative mass equals that of the kept token before it, which comes first).
    Cheaper on CPU than torch.multinomial; the same distribution."""
    kept_probs = probs if top_p >= 1.0 else probs.masked_fill(~nucleus_mask(probs, top_p), 0.0)  # (B, V)
    cdf = kept_probs.cumsum(dim=-1)  # (B, V)
    gen_device = probs.device if generator is None else generator.device  # a CPU generator may drive a CUDA model
    u = torch.rand((probs.shape[0], 1), generator=generator, device=gen_device).to(probs.device)  # (B, 1) in [0, 1)
    u = (1.0 - u) * cdf[:, -1:]  # (B, 1) in (0, kept mass]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def sample_next_tokens(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row. logits: (B, V). Returns tokens (B,) and their float32 logprobs (B,).

    logprob = log_softmax(logits / temperature)[token] (raw logits when temperature == 0, i.e. greedy argmax);
    the token is drawn from softmax(logits / temperature) restricted to its top-p nucleus (sample_top_p)."""
    logits = logits.float()  # float32 logprobs even under bf16 autocast
    if temperature == 0:
        logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
        tokens = logits.argmax(dim=-1)  # (B,)
    else:
        logprobs = torch.log_softmax(logits / temperature, dim=-1)  # (B, V)
        tokens = sample_top_p(logprobs.exp(), top_p, generator)  # (B,)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def find_roots(prefixes: Sequence[Sequence[int]]) -> list[int]:
    """For each prefix, the index of the longest prefix in the list that starts with it (itself if none does).

    In lexicographic order, every sequence between p and a sequence that starts with p also starts with p; so p is
    nested iff its successor starts with p, and then p's root is its successor's root. One backward pass."""
    order = sorted(range(len(prefixes)), key=lambda i: tuple(prefixes[i]))
    roots = list(range(len(prefixes)))
    for a, b in zip(reversed(order[:-1]), reversed(order[1:])):  # a = predecessor of b in sorted order
        p, q = prefixes[a], prefixes[b]
        if len(p) <= len(q) and list(q[: len(p)]) == list(p):
            roots[a] = roots[b]
    return roots


def plan_chunks(
    prefix_lens: list[int], roots: list[int], *, num_samples: int, max_new_tokens: int, max_batch_tokens: int,
    shared: bool = False,
) -> list[list[int]]:
    """Split prefix indices into chunks whose KV cache holds at most max_batch_tokens tokens: rows x (longest root +
    max_new_tokens) when every row holds a copy of its root, roots x longest root + rows x max_new_tokens when the
    roots are shared (attention.DecodeCache).

    Prefixes of one root stay adjacent (their KV comes from one forward pass), roots go longest first so the
    biggest chunk runs first. A single prefix whose num_samples rows exceed the cap still forms its own chunk."""
    order = sorted(range(len(prefix_lens)), key=lambda i: (-prefix_lens[roots[i]], roots[i], -prefix_lens[i]))
    chunks, current, longest, num_roots = [], [], 0, 0
    for i in order:
        new_longest = max(longest, prefix_lens[roots[i]])
        new_roots = num_roots + (not current or roots[i] != roots[current[-1]])  # a root's prefixes are adjacent
        rows = (len(current) + 1) * num_samples
        size = new_roots * new_longest + rows * max_new_tokens if shared else rows * (new_longest + max_new_tokens)
        if current and size > max_batch_tokens:
            chunks.append(current)
            current, new_longest, new_roots = [], prefix_lens[roots[i]], 1
        current.append(i)
        longest, num_roots = new_longest, new_roots
    return chunks + ([current] if current else [])


def sharing_pays(roots: list[int], num_samples: int) -> bool:
    """Do the roots' keys and values pay to share (attention.py) in this call? When the rows are many and several
    continue each root, measured on 2 CPU threads (docs/speed.md): 512 rows over 64 roots 1.26x, 720 over 16 roots
    1.66x, 45 over one root 1.42x; but 18 rows 0.89-1.09x, 64 rows over 32 roots 0.93x, nothing shared 0.97x."""
    rows = len(roots) * num_samples
    return rows >= SHARE_MIN_ROWS and rows >= SHARE_MIN_ROWS_PER_ROOT * len(set(roots))


def plan_prefill_passes(root_lens: list[int]) -> list[tuple[int, int]]:
    """Split roots, sorted longest first, into forward passes [start, stop): a pass takes the next root while
    roots x its longest root <= PREFILL_BATCH_TOKENS and the root is at least PREFILL_MIN_FILL x its longest root."""
    passes, start = [], 0
    while start < len(root_lens):
        width, stop = root_lens[start], start + 1
        while (
            stop < len(root_lens)
            and (stop + 1 - start) * width <= PREFILL_BATCH_TOKENS
            and root_lens[stop] >= PREFILL_MIN_FILL * width
        ):
            stop += 1
        passes.append((start, stop))
        start = stop
    return passes


def prefill(
    model, prefixes: list[list[int]], device: torch.device
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Forward passes over the chunk's roots, several roots per pass (docs/paper.md §6: prefix KV shared by its K
    rollouts).

    Roots go longest first, in the passes of plan_prefill_passes, each right-padded to its longest root (pad id 0,
    hidden by the attention mask; position_ids 0..T-1, so a root's positions do not depend on the others). A
    pre-hook on the output layer (get_output_embeddings) hands it only the hidden states of the prefixes' last
    positions, (1, P_pass, hidden) instead of (R_pass, T, hidden), so no (R, T_root, V) logits are made. The rest is
    the model's own forward: anything it does between the last hidden state and the logits (final norm, scaling,
    soft-capping) acts per position, so it gives the gathered positions what the full forward would (tested on
    llama, qwen2 and gpt2, which apply nothing after the output layer).

    Returns, for each layer, keys and values of all R roots padded on the right to the longest root, (R, H, T_root, D)
    (the padding holds zeros or the pad tokens' keys / values; decoding masks it); the root of every prefix as an
    index into them (P,); and every prefix's next-token logits (P, V), read at its last position (the logits at
    position t predict token t + 1)."""
    roots = find_roots(prefixes)
    root_ids = sorted(set(roots), key=lambda r: -len(prefixes[r]))  # (R,) the roots' prefix indices, longest first
    root_of = {r: k for k, r in enumerate(root_ids)}
    prefix_root = torch.tensor([root_of[r] for r in roots], device=device)  # (P,)
    prefix_len = torch.tensor([len(p) for p in prefixes], device=device)  # (P,)
    longest = len(prefixes[root_ids[0]])  # T_root
    head = model.get_output_embeddings()
    layers, next_logits = [], None
    for start, stop in plan_prefill_passes([len(prefixes[r]) for r in root_ids]):
        width = len(prefixes[root_ids[start]])  # T of this pass: its longest root
        batch = [prefixes[r] + [0] * (width - len(prefixes[r])) for r in root_ids[start:stop]]  # pad id: never seen
        positions = torch.arange(width, device=device)  # (T,) true positions: the padding comes after them
        attention_mask = positions[None] < prefix_len[root_ids[start:stop]][:, None]  # (R_pass, T) False = padding
        in_pass = (prefix_root >= start) & (prefix_root < stop)  # (P,) prefixes whose root is in this pass
        rows, cols = prefix_root[in_pass] - start, prefix_len[in_pass] - 1  # (P_pass,) each prefix's last position
        # the output layer gets (1, P_pass, hidden) instead of (R_pass, T, hidden): out.logits is (1, P_pass, V)
        hook = head.register_forward_pre_hook(lambda module, args: (args[0][rows, cols][None],))
        try:
            out = model(
                input_ids=torch.tensor(batch, device=device),
                attention_mask=attention_mask,
                position_ids=positions.expand(stop - start, width),
                use_cache=True,
            )
        finally:
            hook.remove()
        assert out.logits.shape[:2] == (1, len(rows)), "the model must compute its logits with get_output_embeddings()"
        assert not any(out.cache.is_sliding), "sliding-window attention is not supported (departure 3)"
        if next_logits is None:
            next_logits = out.logits.new_empty((len(prefixes), out.logits.shape[-1]))  # (P, V)
        next_logits[in_pass] = out.logits[0]
        for layer_idx, layer in enumerate(out.cache.layers):  # keys, values: (R_pass, H, T, D)
            if start == 0:  # zero right padding beyond this pass's width, hidden by the attention mask in decoding
                shapes = [(len(root_ids), t.shape[1], longest, t.shape[3]) for t in (layer.keys, layer.values)]
                layers.append((layer.keys.new_zeros(shapes[0]), layer.values.new_zeros(shapes[1])))
            layers[layer_idx][0][start:stop, :, :width] = layer.keys
            layers[layer_idx][1][start:stop, :, :width] = layer.values
    return layers, prefix_root, next_logits


def find_stop_cut(tokenizer, response_ids: list[int], stop_strings: Sequence[str], window: int) -> int | None:
    """If the decoded response contains a stop string, the number of tokens to keep: the longest token prefix whose
    text ends at or before the start of the first stop string. Else None.

    Called after every new token, so a new stop string must end in the last tokens: decode only a window of them first
    (window tokens hold at least window bytes; byte-level BPE tokens are never empty)."""
    tail = tokenizer.decode(response_ids[-window:], **DECODE_KWARGS)
    if not any(s in tail for s in stop_strings):
        return None
    text = tokenizer.decode(response_ids, **DECODE_KWARGS)
    start = min(text.find(s) for s in stop_strings if s in text)
    keep = len(response_ids)
    while keep > 0 and len(tokenizer.decode(response_ids[:keep], **DECODE_KWARGS)) > start:
        keep -= 1
    return keep


def record_tokens(
    out: Rollouts, batch_rows: list[int], tokens: torch.Tensor, token_logprobs: torch.Tensor, row_limit: list[int], *,
    eos_ids: set[int], stop_strings: Sequence[str], tokenizer, window: int,
) -> list[int]:
    """Append every row's sampled token to its response (batch position pos holds row batch_rows[pos]; out.logprobs
    holds lists of floats while decoding). Returns the batch positions of the rows that go on. A row stops when it
    samples EOS (finished, EOS not kept), its text contains a stop string (finished, cut by find_stop_cut) or it
    reaches its length limit (not finished). window: how many last tokens surely hold a new stop string."""
    live = []
    for pos, (b, token, lp) in enumerate(zip(batch_rows, tokens.tolist(), token_logprobs.tolist())):
        if token in eos_ids:  # EOS: finished, and the EOS token is not part of the response
            out.finished[b], out.eos[b] = True, token
            continue
        out.response_ids[b].append(token)
        out.logprobs[b].append(lp)
        cut = find_stop_cut(tokenizer, out.response_ids[b], stop_strings, window) if stop_strings else None
        if cut is not None:  # stop string: finished, cut at a token boundary before it
            out.finished[b] = True
            del out.response_ids[b][cut:], out.logprobs[b][cut:]
        elif len(out.response_ids[b]) < row_limit[b]:
            live.append(pos)
    return live


def decode_chunk(
    model, prefixes: list[list[int]], *, num_samples: int, limits: list[int], temperature: float, top_p: float,
    eos_ids: set[int], generator: torch.Generator | None, stop_strings: Sequence[str], tokenizer, progress,
    shared: bool,
) -> Rollouts:
    """Sample num_samples continuations of every prefix of one chunk; row b continues prefix b // num_samples.

    Each step feeds the last token of every live row and samples its next token (record_tokens says which rows stop);
    stopped rows leave the batch and the KV cache at once (DecodeCache.drop_rows). shared: the roots' keys and values
    stay once and every row reads them through attention.shared_prefix_attention; else each row holds a copy."""
    device = next(model.parameters()).device
    layers, prefix_root, next_logits = prefill(model, prefixes, device)
    row_prefix = torch.arange(len(prefixes), device=device).repeat_interleave(num_samples)  # (B,)
    prefix_len = torch.tensor([len(p) for p in prefixes], device=device)[row_prefix]  # (B,)
    kv = attention.DecodeCache(model, layers, prefix_root, prefix_len, num_samples, max(limits), shared)
    num_rows = len(prefixes) * num_samples
    row_limit = [limits[b // num_samples] for b in range(num_rows)]
    window = 4 * max((len(s) for s in stop_strings), default=0) + 2  # tokens that surely hold a new stop string
    out = Rollouts([[] for _ in range(num_rows)], [[] for _ in range(num_rows)], [False] * num_rows, [None] * num_rows)
    batch_rows = list(range(num_rows))  # row id at each batch position
    logits = next_logits.index_select(0, row_prefix)  # (B, V) the prefill's next-token logits
    step = 0
    while True:
        tokens, token_logprobs = sample_next_tokens(logits, temperature=temperature, top_p=top_p, generator=generator)
        live = record_tokens(out, batch_rows, tokens, token_logprobs, row_limit, eos_ids=eos_ids,
                             stop_strings=stop_strings, tokenizer=tokenizer, window=window)
        if progress is not None:
            progress.update(len(batch_rows) - len(live))
        if not live:
            break
        if len(live) < len(batch_rows):  # stopped rows leave the batch and the KV cache
            order = kv.drop_rows(live, step)
            keep = torch.tensor(order, device=device)
            prefix_len, tokens = prefix_len[keep], tokens[keep]
            batch_rows = [batch_rows[pos] for pos in order]
        position_ids = (prefix_len + step)[:, None]  # (B, 1) true position of the fed token: the hole is skipped
        out_step = model(input_ids=tokens[:, None], position_ids=position_ids, use_cache=True,
                         **kv.inputs(len(batch_rows), step))
        logits = out_step.logits[:, -1]  # (B, V) the fed token's position predicts the next token
        step += 1
    out.logprobs[:] = [torch.tensor(lp, dtype=torch.float32) for lp in out.logprobs]
    return out


def sample(
    model,
    prompt_ids: list[list[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int | Sequence[int],
    generator: torch.Generator | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    max_length: int | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    show_progress: bool = False,
    shared: bool | None = None,
) -> Rollouts:
    """num_samples continuations of every prefix in prompt_ids; sample j of prefix i is at index i * num_samples + j.

    A row stops at EOS (finished; EOS not returned), at a stop string (finished; cut before it, see find_stop_cut) or
    at its length limit min(max_new_tokens, max_length - len(prefix)) (not finished), docs/paper.md §1.1, §4.3.
    Each prefix's KV cache is computed once, nested prefixes are sliced from one pass over the longest (module doc).
    shared: read each root once with attention.py's attention (True), copy it into every row (False), or decide by
    sharing_pays (None); the tokens are the same and the logprobs equal within float rounding. The model runs in
    eval mode under torch.inference_mode (its train/eval mode and attention are restored on return)."""
    assert tokenizer is not None or not stop_strings, "stop_strings need a tokenizer to decode the response"
    assert all(len(p) > 0 for p in prompt_ids), "every prefix needs at least one token"
    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    limits = [max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(p)) for p in prompt_ids]
    result = Rollouts.empty(len(prompt_ids) * num_samples)
    todo = [i for i in range(len(prompt_ids)) if limits[i] > 0]  # no room left: empty response, not finished
    roots = find_roots([prompt_ids[i] for i in todo])
    lens = [len(prompt_ids[i]) for i in todo]
    shared = sharing_pays(roots, num_samples) if shared is None else shared
    shared = shared and attention.supports(model)
    chunks = plan_chunks(lens, roots, num_samples=num_samples, max_new_tokens=max_new_tokens,
                         max_batch_tokens=max_batch_tokens, shared=shared)
    progress = tqdm(total=len(todo) * num_samples, desc="sampling", unit="seq") if show_progress else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), attention.use(model) if shared else contextlib.nullcontext():
            for chunk in chunks:
                prefix_idx = [todo[c] for c in chunk]
                out = decode_chunk(
                    model, [list(prompt_ids[i]) for i in prefix_idx], num_samples=num_samples,
                    limits=[limits[i] for i in prefix_idx], temperature=temperature, top_p=top_p, eos_ids=eos_ids,
                    generator=generator, stop_strings=stop_strings, tokenizer=tokenizer, progress=progress,
                    shared=shared,
                )
                for k, row in enumerate(i * num_samples + j for i in prefix_idx for j in range(num_samples)):
                    result.response_ids[row], result.logprobs[row] = out.response_ids[k], out.logprobs[k]
                    result.finished[row], result.eos[row] = out.finished[k], out.eos[k]
    finally:
        model.train(was_training)
        if progress is not None:
            progress.close()
    return result
