"""Training input from the feature cache: a split in memory or streamed from HDF5, shuffled into batches,
and under torchrun shared among the ranks so that the global batch is the single-process one."""

import itertools

import h5py
import numpy as np
import torch

from inversion.core import distributed, feature_cache, host, seeds
from inversion.core.errors import UserError


def inputs(cache, split, layer, in_memory, device):
    """The split's (features, images): in memory (on the GPU if room, else numpy arrays, which gather rows
    faster than CPU tensors do) or, when they do not fit, the HDF5 datasets."""
    x, y = cache[split][layer], cache[split]["images"]
    nbytes = x.size * x.dtype.itemsize + y.size
    if in_memory == "auto":
        in_memory = nbytes < 0.5 * host.available_ram()
    if not in_memory:
        return x, y
    x, y = x[()], y[()]
    if device.type == "cuda" and nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    return x, y


def is_streamed(x):
    return isinstance(x, h5py.Dataset)


def batches(x, y, batch, rng, buffer, device, skip=0):
    """Shuffled training batches (x, y, size of the global batch): an index permutation in memory, a
    shuffle buffer from HDF5. Under torchrun every rank draws the same permutation and takes its
    contiguous share of each batch, so the global batch is the single-process one; streamed, each rank
    reads its own blocks (batch / world samples a step: results then depend on the world size).
    `skip`: the first batches of the same order are left out (an epoch resumed mid-way); streamed, their
    blocks are still read, since the shuffle buffer's order depends on what it held."""
    rank, world = distributed.rank(), distributed.world_size()
    if isinstance(x, torch.Tensor):  # already on the GPU
        order = torch.from_numpy(rng.permutation(len(x))).to(x.device)
        for start in range(skip * batch, len(x), batch):
            idx = order[start:start + batch]
            mine = idx[slice(*distributed.share(len(idx), rank, world))]
            yield x[mine], y[mine], len(idx)
    elif isinstance(x, np.ndarray):
        order = rng.permutation(len(x))
        for start in range(skip * batch, len(x), batch):
            idx = order[start:start + batch]
            mine = np.sort(idx[slice(*distributed.share(len(idx), rank, world))])  # friendlier memory access
            yield torch.from_numpy(x[mine]).to(device), torch.from_numpy(y[mine]).to(device), len(idx)
    else:
        streamed = stream(x, y, max(1, batch // world), buffer, rng, rank, world)
        for bx, by in itertools.islice(streamed, skip, None):
            yield torch.from_numpy(bx).to(device), torch.from_numpy(by).to(device), len(bx) * world


def ordered(x, y, batch, device, begin=0, end=None):
    """Rows [begin, end) in order, `batch` at a time, on the device: evaluation's input."""
    end = len(x) if end is None else end
    for start in range(begin, end, batch):
        stop = min(start + batch, end)
        yield torch.as_tensor(x[start:stop]).to(device), torch.as_tensor(y[start:stop]).to(device)


def hold_out(x, y, fraction, seed):
    """((train x, y), (held-out x, y)): a seeded `fraction` of the training split, the same images for
    every layer, to tune training on without touching the eval split."""
    if is_streamed(x):
        raise UserError("train.holdout needs the training split in memory: set train.in_memory=true "
                        "(or a smaller split)")
    order = np.random.default_rng(seeds.derive_seed(seed, "holdout", 0)).permutation(len(x))
    n = round(fraction * len(x))
    held, kept = np.sort(order[:n]), np.sort(order[n:])
    if isinstance(x, torch.Tensor):
        held, kept = torch.from_numpy(held).to(x.device), torch.from_numpy(kept).to(x.device)
    return (x[kept], y[kept]), (x[held], y[held])


def stream(x, y, batch_size, buffer_size, rng, rank=0, world=1):
    """Batches (x, y) from HDF5 in shuffled contiguous blocks, mixed in a shuffle buffer.

    Reads blocks of an uncompressed cache's chunk (~2 MiB) in sequence, so memory is bounded by the
    buffer, not the split. The blocks do not follow the file's own chunks (compressed caches and
    virtual datasets chunk otherwise), so a split streams in the same order from every cache of it.
    Under torchrun, rank r reads only every world-th block of the same seeded block order.
    """
    n = len(x)
    block = feature_cache.chunks(n, x.shape[1:], x.dtype.itemsize)[0]
    starts = rng.permutation(np.arange(0, n, block))[rank::world]
    buf_x, buf_y = [], []
    held = 0
    for i, start in enumerate(starts):
        stop = min(start + block, n)
        buf_x.append(x[start:stop])
        buf_y.append(y[start:stop])
        held += stop - start
        last = i == len(starts) - 1
        if held >= buffer_size or last:
            bx, by = np.concatenate(buf_x), np.concatenate(buf_y)
            order = rng.permutation(len(bx))
            bx, by = bx[order], by[order]
            keep = len(bx) if last else len(bx) - len(bx) % batch_size
            for s in range(0, keep, batch_size):
                yield bx[s:s + batch_size], by[s:s + batch_size]
            buf_x, buf_y = [bx[keep:]], [by[keep:]]
            held = len(bx) - keep
