"""Sampling from a Hugging Face causal LM with a KV cache, for the answers and the MC value rollouts, where VinePPO
spends most of its compute (docs/paper.md §1.2, §6). One function, `sample`, serves both with one Sampling value, so
that the two cannot drift apart (docs/paper.md pitfall 1):

    answers:      sample(model, prompts, num_samples=N, **vars(sampling))  # sample j of prompt i: row i * N + j
    MC rollouts:  sample(model, states, num_samples=K, **vars(sampling))   # a state: prompt + an answer's first tokens

How it works (plain PyTorch and the model's own forward; vLLM's design, small; docs/speed.md says what it costs):
  1. Roots. One answer's states are nested; a prefix's root is the longest prefix of the call that starts with it
     (find_roots), prefilled once into the block cache (attention.py) and read by every row nested in it.
  2. Continuous batching (scheduler.py): each step decodes every live row; as rows stop, waiting roots join, up to
     the memory budget; when no block is free the newest root is preempted and starts over later.
  3. Draws. Each token's uniform number is a hash of (seed, row, token index) (uniforms): a row's samples do not
     depend on its batch, the memory budget or preemption.
  4. One host read per step, the sampled tokens; the host's arrays go to the device in one copy (upload).
What bounds its speed (docs/speed.md): on a GPU, the sequential forward passes, each launch-bound; on a CPU, the
copy of every row's key and value blocks at each step and layer (attention.block_part), half the time on long MC rows.

Sampling follows vLLM (the paper's): top-p over logits / temperature, greedy at 0; logprobs are float32, before top-p,
as the trainer computes them (docs/paper.md pitfall 8).

Test: python -m pytest tests/test_rollout.py tests/test_attention.py -q.   Benchmark: python benchmarks/bench_rollout.py

Departures from the paper's vLLM sampler:
  1. Stop strings cut token ids, not text: the response ends at the last token boundary at or before the start of
     the stop string (vLLM cuts the text exactly). They are searched in the generated text only, as in vLLM.
  2. Different random streams: the same seed gives the same samples here, not vLLM's samples.
  3. Sliding-window attention layers are not supported (check_model refuses them).
  4. Attention over blocks and roots is plain PyTorch (attention.py), not vLLM's fused paged-attention kernel.

Letters: B rows being decoded, P prefixes, R roots, K samples per prefix, T positions, V vocabulary.
"""

import collections
import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

import attention
from attention import BLOCK
import scheduler
from scheduler import Scheduler

# The KV cache's size in tokens when sample is given none: this on a CPU; on CUDA KV_MEMORY_FRACTION of the free
# memory (default_budget), as vLLM's gpu_memory_utilization. tools/memory_plan.py says what fits.
DEFAULT_MAX_BATCH_TOKENS = 2**18
KV_MEMORY_FRACTION = 0.9
# Prefill passes (plan_prefill_passes): at most this many tokens (roots x longest root), no root shorter than
# PREFILL_MIN_FILL x the longest (the rest of its row is padding). docs/speed.md has the measurements.
PREFILL_BATCH_TOKENS = 2**11
PREFILL_MIN_FILL = 0.9
# Top-p looks for the nucleus among this many most probable tokens first (draw).
TOP_P_CANDIDATES = 64
# Stop strings are searched in the exact decoded text: no special-token skipping, no whitespace clean-up.
DECODE_KWARGS = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class Sampling:
    """The settings of `sample` that the answers and their MC continuations share (docs/paper.md pitfall 1)."""

    temperature: float  # 0: greedy
    top_p: float
    max_new_tokens: int
    eos_token_id: int | tuple[int, ...]  # every id that ends an answer (stop_token_ids)
    max_length: int | None = None  # most tokens in prefix + continuation
    stop_strings: tuple[str, ...] = ()
    max_batch_tokens: int | None = None  # KV cache cap in tokens (None: default_budget)


