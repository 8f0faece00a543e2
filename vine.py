"""VinePPO's credit assignment: reasoning steps, Monte Carlo (MC) state values, step advantages (paper §4; what the
official code does exactly: docs/paper.md §1.2, §1.3, §2). For every sampled answer:

    split_steps        response text -> step ends (character offsets)             docs/paper.md §2.1, §2.2
    token_steps        each response token -> the step of its first character    docs/paper.md §1.3, §2.3
    step_map           both for one answer: the one splitter, which a fork replaces (docs/fork.md)
    estimate_values    V(s_k) = mean 0/1 reward of K continuations from s_k      docs/paper.md §1.2
    step_advantages    A_i = r_i + V(s_{i+1}) - V(s_i), gamma 1, V(terminal) 0   docs/paper.md §1.3
    token_advantages   every token of step i carries A_i                         docs/paper.md pitfall 5
    value_diagnostic   K-rollout (and critic) values against many-rollout ones   paper §7, docs/paper.md §5.3
    credit_record      what each step of an answer was credited with (train.py --log-samples)

Test: python -m pytest tests/test_vine.py -q

Departures from the paper's code (McGill-NLP/VinePPO):
  1. States live in token space: s_k = prompt_ids + response_ids[:t_k], t_k = the number of tokens whose first
     character lies in the first k steps (docs/paper.md pitfall 12). The official code re-tokenizes the text, so where
     one token spans a step end (".\n") its state ends before the "\n" and ours after it.
  2. GSM8K: a response with several "\n#### " is split at the first one (the official code drops it); a response of
     blank lines only is one step (the official code makes empty steps). All 8,792 GSM8K gold solutions split as there.
  3. MATH: the splitter never raises, and one rule for long pieces is applied as meant (math_steps.py).
  4. MC continuations come from rollout.sample (plain PyTorch, shared-prefix KV cache), not vLLM.
  5. value_diagnostic is ours (the paper's analysis: 256 rollouts per state).

Letters: K rollouts per state, S steps per response, T tokens.
"""

import bisect
import itertools
import statistics

import numpy as np
import torch

import math_steps
import reward
import rollout

# ---------------------------------------------------------------------------------------------------------------------
# Step splitting (docs/paper.md §2)

GSM8K_ANSWER_PREFIX = "\n#### "


def split_steps(response: str, dataset: str) -> list[int]:
    """Ends of the reasoning steps as character offsets into response, the last one len(response); only an empty
    response has an empty step. gsm8k, arithmetic: lines (docs/paper.md §2.1); math: sentences and lines (§2.2).
    Example: "\\nA.\\nB.\\n#### 72\\n" -> [3, 15]: steps "\\nA." and "\\nB.\\n#### 72\\n"."""
    if dataset in ("gsm8k", "arithmetic"):
        pieces = split_lines(response)
    elif dataset == "math":
        pieces = math_steps.split_math(response)
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    assert "".join(pieces) == response, "steps must concatenate back to the response"
    assert len(pieces) == 1 or all(pieces), "only an empty response may give an empty step"
    return list(itertools.accumulate(len(piece) for piece in pieces))


def split_lines(response: str) -> list[str]:
    """GSM8K steps (docs/paper.md §2.1): one per line, each "\\n" opening its step; leading blank lines join the first
    line, and the last line, blank lines after it and "\\n#### <answer>" form the last step."""
    solution, prefix, answer = response.partition(GSM8K_ANSWER_PREFIX)  # split once, at the first answer prefix
    lines = solution.split("\n")
    blank = [line.strip() == "" for line in lines]
    first = blank.index(False) if False in blank else len(lines) - 1  # all blank: everything is one step
    steps = ["\n".join(lines[: first + 1])] + lines[first + 1 :]
    if prefix:
        blank = [step.strip() == "" for step in steps]
        last = len(steps) - 1 - blank[::-1].index(False) if False in blank else 0
        steps = steps[:last] + ["\n".join(steps[last:]) + prefix + answer]
    return [steps[0]] + ["\n" + step for step in steps[1:]]  # the delimiter opens every later step


# ---------------------------------------------------------------------------------------------------------------------
# Steps in token space (docs/paper.md §1.3, §2.3)


