"""Tests for rollout.py and scheduler.py: greedy == model.generate, logprobs == teacher forcing, prefix reuse ==
per-prefix sampling, batched prefill == one forward pass per root, a row's draws independent of its batch, of the memory
budget and of preemption, seeding, top-p, EOS / stop string / length rules, the costs a GPU pays (host reads, weight
casts, rows per step), the arguments and models refused. CPU, tiny random models, < 30 s."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from transformers import DynamicCache, LlamaConfig

import attention
import rollout
from rollout import find_roots, sample, sample_next_tokens

VOCAB = 320
GREEDY = dict(temperature=0.0, top_p=1.0, eos_token_id=2)


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def generate_one(model, prefix, max_new_tokens):
    """The slow path: Hugging Face generate on one prefix alone, greedy, EOS removed."""
    out = model.generate(torch.tensor([prefix]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=2,
                         pad_token_id=0)
    response = out[0, len(prefix):].tolist()
    return response[: response.index(2)] if 2 in response else response


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one thread is faster than two, and much faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama():
    return make_model("llama", VOCAB, seed=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_generate(family):
    model = make_model(family, VOCAB, seed=1)
    prompts = random_prompts([3, 11, 7, 20])
    rollouts = sample(model, prompts, num_samples=2, max_new_tokens=12, **GREEDY)
    for i, prompt in enumerate(prompts):
        expected = generate_one(model, prompt, 12)
        assert rollouts.response_ids[2 * i] == expected and rollouts.response_ids[2 * i + 1] == expected
        assert rollouts.finished[2 * i] == (len(expected) < 12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logprobs_equal_teacher_forcing(family):
    model = make_model(family, VOCAB, seed=2)
    prompts = random_prompts([4, 9, 15], seed=1)
    gen = torch.Generator().manual_seed(0)
    # max_length=20 stops the third prompt's rows after 5 tokens: the others continue in a compacted batch
    rollouts = sample(model, prompts, num_samples=3, max_new_tokens=10, temperature=0.7, top_p=0.9, eos_token_id=2,
                      generator=gen, max_length=20)
    for row, (ids, logprobs) in enumerate(zip(rollouts.response_ids, rollouts.logprobs)):
        assert logprobs.dtype == torch.float32 and logprobs.shape == (len(ids),)
        prompt = prompts[row // 3]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0].float()  # (T, V)
        # logits at position t predict token t + 1: response token k sits at len(prompt) + k
        expected = torch.log_softmax(logits / 0.7, dim=-1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(ids)[:, None])
        torch.testing.assert_close(logprobs, expected[:, 0], atol=1e-4, rtol=0)


def test_prefix_reuse_equals_per_prefix(llama):
    # nested step states of three sequences, shuffled, one duplicated, as vine.py passes them
    seqs = random_prompts([30, 24, 18], seed=3)
    prefixes = [s[:k] for s in seqs for k in (4, 9, 17, len(s))] + [seqs[0][:9]]
    order = torch.randperm(len(prefixes), generator=torch.Generator().manual_seed(0)).tolist()
    prefixes = [prefixes[i] for i in order]
    rollouts = sample(llama, prefixes, num_samples=3, max_new_tokens=8, max_length=35, **GREEDY)
    for i, prefix in enumerate(prefixes):
        expected = generate_one(llama, prefix, min(8, 35 - len(prefix)))
        assert rollouts.response_ids[3 * i : 3 * i + 3] == [expected] * 3, f"prefix {i} (length {len(prefix)})"


def test_plan_prefill_passes(monkeypatch):
    monkeypatch.setattr(rollout, "PREFILL_BATCH_TOKENS", 40)
    monkeypatch.setattr(rollout, "PREFILL_MIN_FILL", 0.9)
    # [20, 19] (3 x 20 > 40), [18] (10 < 0.9 x 18), [10, 9] (9 >= 0.9 x 10), [5]
    assert rollout.plan_prefill_passes([20, 19, 18, 10, 9, 5]) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert rollout.plan_prefill_passes([50, 3]) == [(0, 1), (1, 2)]  # a root over the budget still gets a pass


# one pass, every shorter root right-padded; several passes of different widths, padding inside some of them
@pytest.mark.parametrize("batch_tokens, min_fill", [(2**11, 0.0), (48, 0.9)])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_batched_prefill_equals_per_root(family, batch_tokens, min_fill, monkeypatch):
    monkeypatch.setattr(rollout, "PREFILL_BATCH_TOKENS", batch_tokens)
    monkeypatch.setattr(rollout, "PREFILL_MIN_FILL", min_fill)
    model = make_model(family, VOCAB, seed=3)
    roots = random_prompts([23, 40, 16, 9, 4], seed=7)  # (48, 0.9): passes [40], [23], [16], [9], [4]
    blocks = [[1, 2], [3, 4], [5], [6], [7]]
    ends = [(k, n) for k, root in enumerate(roots) for n in (2, len(root))]  # 2: a prefix sliced from its root
    cache = attention.BlockCache(model.config, 8, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        logits, passes = rollout.prefill(model, cache, roots, blocks, ends, torch.device("cpu"))
        assert passes == (1 if batch_tokens == 2**11 else 5)
        for k, root in enumerate(roots):
            out = model(input_ids=torch.tensor([root]), use_cache=True)  # the slow path: this root alone
            # float32 rounding only: measured <= 2e-7 (keys, values and logits of these models)
            for pool, layer in zip(cache.layers, out.cache.layers):  # (NB, H, 2, BLOCK, D) vs (1, H, T, D)
                mine = attention.gather_roots(pool, torch.tensor([blocks[k]]))[0, :, :, : len(root)]  # (H, 2, T, D)
                torch.testing.assert_close(mine[:, 0], layer.keys[0], atol=1e-5, rtol=0)
                torch.testing.assert_close(mine[:, 1], layer.values[0], atol=1e-5, rtol=0)
            for i in (i for i, (r, _) in enumerate(ends) if r == k):  # logits at t predict token t + 1
                torch.testing.assert_close(logits[i], out.logits[0, ends[i][1] - 1], atol=1e-5, rtol=0)


def test_samples_do_not_depend_on_batch(llama):
    prompts = random_prompts([6, 25, 13, 2], seed=4)
    together = sample(llama, prompts, num_samples=1, max_new_tokens=10, **GREEDY).response_ids
    alone = [sample(llama, [p], num_samples=1, max_new_tokens=10, **GREEDY).response_ids[0] for p in prompts]
    assert together == alone


def test_seed_repeats_exactly(llama):
    prompts = random_prompts([5, 12], seed=5)
    kwargs = dict(num_samples=4, max_new_tokens=10, temperature=1.0, top_p=0.9, eos_token_id=2)
    a = sample(llama, prompts, generator=torch.Generator().manual_seed(7), **kwargs)
    b = sample(llama, prompts, generator=torch.Generator().manual_seed(7), **kwargs)
    c = sample(llama, prompts, generator=torch.Generator().manual_seed(8), **kwargs)
    assert a.response_ids == b.response_ids and all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    assert a.response_ids != c.response_ids
    assert len(set(map(tuple, a.response_ids[:4]))) > 1, "samples of one prompt should differ at T=1"


def test_top_p_by_hand():
    """probs 0.5, 0.3, 0.1, 0.05, 0.05 at T = 1: top-p 0.75 keeps the first two (0.5 + 0.3 reaches it); u x 0.8 picks
    the first token whose cumulative mass reaches it, in probability order."""
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])).repeat(4, 1)
    u = torch.tensor([0.1, 0.6, 0.65, 1.0])  # targets 0.08, 0.48, 0.52, 0.8
    for exact in (True, False):
        tokens, logprobs, held = sample_next_tokens(logits, u, temperature=1.0, top_p=0.75, exact=exact)
        assert tokens.tolist() == [1, 1, 3, 3] and held.all()
        torch.testing.assert_close(logprobs, torch.log(torch.tensor([0.5, 0.5, 0.3, 0.3])))  # before top-p


def test_top_p_among_the_candidates_flags_a_nucleus_beyond_them(monkeypatch):
    monkeypatch.setattr(rollout, "TOP_P_CANDIDATES", 2)
    probs = torch.tensor([[0.3, 0.05, 0.25, 0.1, 0.2, 0.1], [0.9, 0.02, 0.02, 0.02, 0.02, 0.02]])
    u = torch.tensor([0.95, 0.5])
    fast = sample_next_tokens(torch.log(probs), u, temperature=1.0, top_p=0.7, exact=False)
    exact = sample_next_tokens(torch.log(probs), u, temperature=1.0, top_p=0.7, exact=True)
    assert fast[2].tolist() == exact[2].tolist() == [False, True]  # row 0's nucleus has 3 tokens, row 1's one
    assert exact[0].tolist() == [4, 0] and fast[0][1] == 0  # 0.95 x 0.75 falls on the third token, 0.2
    tokens, _, missed, reads = rollout.draw(torch.log(probs), u, temperature=1.0, top_p=0.7, exact=False)
    assert tokens == [4, 0] and missed and reads == 2  # drawn again, sorted, and the next step sorts


@pytest.mark.parametrize("scale", [8.0, 0.3])  # peaked (the nucleus among the candidates) and flat (it is not)
def test_top_p_draws_from_the_renormalised_nucleus(scale):
    probs = torch.softmax(torch.tensor([[scale * v for v in (3.0, 1.0, 2.5, 0.5, 2.0, 0.0)]]), dim=-1)
    logits = torch.log(probs).repeat(6000, 1)  # (B, V)
    u = rollout.uniforms(7, torch.arange(6000), torch.zeros(6000, dtype=torch.long))
    tokens, logprobs, _ = sample_next_tokens(logits, u, temperature=1.0, top_p=0.7, exact=True)
    order = probs[0].argsort(descending=True)
    nucleus = order[: int(((probs[0][order].cumsum(0) - probs[0][order]) < 0.7).sum())]
    assert set(tokens.tolist()) == set(nucleus.tolist())
    for token in nucleus.tolist():
        assert abs((tokens == token).float().mean().item() - probs[0, token] / probs[0, nucleus].sum()) < 0.02
    torch.testing.assert_close(logprobs, torch.log(probs[0])[tokens])  # logprobs before top-p


def test_uniforms_are_uniform_and_depend_on_seed_row_and_index_only():
    rows, index = torch.arange(500).repeat_interleave(40), torch.arange(40).repeat(500)
    u = rollout.uniforms(3, rows, index)
    assert u.dtype == torch.float32 and 0 < float(u.min()) and float(u.max()) <= 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - 2000).abs().max() < 200  # 20,000 draws in 10 bins: sd ~42
    assert torch.equal(rollout.uniforms(3, rows[::7], index[::7]), u[::7])  # any subset, any order: the same numbers
    assert not torch.equal(rollout.uniforms(4, rows, index), u)


class ScriptedLM(torch.nn.Module):
    """A fake causal LM with the Hugging Face forward interface: the token after position t is always script[t + 1],
    whatever the context (nanochat's MockModel idea). Its one-layer KV cache holds zeros; its "hidden states" are the
    logits, and its output layer (get_output_embeddings, which prefill hooks) is the identity."""

    def __init__(self, script):
        super().__init__()
        self.config = LlamaConfig(num_hidden_layers=1, vocab_size=VOCAB, hidden_size=2, num_attention_heads=1)
        self.config._attn_implementation = "sdpa"
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script = torch.tensor(script + [0] * 64)
        self.lm_head = torch.nn.Linear(VOCAB, VOCAB, bias=False)
        self.lm_head.weight.data = torch.eye(VOCAB)

    def get_output_embeddings(self):
        return self.lm_head

    def set_attn_implementation(self, name):
        self.config._attn_implementation = name

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, paged=None):
        num_rows, num_tokens = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(num_tokens).expand(num_rows, num_tokens)
        cache = DynamicCache(config=self.config)
        cache.update(torch.zeros(num_rows, 1, num_tokens, 2), torch.zeros(num_rows, 1, num_tokens, 2), 0)
        hidden = 20.0 * F.one_hot(self.script[position_ids + 1], VOCAB).float()  # (B, T, V)
        return SimpleNamespace(logits=self.lm_head(hidden), cache=cache)


def test_eos_and_length_limit():
    prompt = [10, 11, 12]
    model = ScriptedLM(prompt + [5, 6, 2, 7, 8])
    run = lambda **kw: sample(model, [prompt], num_samples=2, temperature=0.0, top_p=1.0, **kw)  # noqa: E731
    r = run(max_new_tokens=10, eos_token_id=2)
    assert r.response_ids == [[5, 6]] * 2 and r.finished == [True, True] and r.logprobs[0].shape == (2,)
    assert r.eos == [2, 2]
    r = run(max_new_tokens=3, eos_token_id=2)  # EOS is the 3rd token: still finished
    assert r.response_ids[0] == [5, 6] and r.finished[0]
    r = run(max_new_tokens=2, eos_token_id=2)
    assert r.response_ids[0] == [5, 6] and not r.finished[0] and r.eos[0] is None
    r = run(max_new_tokens=10, eos_token_id=[9, 6])  # any of several EOS ids, and which one it was
    assert r.response_ids[0] == [5] and r.finished[0] and r.eos[0] == 6
    r = run(max_new_tokens=10, eos_token_id=2, max_length=4)  # prefix + response reaches max_length
    assert r.response_ids[0] == [5] and not r.finished[0]
    r = run(max_new_tokens=10, eos_token_id=2, max_length=3)  # no room at all
    assert r.response_ids[0] == [] and not r.finished[0]


def test_stop_strings_cut_at_token_boundary(tokenizer):
    prompt = tokenizer.encode("Solution:")
    response = tokenizer.encode("\nNatalia sold 48/2 = 24 clips.\n#### 7\n\n\nProblem: more")
    model = ScriptedLM(prompt + response + [2])
    pieces = [tokenizer.decode([t]) for t in response]
    kwargs = dict(num_samples=1, max_new_tokens=40, temperature=0.0, top_p=1.0, eos_token_id=2, tokenizer=tokenizer)
    # the stop string starts on a token boundary: the response ends just before it
    r = sample(model, [prompt], stop_strings=["\n\n\nProblem:"], **kwargs)
    assert r.finished[0] and tokenizer.decode(r.response_ids[0]) == "\nNatalia sold 48/2 = 24 clips.\n#### 7"
    assert len(r.logprobs[0]) == len(r.response_ids[0])
    # "\n####" starts inside the token ".\n": that whole token goes, the "." with it (departure 1)
    assert ".\n" in pieces
    r = sample(model, [prompt], stop_strings=["Problem:", "\n####"], **kwargs)
    assert r.finished[0] and tokenizer.decode(r.response_ids[0]) == "\nNatalia sold 48/2 = 24 clips"
    # no stop string: runs to EOS
    r = sample(model, [prompt], stop_strings=["Solution:"], **kwargs)
    assert r.finished[0] and r.response_ids[0] == response
    with pytest.raises(ValueError, match="need a tokenizer"):
        sample(model, [prompt], stop_strings=["x"], **{**kwargs, "tokenizer": None})


def test_find_roots():
    prefixes = [[1, 2], [1, 2, 3, 4], [5], [1, 2, 3], [1, 3], [5, 6], [1, 2, 3, 4]]
    roots = find_roots(prefixes)
    assert [prefixes[r] for r in roots] == [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6], [1, 2, 3, 4], [1, 3], [5, 6],
                                            [1, 2, 3, 4]]


def nested_prefixes():
    """Nested step states of three sequences, shuffled, one duplicated, as vine.py passes them."""
    seqs = random_prompts([30, 24, 18], seed=6)
    prefixes = [s[:k] for s in seqs for k in (3, 8, 17, len(s))] + [seqs[0][:8]]
    order = torch.randperm(len(prefixes), generator=torch.Generator().manual_seed(1)).tolist()
    return [prefixes[i] for i in order]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_small_budget_refills_and_preempts_and_draws_the_same_tokens(llama, temperature):
    """A budget of a few blocks: roots wait, join as others end, rows are preempted and prefilled again; every row
    draws what it draws with room for everything (its draws depend on (seed, row, token index) only)."""
    prefixes = nested_prefixes()
    kwargs = dict(num_samples=3, max_new_tokens=70, temperature=temperature, top_p=0.9, eos_token_id=2)
    roomy = sample(llama, prefixes, generator=torch.Generator().manual_seed(5), **kwargs)
    tight = sample(llama, prefixes, generator=torch.Generator().manual_seed(5), max_batch_tokens=96, **kwargs)
    assert roomy.stats["preempted_rows"] == 0 and tight.stats["preempted_rows"] > 0
    assert tight.stats["prefill_passes"] > roomy.stats["prefill_passes"]
    assert tight.response_ids == roomy.response_ids and tight.finished == roomy.finished
    for a, b in zip(tight.logprobs, roomy.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_rows_draws_do_not_depend_on_the_rows_beside_it(llama):
    prompts = random_prompts([6, 25, 13, 2], seed=4)
    kwargs = dict(num_samples=2, max_new_tokens=12, temperature=1.0, top_p=0.95, eos_token_id=2)
    together = sample(llama, prompts, generator=torch.Generator().manual_seed(3), **kwargs).response_ids
    seed = int(torch.randint(2**31 - 1, (1,), generator=torch.Generator().manual_seed(3)))
    for i, prompt in enumerate(prompts):  # alone, as rows 2i and 2i + 1 of the same seed: the uniforms of those rows
        alone = sample(llama, prompts, generator=torch.Generator().manual_seed(3), **kwargs).response_ids[2 * i:]
        assert alone[:2] == together[2 * i : 2 * i + 2]
    assert seed >= 0


class HostReads:
    """Count tensor -> Python reads (.tolist(), .item(), bool(), int(), float()): each waits for a GPU."""

    def __init__(self):
        self.count, self.saved = 0, {}

    def __enter__(self):
        for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
            original = self.saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, lambda t, *a, _f=original, **k: (self.bump(), _f(t, *a, **k))[1])
        return self

    def bump(self):
        self.count += 1

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def test_one_host_read_per_decoding_step(llama):
    prefixes = nested_prefixes()
    with HostReads() as reads:
        out = sample(llama, prefixes, num_samples=3, max_new_tokens=30, temperature=0.7, top_p=0.9, eos_token_id=2,
                     generator=torch.Generator().manual_seed(0), max_batch_tokens=160)
    passes = out.stats["forward_passes"]
    # one per round of forward passes (the draw), one at the start (the seed), one at the end (every logprob); a flat
    # random model's nucleus is never among the top candidates: its first step draws again, then every step sorts
    assert passes > 20 and reads.count <= passes + 3 and out.stats["host_reads"] <= passes + 3


class WeightCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Count casts (aten._to_copy) of the model's weights per forward pass."""

    def __init__(self, model):
        super().__init__()
        self.weights = {p.data_ptr() for p in model.parameters()}
        self.casts, self.per_pass = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.weights:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_under_bf16_autocast_each_weight_is_cast_once_per_call_not_per_step(llama):
    passes, casts = [], WeightCasts(llama)
    hook = llama.register_forward_pre_hook(lambda *a: passes.append(casts.casts))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), casts:
            out = sample(llama, random_prompts([5, 9]), num_samples=4, max_new_tokens=10, **GREEDY)
    finally:
        hook.remove()
    linear = sum(isinstance(m, torch.nn.Linear) for m in llama.modules())
    assert out.stats["decode_steps"] >= 9 and casts.casts == passes[1] == linear  # all in the first pass, then none