@dataclass
class Rollouts:
    response_ids: list[list[int]]  # sampled tokens per sample, without the EOS token and without the stop string
    logprobs: list[torch.Tensor]  # float32 (len(response_ids[i]),): log_softmax(logits / T) of each sampled token
    finished: list[bool]  # True: stopped on EOS or a stop string; False: hit the length limit
    eos: list[int | None]  # the end token that stopped the sample (one of eos_token_id), else None
    stats: dict = field(default_factory=dict)  # what the engine did: forward passes, host reads, ... (Scheduler)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and every id of the model's generation_config.eos_token_id (chat models list several)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return sorted({tokenizer.eos_token_id, *configured} - {None})


# ---------------------------------------------------------------------------------------------------------------------
# What the engine can run: refused in one line before any work


def check_config(config, max_length: int | None) -> None:
    """Refuse a sliding window shorter than max_length (departure 3) or fewer positions than max_length."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or []) or (
        window is not None and getattr(config, "use_sliding_window", True))
    if sliding and window is not None and (max_length is None or window < max_length):
        raise ValueError(f"this model attends over a sliding window of {window} tokens, which the sampler does not "
                         "support (rollout.py departure 3); use a model with full attention, or a --max-length at most "
                         "the window")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length is not None and positions < max_length:
        raise ValueError(f"this model has {positions} positions, fewer than --max-length {max_length}; lower "
                         "--max-length to at most that")


def check_model(model, max_length: int | None) -> None:
    """check_config, and refuse attention that bypasses Hugging Face's attention interface (attention.use)."""
    check_config(model.config, max_length)
    if not attention.supports(model):
        implementation = getattr(model.config, "_attn_implementation", None)
        raise ValueError(f"this model's attention ({type(model).__name__}, {implementation!r}) does not go through "
                         "Hugging Face's attention interface with SDPA, which the sampler needs; load it with "
                         "attn_implementation='sdpa'")