def token_start(response_ids: list[int], j: int, text: str, tokenizer) -> int:
    """Where token j starts in text = decode(response_ids): the length of the tokens before it, decoded (a token that
    starts inside a multi-byte character starts at that character)."""
    prefix = tokenizer.decode(response_ids[:j], **rollout.DECODE_KWARGS)
    if text.startswith(prefix):
        return len(prefix)
    return next((c for c, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))


def first_token_at(response_ids: list[int], char_offset: int, text: str, tokenizer, lo: int) -> int:
    """The first token j >= lo with token_start(j) >= char_offset (len(response_ids) if none), by binary search."""
    hi = len(response_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if token_start(response_ids, mid, text, tokenizer) >= char_offset:
            hi = mid
        else:
            lo = mid + 1
    return lo


def token_steps(response_ids: list[int], step_ends: list[int], tokenizer) -> list[int]:
    """(T,) the step in [0, S) of each response token (no EOS): the step of its FIRST character (docs/paper.md §1.3),
    so ".\\n" across a step end is the earlier step's; a token with no character of its own takes the next one's.
    A step may own no token (its state is then the next one's)."""
    text = tokenizer.decode(response_ids, **rollout.DECODE_KWARGS)
    assert step_ends and step_ends[-1] == len(text), "step_ends must end at len(decode(response_ids))"
    bounds, lo = [0], 0  # bounds[k] = t_k, the first token of step k
    for end in step_ends[:-1]:
        lo = first_token_at(response_ids, end, text, tokenizer, lo)
        bounds.append(lo)
    bounds.append(len(response_ids))
    return [k for k in range(len(step_ends)) for _ in range(bounds[k + 1] - bounds[k])]


def step_map(tokenizer, response_ids: list[int], dataset: str) -> list[int]:
    """The step of every token of one answer (EOS excluded): token_steps of split_steps of its text. train.make_episodes
    calls it once per answer; the values, advantages, diagnostic and credit view read it. A fork that cuts steps
    elsewhere replaces this function (docs/fork.md): any non-decreasing step indices from 0 work."""
    text = tokenizer.decode(response_ids, **rollout.DECODE_KWARGS)
    return token_steps(response_ids, split_steps(text, dataset), tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# Monte Carlo values (docs/paper.md §1.2)


def value_states(
    prompt_ids: list[list[int]], response_ids: list[list[int]], token_steps: list[list[int]], gold_answers: list[str],
    max_value_steps: int | None,
) -> tuple[list[tuple], list[list[int]], list[int]]:
    """The states to value, deduplicated (docs/paper.md §1.2, pitfall 4): s_k = prompt + response_ids[:t_k] for
    k = 0 .. m = min(n - 1, max_value_steps), n = 1 + the last token's step, t_k = the tokens in steps < k.
    Returns the unique (prompt ids, prefix ids, gold) tuples, each answer's m + 1 indices into them, and each n."""
    unique, index_of, state_index, num_steps = [], {}, [], []
    for prompt, response, steps, gold in zip(prompt_ids, response_ids, token_steps, gold_answers, strict=True):
        assert len(steps) == len(response), "one step index per response token"
        n = steps[-1] + 1 if steps else 1
        m = n - 1 if max_value_steps is None else min(n - 1, max_value_steps)
        ends = [bisect.bisect_left(steps, k) for k in range(m + 1)]  # t_k = number of tokens in steps < k, t_0 = 0
        indices = []
        for t in ends:
            key = (tuple(prompt), tuple(response[:t]), gold)
            if key not in index_of:
                index_of[key] = len(unique)
                unique.append(key)
            indices.append(index_of[key])
        state_index.append(indices)
        num_steps.append(n)
    return unique, state_index, num_steps


def mc_values(
    tokenizer, states: list[tuple], rollouts: rollout.Rollouts, num_mc_rollouts: int, dataset: str
) -> list[float]:
    """V(s) = (1/K) sum_k R(prefix + continuation_k) for every state u, rows u*K .. u*K + K - 1 (docs/paper.md §1.2),
    graded on the WHOLE solution (pitfall 2), 0 when unfinished, in one reward.grade_batch call."""
    k = num_mc_rollouts
    state_of = [states[row // k] for row in range(len(states) * k)]  # (_, prefix, gold) of every continuation
    texts = [tokenizer.decode(list(prefix) + rollouts.response_ids[row], **rollout.DECODE_KWARGS)
             if rollouts.finished[row] else None  # None: unfinished, reward 0
             for row, (_, prefix, _) in enumerate(state_of)]
    rewards = reward.grade_batch(texts, [gold for _, _, gold in state_of], dataset)
    return [sum(rewards[u * k : (u + 1) * k], 0.0) / k for u in range(len(states))]


def estimate_values(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    token_steps: list[list[int]],
    gold_answers: list[str],
    dataset: str,
    *,
    num_mc_rollouts: int,
    max_value_steps: int | None,
    sampling: rollout.Sampling,
    generator: torch.Generator | None = None,
    show_progress: bool = False,
) -> tuple[list[list[float]], dict]:
    """values[i] = [V(s_0), ..., V(s_m)] of answer i (docs/paper.md §1.2): identical states valued once (pitfall 4),
    K continuations of each from ONE rollout.sample call (shared prefixes, one KV cache), with the policy and the
    rollout.Sampling that sampled the answers, so that the values are on-policy (pitfall 1). stats: states before and
    after dedup, rollouts, steps per answer, MC tokens."""
    assert num_mc_rollouts >= 1, "need at least one rollout per state"
    states, state_index, num_steps = value_states(prompt_ids, response_ids, token_steps, gold_answers, max_value_steps)
    prefixes = [list(prompt) + list(prefix) for prompt, prefix, _ in states]
    rollouts = rollout.sample(
        model, prefixes, num_samples=num_mc_rollouts, generator=generator, tokenizer=tokenizer,
        show_progress=show_progress, **vars(sampling),
    )
    unique_values = mc_values(tokenizer, states, rollouts, num_mc_rollouts, dataset)
    values = [[unique_values[u] for u in indices] for indices in state_index]
    stats = {
        "vine/states_total": sum(len(indices) for indices in state_index),
        "vine/states_unique": len(states),
        "vine/mc_rollouts": len(rollouts.response_ids),
        "vine/mean_steps": sum(num_steps) / max(len(num_steps), 1),
        "vine/mc_tokens": sum(len(ids) for ids in rollouts.response_ids),
    }
    return values, stats


# ---------------------------------------------------------------------------------------------------------------------
# Advantages (docs/paper.md §1.3)


def step_advantages(values: list[float], reward: float, num_steps: int) -> list[float]:
    """A_i = r_i + V(s_{i+1}) - V(s_i) for the n = num_steps steps of one answer (gamma = 1, no GAE; docs/paper.md
    §1.3), r_i = 0 but r_{n-1} = R, V from full_values: the last step gets R - V(s_{n-1})."""
    rewards = [0.0] * (num_steps - 1) + [reward]
    full = full_values(values, reward, num_steps)
    return [rewards[i] + full[i + 1] - full[i] for i in range(num_steps)]


def full_values(values: list[float], reward: float, num_steps: int) -> list[float]:
    """[V(s_0) .. V(s_n)]: the MC values [V(s_0) .. V(s_m)], then R for the states past --max-value-steps (V_i = r_i +
    V_{i+1}: their steps get A = 0), then V(s_n) = 0, terminal (docs/paper.md §1.3)."""
    assert 1 <= len(values) <= num_steps, f"need 1 .. {num_steps} values, got {len(values)}"
    return list(values) + [reward] * (num_steps - len(values)) + [0.0]


def token_advantages(step_advs: list[float], token_steps: list[int]) -> list[float]:
    """Every token of step i carries A_i (docs/paper.md pitfall 5)."""
    return [step_advs[s] for s in token_steps]


def value_errors(estimates: list[list[float]], reference: list[list[float]], prefix: str) -> dict:
    """The mean absolute error of the estimates, and their ranking accuracy over pairs of one answer's states whose
    reference values differ (1 when ordered as the reference, 1/2 for a tie, else 0)."""
    errors, agreements = [], []
    for est, ref in zip(estimates, reference, strict=True):
        errors += [abs(e - r) for e, r in zip(est, ref, strict=True)]
        for i in range(len(ref)):
            for j in range(i + 1, len(ref)):
                if ref[i] != ref[j]:
                    agree = (est[i] - est[j]) * (ref[i] - ref[j])
                    agreements.append(1.0 if agree > 0 else 0.5 if est[i] == est[j] else 0.0)
    stats = {f"{prefix}_mae": float(np.mean(errors))}
    if agreements:
        stats[f"{prefix}_rank_acc"] = float(np.mean(agreements))
    return stats


def value_diagnostic(
    model, tokenizer, prompt_ids: list[list[int]], response_ids: list[list[int]], token_steps: list[list[int]],
    gold_answers: list[str], dataset: str, *, num_mc_rollouts: int, reference_rollouts: int,
    max_value_steps: int | None, sampling: rollout.Sampling, generator: torch.Generator | None = None,
    critic_values=None, show_progress: bool = False,
) -> tuple[dict, dict]:
    """How close values are to the truth (paper §7, docs/paper.md §5.3): reference V(s) from reference_rollouts
    rollouts against a fresh K-rollout estimate_values and, given critic_values (states' token ids -> V(s) each), the
    critic's. Returns value_errors' stats ("diag/mc_mae", ...) and the per-answer values by name."""
    per_answer = {}
    for name, k in (("reference", reference_rollouts), ("mc", num_mc_rollouts)):
        per_answer[name], _ = estimate_values(
            model, tokenizer, prompt_ids, response_ids, token_steps, gold_answers, dataset, num_mc_rollouts=k,
            max_value_steps=max_value_steps, sampling=sampling, generator=generator, show_progress=show_progress,
        )
    if critic_values is not None:
        states, state_index, _ = value_states(prompt_ids, response_ids, token_steps, gold_answers, max_value_steps)
        unique = critic_values([list(prompt) + list(prefix) for prompt, prefix, _ in states])
        per_answer["critic"] = [[unique[u] for u in indices] for indices in state_index]
    reference = per_answer["reference"]
    stats = {"diag/states": sum(len(v) for v in reference)}
    for name in ("mc", "critic"):
        if name in per_answer:
            stats.update(value_errors(per_answer[name], reference, prefix=f"diag/{name}"))
    return stats, per_answer


# ---------------------------------------------------------------------------------------------------------------------
# The credit view (train.py --log-samples, tools/show_credit.py)


def credit_record(tokenizer, episode) -> dict:
    """Each step of an answer (a ppo.Episode after the update, its step map episode.steps): its text, character and
    token spans, mean advantage (None if it owns no token) and as whitened each epoch; vine: V(s_k), V(s_{k+1}), A_k;
    critic: V_old before each token."""
    e, p = episode, len(episode.prompt_ids)
    response_ids, num_steps = e.answer_ids, e.num_steps
    text = tokenizer.decode(response_ids, **rollout.DECODE_KWARGS)
    if e.values is not None:
        full, advantages = full_values(e.values, e.reward, num_steps), step_advantages(e.values, e.reward, num_steps)
    spans = [bisect.bisect_left(e.steps, k) for k in range(num_steps + 1)]  # t_k: the first token of step k
    chars = [token_start(response_ids, t, text, tokenizer) for t in spans[:-1]] + [len(text)]
    steps = []
    for k in range(num_steps):
        t0, t1 = spans[k], spans[k + 1]
        step = {
            "text": text[chars[k] : chars[k + 1]], "chars": [chars[k], chars[k + 1]], "tokens": [t0, t1],
            "advantage": statistics.fmean(e.advantages[t0:t1]) if t1 > t0 else None,
            "whitened": [statistics.fmean(w[t0:t1]) if t1 > t0 else None for w in e.whitened or []],
        }
        if e.values is not None:  # vine: the MC values of the states around the step, and its A_k
            step.update(v_before=full[k], v_after=full[k + 1], advantage=advantages[k])
        if e.old_values is not None:  # critic: V_old(s_t) before each token t of the step
            step["v_old"] = e.old_values[p - 1 + t0 : p - 1 + t1].tolist()
        steps.append(step)
    return {"answer": text, "response_ids": response_ids, "steps": steps}
