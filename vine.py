"""VinePPO's credit assignment: reasoning steps, Monte Carlo (MC) state values, step advantages.

Paper: Kazemnejad et al., "VinePPO", arXiv:2410.01679, paper §4 (MC value estimation, step-level advantages); what
the official code does exactly is in docs/paper.md §1.2, §1.3, §2 and pitfalls 1-5, 10 and 12 there. For every
sampled answer:

    split_steps        response text -> steps (character offsets)                docs/paper.md §2.1, §2.2
    (math_steps.py)
    token_steps        each response token -> the step of its first character    docs/paper.md §1.3, §2.3
    answer_steps       both, for a batch of sampled answers
    estimate_values    V(s_k) = mean 0/1 reward of K continuations from s_k      docs/paper.md §1.2
    step_advantages    A_i = r_i + V(s_{i+1}) - V(s_i), gamma 1, V(terminal) 0   docs/paper.md §1.3
    full_values        V(s_0) .. V(s_n) of every step boundary, past the cap too
    token_advantages   every token of step i carries A_i                         docs/paper.md pitfall 5
    value_diagnostic   how close K-rollout MC values (and a critic's) are to many-rollout ones   VALUE_ANALYSIS_REF
    credit_record      what each step of an answer was credited with (train.py --log-samples)

Test: python -m pytest tests/test_vine.py -q

Departures from the paper's code (McGill-NLP/VinePPO):
  1. States live in token space: s_k = prompt_ids + response_ids[:t_k], t_k = the number of tokens whose first
     character lies in the first k steps (token ids are the truth: re-tokenized text can differ, docs/paper.md
     pitfall 12). The official code re-tokenizes the text prompt + y[:idx[k]], so where one token spans a step end
     (".\n") its state ends before the "\n" and ours after it.
  2. GSM8K: a response with several "\n#### " is split at the first one (the official code fails to parse it and drops
     the answer). A response of blank lines only, with no answer line, is one step (the official code makes empty
     steps). Otherwise the steps are the official ones (all 8,792 GSM8K gold solutions checked).
  3. MATH: the splitter never raises, and one rule for long pieces is applied as meant (math_steps.py, departures).
  4. MC continuations come from rollout.sample (plain PyTorch with a shared prefix KV cache), not vLLM.
  5. value_diagnostic is ours: the paper's analysis (VALUE_ANALYSIS_REF) uses 256 rollouts per state for the reference
     and its own analysis code; here --diagnostic-rollouts rollouts, with the same sampling as training.

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
    """Ends of the reasoning steps as character offsets into response; the last one is len(response).

    Steps are response[prev_end:end] and concatenate back to response exactly. An empty response is one empty step,
    [0]; no other step is empty. gsm8k and arithmetic: one step per line (docs/paper.md §2.1); math: sentences and lines
    (docs/paper.md §2.2).
    Example (docs/paper.md §2.1): "\\nA.\\nB.\\n#### 72\\n" -> [3, 15]: steps "\\nA." and "\\nB.\\n#### 72\\n"."""
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
    """GSM8K steps (docs/paper.md §2.1): one step per line, each "\\n" at the START of the step it opens.

    Leading blank lines join the first non-blank line; the last non-blank line, any blank lines after it and the
    "\\n#### <answer>" part form the last step (the answer is never a step of its own)."""
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
    """Character offset in text = decode(response_ids) where token j starts: the length of the text decoded from the
    tokens before it. A prefix that ends inside a multi-byte character decodes to U+FFFD, so keep only its part that
    agrees with text: a token that starts inside a character then starts at that character."""
    prefix = tokenizer.decode(response_ids[:j], **rollout.DECODE_KWARGS)
    if text.startswith(prefix):
        return len(prefix)
    return next((c for c, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))


def first_token_at(response_ids: list[int], char_offset: int, text: str, tokenizer, lo: int) -> int:
    """The first token j >= lo with token_start(j) >= char_offset (len(response_ids) if none): binary search, since
    token starts never decrease; O(log T) decodes instead of T."""
    hi = len(response_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if token_start(response_ids, mid, text, tokenizer) >= char_offset:
            hi = mid
        else:
            lo = mid + 1
    return lo


def token_steps(response_ids: list[int], step_ends: list[int], tokenizer) -> list[int]:
    """The step index of every response token: a token belongs to the step that holds its FIRST character
    (docs/paper.md §1.3), so a token such as ".\\n" that spans a step end belongs to the earlier step. Tokens with no
    character of their own take the step of the next character (the last step at the end). step_ends come from
    split_steps(tokenizer.decode(response_ids, **rollout.DECODE_KWARGS), dataset). EOS is not in response_ids.
    Returns (T,) ints in [0, S); a step may own no token at all (then its state equals the next one's)."""
    text = tokenizer.decode(response_ids, **rollout.DECODE_KWARGS)
    assert step_ends and step_ends[-1] == len(text), "step_ends must end at len(decode(response_ids))"
    bounds, lo = [0], 0  # bounds[k] = t_k, the first token of step k
    for end in step_ends[:-1]:
        lo = first_token_at(response_ids, end, text, tokenizer, lo)
        bounds.append(lo)
    bounds.append(len(response_ids))
    return [k for k in range(len(step_ends)) for _ in range(bounds[k + 1] - bounds[k])]


def answer_steps(tokenizer, responses: list[list[int]], dataset: str) -> tuple[list[list[int]], list[list[int]]]:
    """Each answer's steps (split_steps of its decoded text) and the step of each of its tokens (token_steps)."""
    texts = [tokenizer.decode(ids, **rollout.DECODE_KWARGS) for ids in responses]
    steps = [split_steps(text, dataset) for text in texts]
    return steps, [token_steps(ids, s, tokenizer) for ids, s in zip(responses, steps)]


# ---------------------------------------------------------------------------------------------------------------------
# Monte Carlo values (docs/paper.md §1.2)


def value_states(
    prompt_ids: list[list[int]], response_ids: list[list[int]], token_steps: list[list[int]], gold_answers: list[str],
    max_value_steps: int | None,
) -> tuple[list[tuple], list[list[int]], list[int]]:
    """The states to value, deduplicated (docs/paper.md §1.2, pitfall 4). Answer i with n steps (steps that own tokens:
    n = 1 + its last token's step) has states s_0 = prompt and s_k = prompt + response_ids[:t_k] for
    k = 1 .. m = min(n - 1, max_value_steps), t_k = its number of tokens in steps < k. The terminal s_n is not valued.
    Returns the unique states as (prompt ids, response prefix ids, gold) tuples, each answer's indices into them
    (length m + 1), and each answer's n. States are equal iff all three are (same problem, same token ids)."""
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
    """V(s) = (1/K) sum_k R(prefix + continuation_k) for every state (docs/paper.md §1.2). Each continuation is
    graded on the WHOLE solution, the answer's earlier steps plus the continuation (docs/paper.md pitfall 2); one that
    hit the length limit scores 0 (the unfinished penalty). Continuations of state u are rows u*K .. u*K + K - 1. All
    continuations are graded in one reward.grade_batch call (MATH: together, in its worker pool)."""
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
    """MC value of every step state of every answer (docs/paper.md §1.2): values[i] = [V(s_0), ..., V(s_m)].

    Answers of one prompt repeat its prompt_ids. Identical states are valued once (the bare prompt once per prompt,
    docs/paper.md pitfall 4), then K = num_mc_rollouts continuations of every unique state come from ONE rollout.sample
    call, which shares each prefix's KV cache among its K rows and slices nested prefixes from one pass. Pass the policy
    and the rollout.Sampling that sampled the answers (T, top_p, max_new_tokens, max_length, stop strings; docs/paper.md
    pitfall 1), so that the values are on-policy for pi_old.
    An answer's n counts its steps up to the one holding its last token (a trailing step that owns no token adds no
    state); step_advantages gives the same advantages with num_steps = that n or len(split_steps(...)).
    stats: states before and after dedup, rollouts, steps per answer, and tokens generated by the MC rollouts."""
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
    §1.3).

    r_i = 0 for i < n - 1 and r_{n-1} = R (the answer's 0/1 reward); V from full_values. Inner steps:
    V(s_{i+1}) - V(s_i); the last step: R - V(s_{n-1}); a one-step answer: R - V(s_0)."""
    rewards = [0.0] * (num_steps - 1) + [reward]
    full = full_values(values, reward, num_steps)
    return [rewards[i] + full[i + 1] - full[i] for i in range(num_steps)]


def full_values(values: list[float], reward: float, num_steps: int) -> list[float]:
    """[V(s_0) .. V(s_n)] of an answer with n = num_steps steps: values = [V(s_0) .. V(s_m)], m <= n - 1, are the MC
    estimates; V(s_n) = 0 (terminal); the states past the cap (--max-value-steps) are filled backwards,
    V_i = r_i + V_{i+1} = R, so their steps get A = 0 and the last valued state's step gets R - V(s_m) (docs/paper.md
    §1.3)."""
    assert 1 <= len(values) <= num_steps, f"need 1 .. {num_steps} values, got {len(values)}"
    return list(values) + [reward] * (num_steps - len(values)) + [0.0]


def token_advantages(step_advs: list[float], token_steps: list[int]) -> list[float]:
    """Every token of step i carries A_i (docs/paper.md pitfall 5). The EOS (not in token_steps) takes the last
    step's."""
    return [step_advs[s] for s in token_steps]