def check_arguments(prompt_ids, num_samples, max_new_tokens, temperature, top_p, max_length, vocab_size) -> None:
    """sample's arguments, each refused with a ValueError that names it."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or an integer >= 1, got {max_length!r}")
    if not all(len(p) > 0 for p in prompt_ids):
        raise ValueError("every prefix in prompt_ids needs at least one token")
    low, high = min(map(min, prompt_ids), default=0), max(map(max, prompt_ids), default=0)
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"prompt_ids hold token ids from {low} to {high}; the model's vocabulary is 0 to {vocab_size - 1}")


# ---------------------------------------------------------------------------------------------------------------------
# Draws: counter-based uniform numbers, top-p


def uniforms(seed: int, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """U(0, 1] for each (row, token index): a hash of (seed, row, index), as counter-based generators (Philox) are. In
    int64 arithmetic (products < 2**63), so every device gives the same 24-bit numbers."""
    x = (rows * 0x2545F491 + index * 0x1B873593 + seed) & 0xFFFFFFFF
    for _ in range(3):  # a 32-bit integer finaliser (xor-shift-multiply rounds)
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (((x ^ (x >> 16)) >> 8) + 1).float() / 2**24


def sample_next_tokens(logits, u, *, temperature: float, top_p: float, exact: bool = True):
    """One token per row of logits (B, V), by u (B,) in (0, 1]: tokens, float32 logprobs, and whether the top
    TOP_P_CANDIDATES held the nucleus (each (B,)). logprob = log_softmax(logits / temperature)[token]; greedy at 0.

    Top-p (Holtzman et al. 2020; vLLM): the nucleus is the most probable tokens while the mass above one is < top_p;
    the token is the first whose cumulative mass reaches u x the nucleus's mass (inverse CDF). exact False ranks the
    candidates only: the same token wherever they hold the nucleus. top_p = 1 draws in vocabulary order."""
    logits = logits.float()  # float32 logprobs even under bf16 autocast
    if temperature == 0:
        tokens = logits.argmax(dim=-1)  # (B,)
        logprobs = logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        return tokens, logprobs, torch.ones_like(tokens, dtype=torch.bool)
    scaled = logits / temperature  # (B, V)
    log_normalizer = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (B, 1)
    if top_p >= 1:
        order, ranked = None, scaled
    elif exact:
        ranked, order = scaled.sort(dim=-1, descending=True)  # (B, V)
    else:
        ranked, order = scaled.topk(min(TOP_P_CANDIDATES, scaled.shape[-1]), dim=-1)  # (B, C) descending
    probs = torch.exp(ranked - log_normalizer)  # (B, C)
    cdf = probs.cumsum(dim=-1)  # (B, C)
    kept = (cdf - probs < top_p).sum(dim=-1, keepdim=True)  # (B, 1) the nucleus: a prefix of the ranked tokens
    mass = cdf.gather(-1, kept - 1)  # (B, 1) the nucleus's mass
    pick = torch.searchsorted(cdf, u[:, None] * mass).clamp(max=kept - 1)  # (B, 1) first cdf >= u x mass
    tokens = pick[:, 0] if order is None else order.gather(-1, pick)[:, 0]  # (B,)
    logprobs = scaled.gather(-1, tokens[:, None])[:, 0] - log_normalizer[:, 0]
    held = cdf[:, min(TOP_P_CANDIDATES, cdf.shape[-1]) - 1] >= top_p  # (B,) the candidates held the nucleus
    return tokens, logprobs, held | (top_p >= 1)


def draw(logits, u, *, temperature: float, top_p: float, exact: bool) -> tuple[list[int], torch.Tensor, bool, int]:
    """sample_next_tokens in one host read (the flag packed in), again from a full sort where the candidates missed a
    nucleus. Returns the tokens, their logprobs (B,) on the device, whether the next step sorts, the reads made."""
    tokens, logprobs, held = sample_next_tokens(logits, u, temperature=temperature, top_p=top_p, exact=exact)
    packed = (tokens * 2 + held).tolist()  # the step's one host read
    missed = not all(value & 1 for value in packed)
    if missed and not exact:  # a nucleus past the candidates: this step again, from a full sort
        tokens, logprobs, _ = sample_next_tokens(logits, u, temperature=temperature, top_p=top_p, exact=True)
        return tokens.tolist(), logprobs, True, 2
    return [value >> 1 for value in packed], logprobs, missed, 1


# ---------------------------------------------------------------------------------------------------------------------
# Roots and their prefill


def find_roots(prefixes: Sequence[Sequence[int]]) -> list[int]:
    """For each prefix, the index of the longest prefix in the list that starts with it (itself if none does). In
    sorted order p is nested iff its successor starts with p, and then shares its root: one backward pass."""
    order = sorted(range(len(prefixes)), key=lambda i: tuple(prefixes[i]))
    roots = list(range(len(prefixes)))
    for a, b in zip(reversed(order[:-1]), reversed(order[1:])):  # a = predecessor of b in sorted order
        p, q = prefixes[a], prefixes[b]
        if len(p) <= len(q) and list(q[: len(p)]) == list(p):
            roots[a] = roots[b]
    return roots


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


def prefill(model, cache: attention.BlockCache, roots: list[list[int]], blocks: list[list[int]],
            ends: list[tuple[int, int]], device) -> tuple[torch.Tensor, int]:
    """Forward passes over roots, longest first, right-padded per pass (plan_prefill_passes), keys and values to the
    roots' blocks. ends: (root index, prefix length) of each prefix whose next-token logits are wanted; a pre-hook on
    the output layer passes it only those positions, so no (R, T, V) logits are made. Returns the logits (P, V) in the
    order of ends, and the number of passes."""
    order = sorted(range(len(roots)), key=lambda k: -len(roots[k]))  # longest first
    rank = {k: n for n, k in enumerate(order)}
    roots, blocks, ends = [roots[k] for k in order], [blocks[k] for k in order], [(rank[k], n) for k, n in ends]
    head, logits = model.get_output_embeddings(), [None] * len(ends)
    passes = plan_prefill_passes([len(r) for r in roots])
    for start, stop in passes:
        width = len(roots[start])
        batch = torch.tensor([r + [0] * (width - len(r)) for r in roots[start:stop]], device=device)  # (R_pass, T)
        lengths = torch.tensor([len(r) for r in roots[start:stop]], device=device)
        positions = torch.arange(width, device=device)
        wanted = [k for k, (root, _) in enumerate(ends) if start <= root < stop]
        rows = torch.tensor([ends[k][0] - start for k in wanted], device=device)
        cols = torch.tensor([ends[k][1] - 1 for k in wanted], device=device)
        hook = head.register_forward_pre_hook(lambda module, args: (args[0][rows, cols][None],))
        causal = (positions[None, :] <= positions[:, None]) & (positions[None, :] < lengths[:, None, None])
        try:  # a 4D mask (R_pass, 1, T, T), used as given: no check of a 2D mask's values (a host read)
            out = model(input_ids=batch, attention_mask=causal[:, None], position_ids=positions.expand(stop - start,
                        width), use_cache=True)
        finally:
            hook.remove()
        assert out.logits.shape[:2] == (1, len(wanted)), "the model must make its logits with get_output_embeddings()"
        nb = -(-width // BLOCK)
        table = torch.tensor([b + [0] * (nb - len(b)) for b in blocks[start:stop]], device=device)  # (R_pass, nb)
        for layer_idx, layer in enumerate(out.cache.layers):  # keys, values: (R_pass, H, T, D)
            cache.write_roots(layer_idx, layer.keys, layer.values, table)
        for k, row in zip(wanted, out.logits[0]):
            logits[k] = row
    return torch.stack(logits), len(passes)


# ---------------------------------------------------------------------------------------------------------------------
# Stop strings


@functools.lru_cache(maxsize=8)
def stop_candidates(tokenizer, stop_strings: tuple[str, ...], vocab_size: int) -> np.ndarray:
    """(V,) bool: can this token complete a stop string (its text holds a last character of one, a partial character
    or nothing)? Only those tokens need find_stop_cut."""
    texts = tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))], **DECODE_KWARGS)
    lasts = {s[-1] for s in stop_strings}
    candidates = np.ones(vocab_size, dtype=bool)  # ids past the tokenizer's: always checked
    candidates[: len(texts)] = [any(c in t for c in lasts) or "\ufffd" in t or not t for t in texts]
    return candidates


def find_stop_cut(tokenizer, response_ids: list[int], stop_strings: Sequence[str], window: int) -> int | None:
    """If the response holds a stop string, the tokens to keep: the longest prefix whose text ends at or before the
    first one's start; else None. A new stop string ends in the last window tokens, decoded first."""
    tail = tokenizer.decode(response_ids[-window:], **DECODE_KWARGS)
    if not any(s in tail for s in stop_strings):
        return None
    text = tokenizer.decode(response_ids, **DECODE_KWARGS)
    start = min(text.find(s) for s in stop_strings if s in text)
    keep = len(response_ids)
    while keep > 0 and len(tokenizer.decode(response_ids[:keep], **DECODE_KWARGS)) > start:
        keep -= 1
    return keep


