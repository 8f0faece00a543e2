"""Continuous batching for rollout.sample: which rows decode at each step, and which blocks of the KV cache hold what.
vLLM's design (the paper's sampler) in plain Python, with no departure of its own.

The host's side of the engine; it reads no tensor. A sample call has prefixes, K rows each (row b continues prefix
b // K), and every prefix belongs to a root: the longest prefix of the call that starts with it. The KV cache
(attention.BlockCache) is a pool of blocks of `block` tokens:

    roots      wait in a queue, longest first. admit() takes the next ones while their blocks, and the blocks their
               rows and the decoding rows are expected to fill (expected_length), fit in the free ones. A root's
               rows draw a first token from its prefill, then decode; its blocks are freed when no row of it decodes.
    rows       get a block of their own for every `block` tokens they feed (step_inputs), and free them at the end.
    preempt    a row that needs a block when none is free takes the blocks of the newest decoding row, which keeps
               its tokens and waits at the front of the queue as a root of its own (its prefix and tokens so far),
               prefilled again when it returns: vLLM's preemption by recomputation. Its draws do not change
               (rollout.uniforms).

So the batch stays as full as the memory allows until the work runs out. step_inputs() lays out each decoding step
as integer arrays for attention.Step: the fed tokens and their positions, where their keys and values go, the live
roots' blocks, the rows grouped by root, and every (row, block) pair.

Test: python -m pytest tests/test_rollout.py -q -k "schedul or preempt or refill". This file imports no project file.
"""

import collections
import itertools

import numpy as np

# Admission expects each row to draw as many more tokens as rows draw on average (expected_new_tokens), counting a
# first guess of PRIOR_FRACTION x the limit as PRIOR_ROWS rows (forgotten after a few rows finish). Rows that grow past
# that find the pool full now and then, and a row is preempted.
PRIOR_FRACTION, PRIOR_ROWS = 0.25, 4
# At most this many rows decode at once (vLLM's max_num_seqs): a step's logits and top-p buffers are ~40 bytes per row
# and vocabulary entry, 1.3 GB at 1,024 rows of a 32k vocabulary.
MAX_ROWS = 1024
# Waiting roots join when they bring at least this fraction of the decoding rows (or end the queue).
REFILL = 0.125