def value_errors(estimates: list[list[float]], reference: list[list[float]], prefix: str) -> dict:
    """How well per-answer state values match reference values (paper §7; train.py's --value-diagnostic): the mean
    absolute error over (answer, state) pairs, and the ranking accuracy over pairs of states of one answer whose
    reference values differ (1 when the estimate orders them as the reference does, 1/2 for a tie, else 0)."""
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
    """How well value estimates match the truth on sampled answers' step states (VALUE_ANALYSIS_REF, "why the critic
    fails"): the reference V(s) is the mean reward of reference_rollouts MC rollouts from s (the paper: 256),
    compared with a fresh estimate_values of num_mc_rollouts rollouts (what VinePPO uses) and, if critic_values is
    given (a function from the states' token ids, prompt + prefix, to one V(s) each), the critic's predictions.
    Returns the stats of value_errors per estimator ("diag/mc_mae", "diag/critic_rank_acc", ...) and the number of
    states valued, and the per-answer values by name ("reference", "mc", "critic")."""
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


def credit_record(tokenizer, episode, response_ids: list[int], dataset: str) -> dict:
    """What one answer's steps were credited with, by any estimator: its text, token ids and, per step of
    split_steps, its character span, its token span [t_k, t_{k+1}), its advantage and that advantage as whitened in
    each epoch's minibatch (episode.whitened), the mean over its tokens (for vine, grpo and rloo every token of a
    step carries one value; None for a step that owns no token). With MC values (vine): V(s_k) before and
    V(s_{k+1}) after the step (full_values) and A_k itself. With a critic: V_old(s_t) before each of its tokens
    (A_t = R - V_old(s_t)). episode: a ppo.Episode after the update; response_ids: its tokens without the EOS."""
    text = tokenizer.decode(response_ids, **rollout.DECODE_KWARGS)
    ends = split_steps(text, dataset)
    owner = token_steps(response_ids, ends, tokenizer)  # the step of every token
    e, p, steps = episode, len(episode.prompt_ids), []
    if e.values is not None:
        full, advantages = full_values(e.values, e.reward, len(ends)), step_advantages(e.values, e.reward, len(ends))
    for k, end in enumerate(ends):
        start, t0, t1 = ends[k - 1] if k else 0, bisect.bisect_left(owner, k), bisect.bisect_left(owner, k + 1)
        step = {
            "text": text[start:end], "chars": [start, end], "tokens": [t0, t1],
            "advantage": statistics.fmean(e.advantages[t0:t1]) if t1 > t0 else None,
            "whitened": [statistics.fmean(w[t0:t1]) if t1 > t0 else None for w in e.whitened or []],
        }
        if e.values is not None:  # vine: the MC values of the states around the step, and its A_k
            step.update(v_before=full[k], v_after=full[k + 1], advantage=advantages[k])
        if e.old_values is not None:  # critic: V_old(s_t) before each token t of the step
            step["v_old"] = e.old_values[p - 1 + t0 : p - 1 + t1].tolist()
        steps.append(step)
    return {"answer": text, "response_ids": response_ids, "steps": steps}