# ---------------------------------------------------------------------------------------------------------------------
# sample: the decoding loop


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
    max_batch_tokens: int | None = None,
    show_progress: bool = False,
) -> Rollouts:
    """num_samples continuations of every prefix in prompt_ids, sample j of prefix i at i * num_samples + j, in a KV
    cache of at most max_batch_tokens tokens. A row stops at EOS (finished, EOS not returned), a stop string (finished,
    cut before it) or min(max_new_tokens, max_length - len(prefix)) tokens (unfinished; docs/paper.md §1.1, §4.3)."""
    vocab_size = model.get_output_embeddings().weight.shape[0]
    check_arguments(prompt_ids, num_samples, max_new_tokens, temperature, top_p, max_length, vocab_size)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the response")
    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    limits = [max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(p)) for p in prompt_ids]
    check_model(model, max((len(p) + max(n, 0) for p, n in zip(prompt_ids, limits)), default=None))
    device = next(model.parameters()).device
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=getattr(generator, "device", "cpu")))
    roots = find_roots(prompt_ids)
    cache = make_cache(model, prompt_ids, roots, limits, num_samples, max_batch_tokens, device)
    sched = Scheduler(prompt_ids, roots, num_samples, limits, len(cache.layers[0]), BLOCK)
    candidates = stop_candidates(tokenizer, tuple(stop_strings), vocab_size) if stop_strings else None
    stop = dict(eos_ids=eos_ids, stop_strings=stop_strings, tokenizer=tokenizer, candidates=candidates, limits=limits)
    progress = tqdm(total=sum(map(len, sched.rows_of.values())), desc="sampling", unit="seq", disable=not show_progress)
    was_training, stats, steps = model.training, collections.Counter(), []
    model.eval()
    try:
        with torch.no_grad(), attention.use(model):
            exact = False  # top-p among the top candidates, until a step's nucleus is not among them
            while sched.live or sched.waiting:
                logits, rows = forward_step(model, cache, sched, device, stats)
                rows, index = np.array(rows), np.array([len(sched.tokens[b]) for b in rows])  # the drawn tokens' places
                u = uniforms(seed, *upload(dict(rows=rows, index=index), device).values()) if temperature else None
                tokens, logprobs, exact, reads = draw(logits, u, temperature=temperature, top_p=top_p, exact=exact)
                steps.append((logprobs, rows, index))
                stats["host_reads"] += reads
                progress.update(record(sched, rows.tolist(), tokens, **stop))
    finally:
        model.train(was_training)
        progress.close()
    return rollouts(sched, steps, stats)


