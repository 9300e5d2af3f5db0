"""Scale-out under torchrun: which rank this process is, the process group, and the few collectives
the pipeline needs (a barrier, sums across ranks, each rank's share of a range).

A plain `python script.py` never touches torch.distributed: rank 0 of a world of 1, every helper
a no-op, so the single-process commands run exactly as before. Under `torchrun` (which sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous) the group is NCCL on GPUs, Gloo on CPUs.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=30)  # a rank waiting this long at a barrier means another one died


def launched():
    """True under torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device):
    """Join the process group once (idempotent); a no-op outside torchrun."""
    if not launched() or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)


def rank():
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size():
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values, device):
    """Elementwise sum of a list of floats over all ranks (float64, so sums of losses stay exact)."""
    if not dist.is_initialized():
        return list(values)
    # Gloo reduces CPU tensors, NCCL CUDA ones; float64 on CUDA is fine for a handful of numbers.
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flags):
    """Each flag, set on any rank: how the ranks agree on the step to stop or checkpoint at (one stopping
    alone would leave the others waiting in DDP's all-reduce)."""
    if not dist.is_initialized():
        return [bool(flag) for flag in flags]
    t = torch.tensor([int(bool(flag)) for flag in flags], dtype=torch.int64)
    dist.all_reduce(t, group=_control_group())
    return [bool(value) for value in t.tolist()]


def gather(obj):
    """Every rank's `obj` (picklable CPU values), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control_group())
    return out


_control = {}


def _control_group():
    """The group for `any_rank` and `gather`: Gloo, beside NCCL too. Asked after every step, a flag on the GPU
    would make the CPU wait for the GPU's queue each time."""
    if dist.get_backend() == "gloo":
        return None  # the default group
    if "group" not in _control:
        _control["group"] = dist.new_group(backend="gloo")
    return _control["group"]


def share(n, rank, world, unit=1):
    """[start, stop) of rank's contiguous share of n items, in whole units (batches) of `unit`:
    shares as equal as units allow, the first ones larger by a unit."""
    units = -(-n // unit)
    first = rank * (units // world) + min(rank, units % world)
    last = first + units // world + (rank < units % world)
    return min(first * unit, n), min(last * unit, n)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()
    _control.clear()