def test_the_cache_holds_what_rows_contain(llama):
    """36 rows that end early (an EOS bias) in a budget of 320 tokens: reserving max_new_tokens = 64 per row would
    run at most 5 at a time; blocks of 32 tokens run them together."""
    model = make_model("llama", VOCAB, seed=4)
    model.lm_head.register_forward_hook(lambda m, a, logits: logits.index_add(-1, torch.tensor([2]), torch.full(
        (*logits.shape[:-1], 1), 4.0)))  # EOS about 15% likely: rows stop after a few tokens
    out = sample(model, random_prompts([4, 6, 5, 3]), num_samples=9, max_new_tokens=64, temperature=1.0, top_p=1.0,
                 eos_token_id=2, generator=torch.Generator().manual_seed(0), max_batch_tokens=320)
    assert out.stats["peak_rows"] > 320 // 64 and sum(map(len, out.response_ids)) < 36 * 64 / 4


def test_arguments_are_refused_by_name(llama):
    kwargs = dict(num_samples=1, max_new_tokens=3, temperature=0.6, top_p=0.9, eos_token_id=2)
    for change, name in [(dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
                         (dict(num_samples=-1), "num_samples"), (dict(top_p=0.0), "top_p"),
                         (dict(max_new_tokens=-2), "max_new_tokens"), (dict(max_length=0), "max_length")]:
        with pytest.raises(ValueError, match=name):
            sample(llama, [[5, 6]], **{**kwargs, **change})
    with pytest.raises(ValueError, match="token ids from 5 to 320"):
        sample(llama, [[5, VOCAB]], **kwargs)
    with pytest.raises(ValueError, match="at least one token"):
        sample(llama, [[]], **kwargs)


def test_models_the_engine_cannot_run_are_refused_in_one_line():
    from transformers import GPT2Config, MistralConfig

    window = MistralConfig(sliding_window=64, num_hidden_layers=1, hidden_size=8, num_attention_heads=2)
    with pytest.raises(ValueError, match="sliding window of 64 tokens"):
        rollout.check_config(window, max_length=160)
    rollout.check_config(window, max_length=64)  # a window as long as the sequences is full attention
    with pytest.raises(ValueError, match="512 positions, fewer than --max-length 600"):
        rollout.check_config(GPT2Config(n_positions=512), max_length=600)
    model = make_model("llama", VOCAB)
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="attention interface"):
        rollout.check_model(model, 100)


def test_stop_candidates_are_the_tokens_that_can_end_a_stop_string(tokenizer):
    candidates = rollout.stop_candidates(tokenizer, ("\n\n\nProblem:",), len(tokenizer) + 3)
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    assert all(candidates[i] == (":" in t or "\ufffd" in t or not t) for i, t in enumerate(texts))
    assert candidates[len(tokenizer):].all() and 0 < candidates[: len(tokenizer)].sum() < len(tokenizer) / 2
