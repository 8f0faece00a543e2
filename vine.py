"""VinePPO's credit assignment: reasoning steps, Monte Carlo (MC) state values, step advantages.

Paper: Kazemnejad et al., "VinePPO", arXiv:2410.01679, §4 (MC value estimation); the facts we follow are in
PAPER_NOTES.md §1.2, §1.3, §2 and §7 (pitfalls 1-5, 10, 12). For every sampled answer:

    split_steps        response text -> steps (character offsets)               §2.1 (GSM8K), §2.2 (MATH)
    token_steps        each response token -> the step of its first character   §1.3, §2.3
    answer_steps       both, for a batch of sampled answers
    estimate_values    V(s_k) = mean 0/1 reward of K continuations from s_k     §1.2
    step_advantages    A_i = r_i + V(s_{i+1}) - V(s_i), gamma 1, V(terminal) 0  §1.3
    full_values        V(s_0) .. V(s_n) of every step boundary, past the cap too   §1.3
    token_advantages   every token of step i carries A_i                        §7.5
    value_errors       how close values are to a reference (the value diagnostic) §5.3
    credit_record      what each step of an answer was credited with (train.py --log-samples)

Test: python -m pytest tests/test_vine.py -q

Departures from the paper's code (McGill-NLP/VinePPO):
  1. States live in token space: s_k = prompt_ids + response_ids[:t_k], t_k = the number of tokens whose first
     character lies in the first k steps (DESIGN.md: token ids are the truth). The official code re-tokenizes the text
     prompt + y[:idx[k]], so where one token spans a step end (".\n") its state ends before the "\n" and ours after it.
  2. GSM8K: a response with several "\n#### " is split at the first one (the official code fails to parse it and drops
     the answer). A response of blank lines only, with no answer line, is one step (the official code makes empty
     steps). Otherwise the steps are the official ones (all 8,792 GSM8K gold solutions checked).
  3. MATH: the splitter never raises. The official one asserts on inputs it cannot split (e.g. a response shorter than
     20 characters, or math nested in math such as $x$ inside \\begin{align}), and the trainer then drops the answer;
     here a lone short piece stays one step and nested math is restored inside out.
  4. MATH, long pieces: the official code keeps the pieces that follow a cut made inside math out of the prose split,
     but its bookkeeping mixes the coordinates of a piece and of its parent; we apply the rule as meant (the half
     after a math cut, and its parts, are never cut as prose). On the 12,500 MATH gold solutions ("\n" + solution +
     "\n") our steps equal the official splitter's on 12,480 (99.8%); the 20 others differ by this rule only.
  5. MC continuations come from rollout.sample (plain PyTorch with a shared prefix KV cache), not vLLM.

Letters: K rollouts per state, S steps per response, T tokens.
"""

import bisect
import itertools
import re
import statistics

import numpy as np
import torch

import reward
import rollout

# ---------------------------------------------------------------------------------------------------------------------
# Step splitting (PAPER_NOTES.md §2)

GSM8K_ANSWER_PREFIX = "\n#### "
# Math spans that must never be cut, in the order the official splitter hides them (§2.2 step 1); DOTALL.
MATH_PATTERNS = [
    r"\[asy\].*?\[/asy\]",
    r"\$\\begin\{tabular\}.*?\\end\{tabular\}\$",
    r"\\begin\{tabular\}.*?\\end\{tabular\}",
    r"\\\(.*?\\\)",
    r"\\\[.*?\\\]",
    r"\$\$.*?\$\$",
    r"(?<!\\)\$.*?[^\\]\$(?!\$)",  # inline $...$: at least one character, closing $ not escaped
    r"\\begin\{([^}]*)\}.*?\\end\{\1\}",
]
PLACEHOLDER = "<|math_{:051d}|>"  # 60 characters, as long as the official md5 placeholder: length rules see the same
PLACEHOLDER_RE = re.compile(r"<\|math_\d{51}\|>")
# A sentence ends at "." + whitespace + capital letter, unless the word before the dot has one or two letters ("e.g.").
SENTENCE_END_RE = re.compile(r"(?<!\b[A-Za-z]\.)(?<!\s[A-Za-z]\.)(?<!\s[A-Za-z][A-Za-z]\.)(?<=\.)(?=\s+[A-Z])")
MATH_PERIOD_ENDINGS = (".$", ".$$", ".\\)", ".\\]")  # a math span ending its sentence inside the math
MATH_OPENINGS_RE = re.compile(r"\$|\$\$|\\\(|\\\[|\\begin\{[^}]*\}|\[asy\]")
MAX_PIECE_LENGTH = 100
# (pattern, characters of the match kept in the first half): prose first, then math (§2.2 step 5)
LANGUAGE_CUTS = [(r",", 1), (r"\sand\s", 4), (r":", 1), (r"\sto\s", 3)]
MATH_CUTS = [(r",\$", 2), (r",\\\)", 3), (r",\\\]", 3), (r"=", 1), (r"\\equiv", 6), (r"\+", 1), (r"\\cancelto", 9)]


