"""Tests for rollout.py: greedy == model.generate, logprobs == teacher forcing, prefix reuse == per-prefix sampling,
batched prefill == one forward pass per root, batch independence, seeding, top-p, EOS / stop string / length rules,
chunking. CPU, tiny random models, < 30 s."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from transformers import DynamicCache, LlamaConfig

import rollout
from rollout import find_roots, nucleus_mask, plan_chunks, sample, sample_next_tokens

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
    seqs = random_prompts([23, 22, 16, 9, 4], seed=7)  # (48, 0.9): passes [23, 22], [16], [9], [4]
    prefixes = [s[:k] for s in seqs for k in (2, 5, len(s))]  # 2 and 5 are sliced from their root
    with torch.inference_mode():
        layers, prefix_root, next_logits = rollout.prefill(model, prefixes, torch.device("cpu"))
        assert layers[0][0].shape[:3] == (5, 2 if family != "gpt2" else 4, 23)  # (R, H, T_root, D)
        for k in range(5):
            root = max((p for p, r in zip(prefixes, prefix_root.tolist()) if r == k), key=len)
            out = model(input_ids=torch.tensor([root]), use_cache=True)  # the slow path: this root alone
            # float32 rounding only: measured <= 2e-7 (keys, values and logits of these models)
            for (keys, values), layer in zip(layers, out.cache.layers):  # (R, H, T_root, D) vs (1, H, len(root), D)
                torch.testing.assert_close(keys[k, :, : len(root)], layer.keys[0], atol=1e-5, rtol=0)
                torch.testing.assert_close(values[k, :, : len(root)], layer.values[0], atol=1e-5, rtol=0)
            for i in (i for i, r in enumerate(prefix_root.tolist()) if r == k):  # logits at t predict token t + 1
                torch.testing.assert_close(next_logits[i], out.logits[0, len(prefixes[i]) - 1], atol=1e-5, rtol=0)


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


def test_nucleus_by_hand():
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.9, 0.04, 0.03, 0.02, 0.01]])
    # row 0: 0.5 + 0.3 = 0.8 reaches 0.8 -> keep {1, 3}; row 1: 0.9 alone reaches it -> keep {0}
    expected = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(nucleus_mask(probs, 0.8), expected)
    # 0.5 + 0.3 = 0.8 < 0.85 -> the third token (0.1) joins
    assert nucleus_mask(probs[:1], 0.85).tolist() == [[True, True, False, True, False]]


@pytest.mark.parametrize("candidates", [64, 2])  # 2: the top-2 hold < top_p, the flat (bottom-half) path runs
def test_nucleus_exact_boundary(candidates, monkeypatch):
    monkeypatch.setattr(rollout, "TOP_P_CANDIDATES", candidates)
    probs = torch.tensor([[0.125, 0.25, 0.125, 0.125, 0.25, 0.125]])  # binary fractions: sums are exact
    # 0.25 + 0.25 + 0.125 + 0.125 = 0.75 reaches top_p exactly: 4 tokens (which two of the tied 0.125s is arbitrary)
    kept = nucleus_mask(probs, 0.75)
    assert kept.sum().item() == 4 and kept[0, 1] and kept[0, 4]


def reference_nucleus(probs, top_p):
    """Slow path: sort everything, keep a token iff the mass ranked above it is < top_p."""
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
    keep_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, sorted_idx, keep_sorted)


@pytest.mark.parametrize("scale", [8.0, 0.3, 2.0])  # peaked (top-k path), flat (bottom-half path), neither (sort)
def test_nucleus_fast_paths_equal_sort(scale):
    probs = torch.softmax(scale * torch.randn(16, 500, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.equal(nucleus_mask(probs, 0.9), reference_nucleus(probs, 0.9))


@pytest.mark.parametrize("candidates", [64, 2])  # 2: the top-2 hold < top_p, a slower path runs
def test_top_p_sampling_stays_in_nucleus(candidates, monkeypatch):
    monkeypatch.setattr(rollout, "TOP_P_CANDIDATES", candidates)
    probs = torch.tensor([0.3, 0.05, 0.25, 0.1, 0.2, 0.1])
    logits = torch.log(probs).repeat(3000, 1)  # (B, V)
    gen = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_next_tokens(logits, temperature=1.0, top_p=0.7, generator=gen)
    assert set(tokens.tolist()) == {0, 2, 4}  # 0.3 + 0.25 + 0.2 = 0.75 is the first sum to reach 0.7
    for token in (0, 2, 4):  # drawn from the renormalised nucleus
        assert abs((tokens == token).float().mean().item() - probs[token].item() / 0.75) < 0.04
    torch.testing.assert_close(logprobs, torch.log(probs)[tokens])  # logprobs before top-p
    tokens, _ = sample_next_tokens(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert abs((tokens == 1).float().mean().item() - 0.05) < 0.015  # top_p = 1: the whole distribution


class ScriptedLM(torch.nn.Module):
    """A fake causal LM with the Hugging Face forward interface: the token after position t is always script[t + 1],
    whatever the context (nanochat's MockModel idea). Its one-layer KV cache holds zeros; its "hidden states" are the
    logits, and its output layer (get_output_embeddings, which prefill hooks) is the identity."""

    def __init__(self, script):
        super().__init__()
        self.config = LlamaConfig(num_hidden_layers=1, vocab_size=VOCAB)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script = torch.tensor(script + [0] * 64)
        self.lm_head = torch.nn.Identity()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        num_rows, num_tokens = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(num_tokens).expand(num_rows, num_tokens)
        cache = DynamicCache(config=self.config) if cache is None else cache
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
    with pytest.raises(AssertionError):
        sample(model, [prompt], stop_strings=["x"], **{**kwargs, "tokenizer": None})


def test_find_roots_and_chunks():
    prefixes = [[1, 2], [1, 2, 3, 4], [5], [1, 2, 3], [1, 3], [5, 6], [1, 2, 3, 4]]
    roots = find_roots(prefixes)
    assert [prefixes[r] for r in roots] == [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6], [1, 2, 3, 4], [1, 3], [5, 6],
                                            [1, 2, 3, 4]]
    lens = [len(p) for p in prefixes]
    chunks = plan_chunks(lens, roots, num_samples=2, max_new_tokens=6, max_batch_tokens=40)  # <= 2 prefixes of 4 + 6
    assert sorted(i for c in chunks for i in c) == list(range(7))
    for chunk in chunks:
        assert len(chunk) == 1 or len(chunk) * 2 * (max(lens[roots[i]] for i in chunk) + 6) <= 40


def test_small_max_batch_tokens_gives_same_result(llama):
    seqs = random_prompts([20, 14, 9], seed=6)
    prefixes = [s[:k] for s in seqs for k in (3, 8, len(s))]
    one = sample(llama, prefixes, num_samples=2, max_new_tokens=6, **GREEDY)
    lens = [len(p) for p in prefixes]
    assert len(plan_chunks(lens, find_roots(prefixes), num_samples=2, max_new_tokens=6, max_batch_tokens=60)) > 3
    many = sample(llama, prefixes, num_samples=2, max_new_tokens=6, max_batch_tokens=60, **GREEDY)
    assert many.response_ids == one.response_ids and many.finished == one.finished
    for a, b in zip(many.logprobs, one.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
