"""Plumbing: torchrun, and the policy, critic and reference sharded with PyTorch's FSDP2. Safe to skip on a first read:
in one process (python train.py) every function here is the identity or does nothing.

    torchrun --nproc_per_node 8 train.py --dataset gsm8k      # 8 GPUs, NCCL; on CPU: gloo (tests/test_distributed.py)

What it guarantees, and how train.py uses it (docs/torchrun.md has the memory per GPU and the measurements):
- Each rank (process) takes an equal, contiguous share of the iteration's prompts (shard), samples their answers and
  values their step states on its own device, from its own random stream (rank_seed). The official code shards the
  prompts the same way (docs/paper.md §1.1 step 1).
- The models are sharded (shard_model: torch.distributed.fsdp.fully_shard on every decoder layer and at the root):
  each rank holds 1/N of the float32 weights, of their gradients and of AdamW's moments, and of the reference. On
  CUDA with --bf16 the layers are gathered in bf16 and their gradients reduced in float32 (mixed_precision).
- Sampling, the MC rollouts, evaluation and the old/reference logprobs run on full weights (full_weights: every
  FSDP module gathered once, kept gathered for the block, then freed), so no collective runs inside rollout.sample
  and ranks may sample different lengths.
- The update is the one-process update: the ranks exchange their episodes (gather_list), so every rank whitens the
  advantages and normalises the loss over the whole minibatch, and backpropagates its share of it. FSDP2 reduces
  the gradients (a sum, set on every FSDP module: each rank's loss is already divided by the whole minibatch's
  counts) and every rank runs as many forward and backward passes (micro_batch_passes: a rank with a shorter share
  runs zero-loss passes), since each pass gathers and reduces. So 2 ranks give one process's gradients, statistics
  and weights within float noise (a test checks 1e-5).
- Checkpoints stay Hugging Face folders: full_state_dict gathers the weights on rank 0, which saves them, and
  full_optimizer_state the AdamW state, which load_optimizer_state broadcasts back on --resume.
- A rank that dies or raises leaves the others waiting in a collective: they stop with an error after --dist-timeout
  seconds (torchrun also ends them when it sees the first one exit). Only the wait for rank 0 while it makes
  run_dir/init (SFT can take hours) has a long timeout (wait_for_rank0).

Departure from the paper's code: the official code also pools the MC value requests of all ranks and re-shards them
for balance (docs/paper.md §6); here a rank whose answers have more steps finishes later and the others wait. The
paper's 7B runs use DeepSpeed ZeRO stage 2 (the optimizer state and gradients sharded, every rank holding the
weights); FSDP2 also shards the weights (ZeRO stage 3) and gathers them layer by layer in the update.
This file imports no project file; only train.py imports it.
"""

import contextlib
import datetime
import functools
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

# The other ranks wait for rank 0 while it makes run_dir/init (SFT can take hours): that one wait may be long.
INIT_WAIT = datetime.timedelta(hours=6)
# rank r draws from seed + RANK_SEED_OFFSET * r (rank_seed): far apart, so the ranks' streams never meet
RANK_SEED_OFFSET = 1_000_000_007
# gathered state dicts go to rank 0's CPU memory (the whole model and its AdamW state: 16 bytes per parameter)
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
LONG_GROUP = None  # a gloo group with INIT_WAIT as its timeout, for wait_for_rank0 (init)


def init(device: str, timeout_seconds: float) -> str:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): NCCL on CUDA with one GPU per rank
    (LOCAL_RANK), gloo on CPU, every collective failing after timeout_seconds. Only rank 0 prints (the others' stdout
    goes to /dev/null; errors still show). Returns this rank's device ("cuda:LOCAL_RANK" on CUDA)."""
    global LONG_GROUP
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
    LONG_GROUP = dist.new_group(backend="gloo", timeout=INIT_WAIT)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str, timeout_seconds: float):
    """init on entry (yields this rank's device), close on exit, whatever ends the run."""
    try:
        yield init(device, timeout_seconds)
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


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wait_for_rank0() -> None:
    """A barrier that waits up to INIT_WAIT: the other ranks wait here while rank 0 makes run_dir/init."""
    if dist.is_initialized():
        dist.barrier(group=LONG_GROUP)


# ---------------------------------------------------------------------------------------------------------------------
# Shares of the work


def shard_bounds(n: int) -> tuple[int, int]:
    """[first, last) of this rank's contiguous share of n items; shares differ in length by at most one and, in
    rank order, make up all n (so gather_list(shard(items)) == items)."""
    rank, size = world()
    return rank * n // size, (rank + 1) * n // size


def shard(items: list) -> list:
    first, last = shard_bounds(len(items))
    return items[first:last]


def micro_batch_passes(n: int, micro_batch_size: int) -> int:
    """The forward and backward passes every rank runs over a minibatch of n episodes: as many as the longest share,
    ceil(n / N), needs in micro-batches (one process: ceil(n / micro_batch_size))."""
    return math.ceil(math.ceil(n / world()[1]) / micro_batch_size)