def split_steps(response: str, dataset: str) -> list[int]:
    """Ends of the reasoning steps as character offsets into response; the last one is len(response).

    Steps are response[prev_end:end] and concatenate back to response exactly. An empty response is one empty step,
    [0]; no other step is empty. gsm8k and arithmetic: one step per line (§2.1); math: sentences and lines (§2.2).
    Example (§2.1): "\\nA.\\nB.\\n#### 72\\n" -> [3, 15]: steps "\\nA." and "\\nB.\\n#### 72\\n"."""
    if dataset in ("gsm8k", "arithmetic"):
        pieces = split_lines(response)
    elif dataset == "math":
        pieces = split_math(response)
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    assert "".join(pieces) == response, "steps must concatenate back to the response"
    assert len(pieces) == 1 or all(pieces), "only an empty response may give an empty step"
    return list(itertools.accumulate(len(piece) for piece in pieces))


def split_lines(response: str) -> list[str]:
    """GSM8K steps (PAPER_NOTES.md §2.1): one step per line, each "\\n" at the START of the step it opens.

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


def hide_math(text: str) -> tuple[str, list[str]]:
    """Replace every math span by a 60-character placeholder (§2.2 step 1). Returns the text and the hidden spans;
    span k may itself hold placeholders of spans < k (math inside math), restore_math undoes them inside out."""
    spans = []
    for pattern in MATH_PATTERNS:
        pieces = []
        last = 0
        for match in re.finditer(pattern, text, flags=re.DOTALL):
            pieces += [text[last : match.start()], PLACEHOLDER.format(len(spans))]
            spans.append(match.group(0))
            last = match.end()
        text = "".join(pieces) + text[last:]
    return text, spans


def restore_math(text: str, spans: list[str]) -> str:
    """Undo hide_math in a piece of the hidden text: the newest placeholders first, since they may contain older."""
    for k in range(len(spans) - 1, -1, -1):
        placeholder = PLACEHOLDER.format(k)
        if placeholder in text:
            text = text.replace(placeholder, spans[k])
    return text


def split_sentences_and_lines(hidden: str) -> list[str]:
    """§2.2 step 2, on the math-hidden text: cut after a sentence-ending "." and before every "\\n". A lone "\\n"
    joins the next piece, and so does a piece shorter than 20 characters that does not end with "." (a math span
    counts 60 characters here, as in the official code)."""
    pieces = []
    for sentence in SENTENCE_END_RE.split(hidden):
        lines = sentence.split("\n")
        pieces += [lines[0]] + ["\n" + line for line in lines[1:]]
    i = 0
    while i < len(pieces) - 1:
        if pieces[i] == "\n" or (len(pieces[i]) < 20 and not pieces[i].endswith(".")):
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]  # merge forward, then look at the merged piece again
        else:
            i += 1
    return pieces


def split_after_math_periods(pieces: list[str], spans: list[str]) -> list[str]:
    """§2.2 step 3: also cut right after a math span whose text ends with a period inside it ("...x.$"); then a piece
    shorter than 20 characters (math restored) that does not end that way joins the next piece (the last one joins
    the previous piece)."""
    cut = []
    for piece in pieces:
        start = 0
        for match in PLACEHOLDER_RE.finditer(piece):
            if restore_math(match.group(0), spans).endswith(MATH_PERIOD_ENDINGS):
                cut.append(piece[start : match.end()])
                start = match.end()
        cut.append(piece[start:])
    i = 0
    while i < len(cut) - 1 or (i == len(cut) - 1 and i > 0):
        text = restore_math(cut[i], spans)
        if text.endswith(MATH_PERIOD_ENDINGS) or len(text) >= 20:
            i += 1
        elif i == len(cut) - 1:
            cut[i - 1 : i + 1] = [cut[i - 1] + cut[i]]  # the short last piece joins the previous one
            break
        else:
            cut[i : i + 2] = [cut[i] + cut[i + 1]]
    return cut


def split_math_lines(pieces: list[str], spans: list[str]) -> list[str]:
    """§2.2 step 4: restore the math and also cut before every "\\n" inside a math span (display blocks; the official
    code does it for every kind of span); then a piece that is only an opening delimiter ("$$", "\\[",
    "\\begin{align}", ...) or shorter than 3 characters joins the next piece (the last one joins the previous piece)."""
    cut = []
    for piece in pieces:
        text, starts, last = "", [0], 0
        for match in PLACEHOLDER_RE.finditer(piece):
            math = restore_math(match.group(0), spans)
            text += piece[last : match.start()]  # prose between top-level spans holds no placeholder
            starts += [len(text) + m.start() for m in re.finditer("\n", math)]
            text += math
            last = match.end()
        text += piece[last:]
        starts.append(len(text))
        cut += [text[a:b] for a, b in zip(starts[:-1], starts[1:])]
    i = 0
    while i < len(cut) - 1 or (i == len(cut) - 1 and i > 0):
        if not (MATH_OPENINGS_RE.fullmatch(cut[i].strip()) or len(cut[i]) < 3):
            i += 1
        elif i == len(cut) - 1:
            cut[i - 1 : i + 1] = [cut[i - 1] + cut[i]]  # the last piece joins the previous one
            break
        else:
            cut[i : i + 2] = [cut[i] + cut[i + 1]]  # merge forward, then look at the merged piece again
    return cut


def cut_near_middle(piece: str, cuts: list[tuple[str, int]], min_half: int, in_language: bool) -> list[str]:
    """One cut of an over-long piece (§2.2 step 5): for each pattern in order, take its match closest to the middle
    (the leftmost on a tie) and cut there if both halves have >= min_half characters; else try the next pattern.
    in_language: search the prose only (math hidden, distances measured in the hidden text). Returns 1 or 2 pieces."""
    text, spans = hide_math(piece) if in_language else (piece, [])
    for pattern, keep in cuts:
        positions = [m.start() + keep for m in re.finditer(pattern, text)]
        if not positions:
            continue
        _, best = min((abs(len(text) - 2 * p), p) for p in positions)
        halves = [restore_math(text[:best], spans), restore_math(text[best:], spans)]
        if min(len(halves[0]), len(halves[1])) >= min_half:
            return halves
    return [piece]


def break_long_piece(piece: str, starts_in_math: bool = False) -> list[str]:
    """§2.2 step 5: cut a piece longer than 100 characters near its middle, at "," / " and " / ":" / " to " if both
    halves keep >= 40 characters, else inside math at ",$" / "=" / "+" / ... with halves >= 20; recurse on halves.
    The half after a cut inside math starts in the middle of a formula, so it and its parts are never cut as prose
    (the official code's intent; see departure 4)."""
    if len(piece) <= MAX_PIECE_LENGTH:
        return [piece]
    if not starts_in_math:
        halves = cut_near_middle(piece, LANGUAGE_CUTS, min_half=40, in_language=True)
        if len(halves) == 2:
            return break_long_piece(halves[0]) + break_long_piece(halves[1])
    halves = cut_near_middle(piece, MATH_CUTS, min_half=20, in_language=False)
    if len(halves) == 1:
        return halves
    return break_long_piece(halves[0], starts_in_math) + break_long_piece(halves[1], starts_in_math=True)


def split_math(response: str) -> list[str]:
    """MATH steps (PAPER_NOTES.md §2.2, the official in-place splitter): sentences and lines, never cut inside math,
    short pieces merged forward, pieces over 100 characters cut near the middle.
    Example: "\\nWe have $x+2=5$, so $x=3$. Then $y = 2x = 6$.\\nTherefore, the answer is $\\boxed{6}$.\\n" ->
    ["\\nWe have $x+2=5$, so $x=3$.", " Then $y = 2x = 6$.\\nTherefore, the answer is $\\boxed{6}$.\\n"]
    (the 19-character sentence " Then $y = 2x = 6$." joins the next piece)."""
    hidden, spans = hide_math(response)
    pieces = split_sentences_and_lines(hidden)
    pieces = split_after_math_periods(pieces, spans)
    pieces = split_math_lines(pieces, spans)
    return [part for piece in pieces for part in break_long_piece(piece)]


# ---------------------------------------------------------------------------------------------------------------------
# Steps in token space (PAPER_NOTES.md §1.3, §2.3)


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
    (PAPER_NOTES.md §1.3), so a token such as ".\\n" that spans a step end belongs to the earlier step. Tokens with no
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
# Monte Carlo values (PAPER_NOTES.md §1.2)


def value_states(
    prompt_ids: list[list[int]], response_ids: list[list[int]], token_steps: list[list[int]], gold_answers: list[str],
    max_value_steps: int | None,
) -> tuple[list[tuple], list[list[int]], list[int]]:
    """The states to value, deduplicated (PAPER_NOTES.md §1.2, §7.4). Answer i with n steps (steps that own tokens:
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
    """V(s) = (1/K) sum_k R(prefix + continuation_k) for every state (PAPER_NOTES.md §1.2). Each continuation is
    graded on the WHOLE solution, the answer's earlier steps plus the continuation (§7.2); one that hit the length
    limit scores 0 (the unfinished penalty). Continuations of state u are rows u*K .. u*K + K - 1."""
    values = []
    for u, (_, prefix, gold) in enumerate(states):
        score = 0.0
        for row in range(u * num_mc_rollouts, (u + 1) * num_mc_rollouts):
            if rollouts.finished[row]:
                text = tokenizer.decode(list(prefix) + rollouts.response_ids[row], **rollout.DECODE_KWARGS)
                score += reward.grade(text, gold, dataset)
        values.append(score / num_mc_rollouts)
    return values


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
    """MC value of every step state of every answer (PAPER_NOTES.md §1.2): values[i] = [V(s_0), ..., V(s_m)].

    Answers of one prompt repeat its prompt_ids. Identical states are valued once (the bare prompt once per prompt,
    §7.4), then K = num_mc_rollouts continuations of every unique state come from ONE rollout.sample call, which
    shares each prefix's KV cache among its K rows and slices nested prefixes from one pass. Pass the policy and
    the rollout.Sampling that sampled the answers (T, top_p, max_new_tokens, max_length, stop strings; §7.1), so
    that the values are on-policy for pi_old.
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
# Advantages (PAPER_NOTES.md §1.3)


def step_advantages(values: list[float], reward: float, num_steps: int) -> list[float]:
    """A_i = r_i + V(s_{i+1}) - V(s_i) for the n = num_steps steps of one answer (gamma = 1, no GAE; §1.3).

    r_i = 0 for i < n - 1 and r_{n-1} = R (the answer's 0/1 reward); V from full_values. Inner steps:
    V(s_{i+1}) - V(s_i); the last step: R - V(s_{n-1}); a one-step answer: R - V(s_0)."""
    rewards = [0.0] * (num_steps - 1) + [reward]
    full = full_values(values, reward, num_steps)
    return [rewards[i] + full[i + 1] - full[i] for i in range(num_steps)]


def full_values(values: list[float], reward: float, num_steps: int) -> list[float]:
    """[V(s_0) .. V(s_n)] of an answer with n = num_steps steps: values = [V(s_0) .. V(s_m)], m <= n - 1, are the MC
    estimates; V(s_n) = 0 (terminal); the states past the cap (--max-value-steps) are filled backwards,
    V_i = r_i + V_{i+1} = R, so their steps get A = 0 and the last valued state's step gets R - V(s_m) (§1.3)."""
    assert 1 <= len(values) <= num_steps, f"need 1 .. {num_steps} values, got {len(values)}"
    return list(values) + [reward] * (num_steps - len(values)) + [0.0]


def token_advantages(step_advs: list[float], token_steps: list[int]) -> list[float]:
    """Every token of step i carries A_i (PAPER_NOTES.md §7.5). The EOS (not in token_steps) takes the last step's."""
    return [step_advs[s] for s in token_steps]


def value_errors(estimates: list[list[float]], reference: list[list[float]], prefix: str) -> dict:
    """How well per-answer state values match reference values (paper §5.3; train.py's --value-diagnostic): the mean
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


# ---------------------------------------------------------------------------------------------------------------------
# The credit view (train.py --log-samples, benchmarks/show_credit.py)


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