class Scheduler:
    """Rows, roots and blocks of one sample call (module docstring). tokens[b]: row b's sampled tokens so far;
    finished[b], eos[b]: how it stopped (rollout.record)."""

    def __init__(self, prefixes: list[list[int]], roots: list[int], num_samples: int, limits: list[int],
                 num_blocks: int, block: int):
        self.k, self.block, self.limits = num_samples, block, limits
        self.root_tokens, self.rows_of = {}, collections.defaultdict(list)  # root -> its tokens; its rows to run
        self.prefix_len = {}  # row -> the tokens of its root it continues (its prefix, or all of a row's own root)
        for i, r in enumerate(roots):
            if limits[i] > 0:  # no room to generate: an empty response
                self.root_tokens[r] = list(prefixes[r])
                self.rows_of[r] += range(i * num_samples, (i + 1) * num_samples)
                self.prefix_len.update(dict.fromkeys(range(i * num_samples, (i + 1) * num_samples), len(prefixes[i])))
        self.waiting = collections.deque(sorted(self.root_tokens, key=lambda r: -len(self.root_tokens[r])))
        self.new_root_ids = itertools.count(len(prefixes))  # ids of the roots that preempted rows become
        self.free = list(range(num_blocks - 1, 0, -1))  # block 0 is scratch (attention.py)
        self.live_roots, self.root_blocks = [], {}  # admitted roots, oldest first, and their blocks
        self.gathered, self.gathered_blocks = [], []  # the roots attention holds gathered (the live ones when it
        self.roots_version = 0  # gathered them, last admission) and their blocks; attention.Step.roots_version
        self.fresh = []  # blocks rows took for the next step (attention zeroes them)
        self.live, self.fed, self.root_of, self.blocks = [], [], {}, {}  # decoding rows (grouped by root), this
        # step's rows, each row's root and blocks
        num_rows = len(prefixes) * num_samples
        self.tokens = [[] for _ in range(num_rows)]
        self.finished, self.eos = [False] * num_rows, [None] * num_rows
        self.base = np.zeros(num_rows, dtype=np.int64)  # tokens of each row held in its root (a preempted row's)
        self.preempted = 0
        prior = PRIOR_FRACTION * sum(limits) / max(len(limits), 1)
        self.ended_rows, self.ended_tokens = PRIOR_ROWS, PRIOR_ROWS * prior  # rows that stopped, and their tokens

    def blocks_for(self, tokens: float) -> int:
        return -(-int(tokens) // self.block)

    def admit(self) -> list[int]:
        """Take roots from the front of the queue while their blocks, and the blocks their rows and the decoding rows
        are expected to add (expected_new_tokens each, within its limit), fit in the free ones, and at most MAX_ROWS
        rows decode. They join in batches: when nothing decodes (the first root always: rollout.sample sizes the
        pool to hold any one root with all its rows), or when they bring REFILL x the decoding rows or end the
        queue, so that one prefill pass and one gathering of the roots serve many rows."""
        mean = self.expected_new_tokens()
        more = lambda b: self.blocks_for(min(mean, self.limits[b // self.k] - len(self.tokens[b])))  # noqa: E731
        needed, rows, fit = sum(more(b) for b in self.live), 0, []
        for root in self.waiting:
            needed += self.blocks_for(len(self.root_tokens[root])) + sum(more(b) for b in self.rows_of[root])
            if (self.live or fit) and (needed > len(self.free) or len(self.live) + rows + len(self.rows_of[root]) >
                                       MAX_ROWS):
                break
            fit.append(root)
            rows += len(self.rows_of[root])
        if self.live and len(fit) < len(self.waiting) and rows < REFILL * len(self.live):
            return []  # wait until more rows have ended
        for root in fit:
            self.waiting.popleft()
            self.root_blocks[root] = [self.free.pop() for _ in range(self.blocks_for(len(self.root_tokens[root])))]
            self.live_roots.append(root)
            self.root_of.update(dict.fromkeys(self.rows_of[root], root))
        return fit

    def expected_new_tokens(self) -> float:
        """How many more tokens a row is expected to draw: the mean length of a geometric (memoryless) length
        distribution, estimated with the rows still decoding counted as censored (maximum likelihood: all tokens
        drawn / rows ended, PRIOR_ROWS rows of PRIOR_FRACTION x the limits counted in). Early in a call, when only
        the short rows have ended, it is large rather than small."""
        drawn = self.ended_tokens + sum(len(self.tokens[b]) for b in self.live)
        return drawn / self.ended_rows

    def new_rows(self, admitted: list[int]) -> tuple[list[list[int]], list[tuple[int, int]], list[int]]:
        """For the prefill of the admitted roots: their tokens, each wanted logit's (root index, prefix length), and
        the row that draws its next token from it (in the order of self.rows_of)."""
        ends = [(k, self.prefix_len[b]) for k, r in enumerate(admitted) for b in self.rows_of[r]]
        return [self.root_tokens[r] for r in admitted], ends, [b for r in admitted for b in self.rows_of.pop(r)]

    def step_inputs(self) -> dict[str, np.ndarray] | None:
        """Give each decoding row the block its fed token (its last sampled one) needs, preempting the newest rows
        while none is free. Returns the step's arrays (layout), or None when no row decodes."""
        self.fresh = []
        for row in list(self.live):
            own = len(self.tokens[row]) - 1 - self.base[row]  # the fed token's index among the row's own
            if own % self.block == 0 and row in self.root_of:  # it opens a block (preempt may have taken the row)
                while not self.free and row in self.root_of:
                    self.preempt(self.live[-1])
                if row in self.root_of:
                    self.blocks.setdefault(row, []).append(self.free.pop())
                    self.fresh.append(self.blocks[row][-1])
        self.fed = list(self.live)
        return self.layout() if self.live else None

    def layout(self) -> dict[str, np.ndarray]:
        """One decoding step as int64 arrays named as attention.Step's fields (with grid_len and pair_count, from
        which it makes its masks). The roots are those attention holds gathered (regathered after an admission;
        a root that ended since keeps its place, with no row). The rows of a root are contiguous in self.live
        (admitted together, removed in order)."""
        live, block = self.live, self.block
        if not set(self.live_roots) <= set(self.gathered):  # a root was admitted: attention gathers them again
            self.gathered, self.roots_version = list(self.live_roots), self.roots_version + 1
            widest = max(len(self.root_blocks[r]) for r in self.gathered)
            self.gathered_blocks = [self.root_blocks[r] + [0] * (widest - len(self.root_blocks[r]))
                                    for r in self.gathered]
        own = np.array([len(self.tokens[b]) - 1 for b in live]) - self.base[live]  # (B,) fed token among the row's own
        prefix_len = np.array([self.prefix_len[b] for b in live])  # (B,)
        root_pos = {r: n for n, r in enumerate(self.gathered)}
        row_root = np.array([root_pos[self.root_of[b]] for b in live])  # (B,)
        counts = np.bincount(row_root, minlength=len(self.gathered))  # (R,) rows per gathered root
        width = int(counts.max())  # N
        grid_slot = row_root * width + np.arange(len(live)) - (np.cumsum(counts) - counts)[row_root]
        grid_len = np.zeros(len(self.gathered) * width, dtype=np.int64)  # padded grid rows see nothing
        grid_len[grid_slot] = prefix_len
        num_blocks = own // block + 1  # (B,) blocks each row reads, the last one partly written
        pair_count = np.full(int(num_blocks.sum()), block)
        pair_count[np.cumsum(num_blocks) - 1] = own % block + 1
        return dict(
            tokens=np.array([self.tokens[b][-1] for b in live]), positions=prefix_len + own,
            write_block=np.array([self.blocks[b][i // block] for b, i in zip(live, own)]), write_slot=own % block,
            root_blocks=np.array(self.gathered_blocks), grid_slot=grid_slot,
            grid_len=grid_len.reshape(len(self.gathered), width), pair_row=np.repeat(np.arange(len(live)), num_blocks),
            pair_count=pair_count, pair_block=np.concatenate([self.blocks[b][:n] for b, n in zip(live, num_blocks)]),
            fresh_blocks=np.array(self.fresh, dtype=np.int64),
        )

    def preempt(self, row: int) -> None:
        """Row gives its blocks back (and its root's, if no other row of it decodes) and waits at the front of the
        queue as a root of its own, its prefix and all its tokens: that root's prefill gives its next draw."""
        root = self.root_of.pop(row)
        own_root = next(self.new_root_ids)
        self.root_tokens[own_root] = self.root_tokens[root][: self.prefix_len[row]] + self.tokens[row][self.base[row]:]
        self.rows_of[own_root] = [row]
        self.base[row], self.prefix_len[row] = len(self.tokens[row]), len(self.root_tokens[own_root])
        self.free += self.blocks.pop(row, [])
        self.live.remove(row)
        self.retire([root])
        self.waiting.appendleft(own_root)
        self.preempted += 1

    def update(self, stopped: list[int], new_rows: list[int]) -> None:
        """After a step's tokens are recorded: the rows that stopped, whose blocks are freed (and their root's once no
        row of it decodes), and the newly admitted rows, which decode from now on."""
        for row in stopped:
            self.free += self.blocks.pop(row, [])
        self.ended_rows += len(stopped)
        self.ended_tokens += sum(len(self.tokens[b]) for b in stopped)
        roots = {self.root_of.pop(b) for b in stopped}
        self.live = [b for b in self.live + new_rows if b in self.root_of]
        self.retire(roots)

    def retire(self, roots) -> None:
        """Free the blocks of those of roots that no row decodes any more."""
        alive = {self.root_of[b] for b in self.live}
        for root in set(roots) - alive:
            self.live_roots.remove(root)
            self.free += self.root_blocks.pop(root)
            del self.root_tokens[root]
