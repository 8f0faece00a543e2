"""Plumbing: data parallelism under torchrun. Safe to skip on a first read: in one process (python train.py) every
function here is the identity or does nothing.

    torchrun --nproc_per_node 4 train.py --dataset gsm8k      # 4 GPUs, NCCL; on CPU: gloo (tests/test_distributed.py)

What it guarantees, and how train.py uses it (docs/torchrun.md has the measurements):
- Each rank (process) takes an equal, contiguous share of the iteration's prompts (shard), samples their answers and
  values their step states on its own device, from its own random stream (rank_seed). The official code shards the
  prompts the same way (docs/paper.md §1.1 step 1).
- The update is the one-process update: the ranks exchange their episodes (gather_list), so every rank whitens the
  advantages and normalises the loss over the whole minibatch; each backpropagates its share of every minibatch and
  sum_gradients adds the gradients up before clipping and the AdamW step. So the weights stay equal on every rank,
  and 2 ranks give one process's gradients, statistics and weights within float noise (a test checks 1e-5).
- same_generator gives every rank rank 0's generator, so the update's minibatch shuffles agree; combine_logs makes
  one log line of every rank's; any_rank lets a Ctrl-C on one rank stop every rank at the same point.

Departure from the paper's code: the official code also pools the MC value requests of all ranks and re-shards them
for balance (docs/paper.md §6); here a rank whose answers have more steps finishes later and the others wait.
DeepSpeed overlaps the gradient reduction with the backward pass; sum_gradients runs after it, in flat buckets.
This file imports no project file; only train.py imports it.
"""

import contextlib
import datetime
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

# Ranks wait for rank 0 while it makes run_dir/init (SFT can take hours), so collectives wait long before failing.
TIMEOUT = datetime.timedelta(hours=6)
# rank r draws from seed + RANK_SEED_OFFSET * r (rank_seed): far apart, so the ranks' streams never meet
RANK_SEED_OFFSET = 1_000_000_007
# sum_gradients all-reduces the gradients in flat buckets of at most this many elements (400 MB in float32): one call
# per bucket instead of one per parameter tensor, and a bounded extra copy.
GRADIENT_BUCKET = 10**8


def init(device: str) -> str:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): NCCL on CUDA with one GPU per rank
    (LOCAL_RANK), gloo on CPU. Only rank 0 prints (the others' stdout goes to /dev/null; errors still show).
    Returns this rank's device ("cuda:LOCAL_RANK" on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str):
    """init on entry (yields this rank's device), close on exit, whatever ends the run."""
    try:
        yield init(device)
    finally:
        close()


def world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless launched by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    """Rank 0: the process that prints, logs and saves."""
    return world()[0] == 0


def rank_seed(seed: int) -> int:
    """The seed of this rank's own random stream: seed itself on rank 0, so one process draws what it always drew."""
    return seed + RANK_SEED_OFFSET * world()[0]


def shard_bounds(n: int) -> tuple[int, int]:
    """[first, last) of this rank's contiguous share of n items; shares differ in length by at most one and, in
    rank order, make up all n (so gather_list(shard(items)) == items)."""
    rank, size = world()
    return rank * n // size, (rank + 1) * n // size


def shard(items: list) -> list:
    first, last = shard_bounds(len(items))
    return items[first:last]


def gather_list(items: list) -> list:
    """The concatenation of every rank's items, in rank order (pickled: token ids, rewards, small tensors)."""
    rank, size = world()
    if size == 1:
        return list(items)
    everyone = [None] * size
    dist.all_gather_object(everyone, list(items))
    return [item for part in everyone for item in part]


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (a Ctrl-C on one rank stops them all at the same point)."""
    return any(gather_list([bool(flag)]))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_gradients(model) -> None:
    """Sum every gradient over the ranks (a parameter that got none on a rank counts as 0). Each rank's loss is
    already divided by the WHOLE minibatch's token and sequence counts, so the sum is exactly the gradient one
    process computes on the whole minibatch. The gradients travel in flat buckets, after the backward pass (DDP
    also overlaps them with it)."""
    if world()[1] == 1:
        return
    grads = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    while grads:
        bucket, size = [], 0
        while grads and (not bucket or size + grads[0].numel() <= GRADIENT_BUCKET):
            size += grads[0].numel()
            bucket.append(grads.pop(0))
        flat = torch.cat([g.flatten() for g in bucket])
        dist.all_reduce(flat)
        for g, summed in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(summed.view_as(g))


def same_generator(generator: torch.Generator) -> None:
    """Give every rank rank 0's generator state, so the update's shuffles agree everywhere."""
    if world()[1] > 1:
        generator.set_state(gather_list([generator.get_state()])[0])


def combine_logs(log: dict, summed_keys: set[str]) -> dict:
    """One log for the iteration from every rank's: the counts (summed_keys) summed, values equal on every rank
    kept, times (keys "time/...") maxed (the slowest rank's), the rest averaged (every rank has the same number of
    answers, so the mean of the ranks' means is the mean over all answers)."""
    if world()[1] == 1:
        return log
    logs = gather_list([log])
    combined = {}
    for key in log:
        values = [one[key] for one in logs]
        if key in summed_keys:
            combined[key] = sum(values)
        elif all(v == values[0] for v in values):  # the same on every rank (evaluation, the update's stats)
            combined[key] = values[0]
        elif key.startswith("time/"):
            combined[key] = max(values)
        else:
            combined[key] = float(np.mean(values))
    return combined