def make_cache(model, prefixes, roots, limits, num_samples, max_batch_tokens, device) -> attention.BlockCache:
    """The call's KV pool in the compute dtype: max_batch_tokens (or default_budget) tokens, no more than the call can
    fill, and at least one root with all its rows at their limits."""
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else next(
        model.parameters()).dtype
    budget = max_batch_tokens or default_budget(model, dtype, device)
    blocks = lambda n: -(-n // BLOCK)  # noqa: E731
    per_root = collections.Counter()  # a root's blocks if all its rows reach their limits
    for r in set(roots):
        per_root[r] += blocks(len(prefixes[r]))
    for i, r in enumerate(roots):
        per_root[r] += num_samples * blocks(max(limits[i], 0))
    num_blocks = max(min(blocks(budget), sum(per_root.values())), max(per_root.values(), default=1))
    return attention.BlockCache(model.config, num_blocks + 1, dtype, device)  # + block 0, scratch


def default_budget(model, dtype, device) -> int:
    """KV tokens on CUDA: KV_MEMORY_FRACTION of the free memory less autocast's bf16 weight copies and a step's logits
    and top-p buffers (~40 bytes per row and vocabulary entry); elsewhere DEFAULT_MAX_BATCH_TOKENS."""
    if device.type != "cuda":
        return DEFAULT_MAX_BATCH_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    weights = next(model.parameters()).dtype
    casts = 2 * sum(p.numel() for p in model.parameters()) if dtype != weights else 0
    logits = 40 * scheduler.MAX_ROWS * model.get_output_embeddings().weight.shape[0]
    tokens = int(KV_MEMORY_FRACTION * (free - casts - logits)) // attention.kv_bytes_per_token(model.config, dtype)
    return max(1, tokens)


def forward_step(model, cache, sched: Scheduler, device, stats) -> tuple[torch.Tensor, list[int]]:
    """One round: a decoding step of the live rows, and the prefill of the roots admitted now. Returns the next-token
    logits (B, V) and their rows."""
    parts, rows = [], []
    arrays = sched.step_inputs()  # first: the decoding rows get their blocks, then roots are admitted beside them
    if arrays is not None:
        step = dict(roots_version=sched.roots_version, grid_is_rows=arrays["grid_len"].size == len(sched.fed),
                    pairs_are_rows=arrays["pair_row"].size == len(sched.fed))  # every root N rows; one block each
        parts.append(decode_step(model, cache, upload(arrays, device), step))
        rows += sched.fed
        stats["decode_steps"] += 1
        stats["decoded_tokens"] += len(sched.fed)
    admitted = sched.admit()
    if admitted:
        roots, ends, new_rows = sched.new_rows(admitted)
        blocks = [sched.root_blocks[r] for r in admitted]
        logits, passes = prefill(model, cache, roots, blocks, ends, device)
        parts.append(logits)
        rows += new_rows
        stats["prefill_passes"] += passes
        stats["prefilled_tokens"] += sum(map(len, roots))
    stats["peak_rows"] = max(stats["peak_rows"], len(rows))
    return torch.cat(parts).float(), rows


def upload(arrays: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    """The step's integer arrays in one host-to-device copy, which does not wait for the device (non_blocking)."""
    sizes = [a.size for a in arrays.values()]
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays.values()]).astype(np.int64))
    parts = flat.to(device, non_blocking=True).split(sizes)
    return {name: part.view(a.shape) for (name, a), part in zip(arrays.items(), parts)}