def micro_batches(n: int, size: int):
    """This rank's micro-batches of a minibatch of n episodes, as (rows, loss scale): its share (shard_bounds) in
    ranges of at most size rows. Every rank runs as many passes as the longest share needs, since each pass gathers
    and reduces: a shorter share ends with zero-loss passes of row 0, (range(1), 0.0). One process: all n, scale 1."""
    first, last = shard_bounds(n)
    for k in range(micro_batch_passes(n, size)):
        rows = range(first + k * size, min(first + (k + 1) * size, last))
        yield (rows, 1.0) if rows else (range(1), 0.0)


def combine_stats(stats: dict, combine) -> dict:
    """Every rank's stats of one minibatch combined (combine: ppo.accumulate_stats), the same on every rank."""
    if world()[1] == 1:
        return stats
    return functools.reduce(combine, gather_list([stats]), {})


def share_fields(items: list, mine: list, fields: tuple[str, ...]) -> None:
    """Give every rank the fields each rank set on its share of items (mine = shard(items))."""
    if world()[1] == 1:
        return
    for item, values in zip(items, gather_list([tuple(getattr(x, f) for f in fields) for x in mine]), strict=True):
        for f, value in zip(fields, values):
            setattr(item, f, value)


def gather_list(items: list) -> list:
    """The concatenation of every rank's items, in rank order (pickled: token ids, rewards, small tensors)."""
    rank, size = world()
    if size == 1:
        return list(items)
    everyone = [None] * size
    dist.all_gather_object(everyone, list(items))
    return [item for part in everyone for item in part]


def check_same_options(options: dict) -> None:
    """Stop in one line if another rank was given other options (a torchrun command with rank-specific arguments):
    the ranks would shard, draw and step differently. The device is each rank's own."""
    if world()[1] == 1:
        return
    everyone = gather_list([{k: v for k, v in options.items() if k != "device"}])
    differ = sorted({k for other in everyone[1:] for k in everyone[0] if other.get(k) != everyone[0][k]})
    if differ:
        names = ", ".join("--" + k.replace("_", "-") for k in differ)
        raise SystemExit(f"error: the ranks were given different options ({names}); give every rank the same command")


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (a Ctrl-C on one rank stops them all at the same point)."""
    return any(gather_list([bool(flag)]))


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


# ---------------------------------------------------------------------------------------------------------------------
# FSDP2: sharded models, full weights for sampling, gathered state for checkpoints


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model (or of a module holding one, such as the critic): the modules
    whose class the model lists in _no_split_modules (LlamaDecoderLayer, Qwen2DecoderLayer, ...)."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if type(m).__name__ in names]


def mixed_precision(device: str, bf16: bool) -> MixedPrecisionPolicy:
    """The decoder layers' FSDP2 precision: on CUDA with --bf16, gathered in bf16 (half the all-gather bytes, and no
    per-step cast in sampling) with gradients reduced in float32; else FSDP2's default, no cast (CPU: the gloo
    tests, where 2 ranks equal one process)."""
    if bf16 and device.startswith("cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: torch.nn.Module, device: str, bf16: bool = False) -> torch.nn.Module:
    """One process: model on device. Several: FSDP2 (fully_shard) on every decoder layer (mixed_precision), then at
    the root for the rest (embeddings, final norm, heads: float32, so the logits stay float32), which moves this
    rank's shard to its device. Every FSDP module reduces gradients as a sum over the ranks (gloo has no pre-scaled
    sum, and the default would average): set on the root only, the layers would still average (measured: grad norm
    1.808 instead of 2.146)."""
    if world()[1] == 1:
        return model.to(device)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mixed_precision(device, bf16))
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
    return model


def fsdp_modules(*models) -> list[FSDPModule]:
    return [m for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(*models):
    """Inside the block the models' weights are whole on every rank (one all-gather per FSDP module on entry, freed on
    exit), so their forward passes run no collective: rollout.sample, evaluation and the logprobs may run different
    numbers of steps on different ranks. Costs the unsharded weights' memory for the block. One process: nothing."""
    modules, roots = fsdp_modules(*models), [model for model in models if isinstance(model, FSDPModule)]
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:  # FSDP2's defaults again: a root keeps its weights after forward, the layers do not
            module.set_reshard_after_forward(not any(module is root for root in roots), recurse=False)
            module.reshard()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ over every rank's gradient shards; returns the global norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def all_finite(model: torch.nn.Module) -> bool:
    """Are all weights finite, on every rank's shard?"""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return not any_rank(not all(bool(torch.isfinite(p).all()) for p in local))


def full_state_dict(model: torch.nn.Module) -> dict | None:
    """The whole model's state dict on rank 0's CPU ({} on the others; every rank must call it); None in one process,
    where model.state_dict() is the whole one."""
    if not fsdp_modules(model):
        return None
    return get_model_state_dict(model, options=FULL_STATE)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict(), whole on rank 0 (keyed by parameter name under FSDP2; every rank must call it)."""
    if not fsdp_modules(model):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=FULL_STATE)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what full_optimizer_state gave (rank 0's copy is broadcast, each rank keeping its shard)."""
    if not fsdp_modules(model):
        optimizer.load_state_dict(state)
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, state if is_main() else {}, options=options)