def decode_step(model, cache, inputs: dict[str, torch.Tensor], step: dict) -> torch.Tensor:
    """The forward pass over the fed tokens (B, 1), attention reading the cache (attention.Step): logits (B, V)."""
    tokens, positions = inputs.pop("tokens"), inputs.pop("positions")
    grid_len, pair_count = inputs.pop("grid_len"), inputs.pop("pair_count")  # (R, N), (M,)
    root_positions = torch.arange(inputs["root_blocks"].shape[1] * BLOCK, device=tokens.device)
    step = attention.Step(cache, visible=root_positions < grid_len[..., None],  # (R, N, T) a grid row sees its prefix
                          pair_visible=torch.arange(BLOCK, device=tokens.device) < pair_count[:, None], **inputs,
                          **step)
    out = model(input_ids=tokens[:, None], position_ids=positions[:, None], attention_mask=cache.no_mask,
                use_cache=False, paged=step)
    return out.logits[:, -1]  # (B, V) the fed token's position predicts the next token


def record(sched: Scheduler, rows: list[int], tokens: list[int], *, eos_ids, stop_strings, tokenizer, candidates,
           limits) -> int:
    """Append tokens[k] to row rows[k], and stop rows at EOS, a stop string or their limit (sample). Returns how many
    stopped."""
    window = 4 * max((len(s) for s in stop_strings), default=0) + 2  # tokens that surely hold a new stop string
    stopped = []
    for row, token in zip(rows, tokens):
        response = sched.tokens[row]
        if token in eos_ids:  # EOS: finished, and the EOS token is not part of the response
            sched.finished[row], sched.eos[row] = True, token
            stopped.append(row)
            continue
        response.append(token)
        cut = find_stop_cut(tokenizer, response, stop_strings, window) if candidates is not None and candidates[
            token] else None
        if cut is not None:  # stop string: finished, cut at a token boundary before it
            sched.finished[row] = True
            del response[cut:]
            stopped.append(row)
        elif len(response) >= limits[row // sched.k]:
            stopped.append(row)
    sched.update(stopped, rows[len(sched.fed):])  # the rows after the fed ones were admitted in this round
    return len(stopped)


def rollouts(sched: Scheduler, steps: list, stats: collections.Counter) -> Rollouts:
    """The call's Rollouts: each row's tokens, and their logprobs gathered from the steps in one read."""
    lengths = np.array([len(t) for t in sched.tokens])
    values = torch.cat([s[0] for s in steps]).float().cpu().numpy() if steps else np.zeros(0)  # one read for the call
    rows, index = (np.concatenate([s[k] for s in steps]) if steps else np.zeros(0, int) for k in (1, 2))
    kept = index < lengths[rows]  # one draw per token of each response
    order = np.lexsort((index[kept], rows[kept]))  # by row, then token index
    assert len(order) == lengths.sum(), "one logprob per response token"
    values = np.split(values[kept][order].astype(np.float32), np.cumsum(lengths)[:-1])
    stats["host_reads"] += 1
    stats["preempted_rows"] = sched.preempted
    stats["forward_passes"] = stats["decode_steps"] + stats["prefill_passes"]
    return Rollouts(sched.tokens, [torch.from_numpy(v) for v in values], sched.finished, sched.eos, dict(stats))
