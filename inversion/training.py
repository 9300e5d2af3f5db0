"""Stage two: train one decoder per layer straight from the cached tensors.

Nothing here touches AlexNet or a JPEG: inputs are the cached activations, targets the cached
images scaled to [0, 1]. Each epoch ends in an atomically written `last.pt` (and `best.pt`
when the eval loss improves), so a killed run loses at most the epoch in progress and a re-run
continues from `last.pt` up to `train.epochs`. A decoder folder has one writer at a time (a lock
file in it), and a damaged `last.pt` is set aside for an intact `best.pt` or refused, never reused.
"""

import contextlib
import json
import math
import os
import shutil
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from . import config, decoders, distributed, feature_cache, runtime, storage
from .console import Timer, console, progress, rate_text, summary, warn
from .decoders import Decoder
from .errors import UserError

HISTORY = "history.jsonl"
# train.epochs: auto. On the CPU, 3 epochs of the default schedule reach what 5 of the one before it
# did (README, Performance: the sweep) and keep the README's main command near 30 minutes on 2 cores.
# On CUDA a conv2 epoch of the default split is ~310 steps of a decoder that a GPU runs in a few ms,
# so 30 epochs of all four decoders is a few minutes (an estimate: no GPU has been lent yet), and
# every loss is still falling at 3.
AUTO_EPOCHS = {"cpu": 3, "cuda": 30}


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be loaded: cut short by a full disk or a copy gone wrong."""


def train(cfg, layers=None, fresh=False):
    """Train (or resume) the decoders of `layers`; returns {layer: history}."""
    layers = layers or cfg["layers"]
    cache = feature_cache.open_for(cfg, layers)
    device = runtime.pick_device(cfg["device"])
    distributed.setup(device)
    ranks = f", {distributed.world_size()} ranks (DistributedDataParallel)" if distributed.launched() else ""
    setting = cfg["train.epochs"]
    cfg = dict(cfg, **{"train.epochs": resolve_epochs(setting, device)})  # the lr schedule needs the number
    console.print(f"training {', '.join(layers)} from {cache.path} on {runtime.describe_device(device)}{ranks}, "
                  f"{cfg['train.epochs']} epochs" + (f" (train.epochs: auto on {device.type})" if setting == "auto" else ""))
    histories = {}
    with Timer() as timer, cache, contextlib.ExitStack() as locks:
        for layer in layers if distributed.is_main() else ():  # all before any work: a second run refuses at once
            locks.enter_context(storage.lock(decoder_dir(cfg, layer) / "train.lock", decoder_dir(cfg, layer)))
        samples = 0
        for layer in layers:
            histories[layer], start = train_layer(cfg, cache, layer, device, fresh)
            samples += sum(h["samples"] for h in histories[layer][start:])
    distributed.teardown()
    _show_summary(histories)
    summary("trained", samples, timer.seconds, "samples", f"{len(layers)} decoders in {decoder_dir(cfg)}")
    return histories


def resolve_epochs(setting, device):
    """`train.epochs`: an int, or auto = AUTO_EPOCHS by device type (MPS and others: the CPU's)."""
    return AUTO_EPOCHS.get(device.type, AUTO_EPOCHS["cpu"]) if setting == "auto" else setting


def decoder_dir(cfg, layer=""):
    return Path(cfg["output.dir"]) / "decoders" / layer


def train_layer(cfg, cache, layer, device, fresh=False):
    """Returns (history, number of epochs that were already done before this call)."""
    out = decoder_dir(cfg, layer)
    out.mkdir(parents=True, exist_ok=True)
    shape = cache["train"][layer].shape[1:]
    layout = cache.attrs.get("layouts", {}).get(layer) or decoders.default_layout(shape)
    guard = {"cache_hash": cache.attrs["cache_hash"], "holdout": cfg["train.holdout"],
             "decoder": {"layer": layer, "in_shape": list(shape), **decoders.spec(shape, layout),
                         "width": cfg["decoder.width"], "out_size": cfg["data.image_size"]}}
    torch.manual_seed(_seed(cfg["seed"], layer))
    model = Decoder(shape, cfg["decoder.width"], out_size=cfg["data.image_size"], layout=layout).to(device)
    history = []
    if not distributed.is_main():
        distributed.barrier()  # rank 0 first settles a damaged last.pt (moved aside, best.pt copied in)
    checkpoint = _resume_point(out, guard, fresh)
    if distributed.is_main():
        distributed.barrier()
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        history = checkpoint["history"]
    optimizer = adam(model.parameters(), device, lr=cfg["train.lr"], betas=tuple(cfg["train.betas"]),
                     weight_decay=cfg["train.weight_decay"])
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
    start = len(history)
    epochs = resolve_epochs(cfg["train.epochs"], device)
    if start >= epochs:
        console.print(f"{layer}: already trained for {start} epochs (train.epochs={epochs})")
        return history, start
    if start:
        console.print(f"{layer}: resuming from {out / 'last.pt'} at epoch {start + 1}")

    train_x, train_y = inputs(cache, "train", layer, cfg["train.in_memory"], device)
    # Said because it shapes the history: streaming shuffles in another order than in memory.
    console.print(f"{layer}: inputs {'streamed from HDF5' if isinstance(train_x, h5py.Dataset) else 'in memory'}")
    if not checkpoint:  # from the split as loaded (in memory: no second, strided read of the HDF5 file)
        mean, std = standardisation(train_x, arrange=model.arrange)
        model.input_mean.copy_(mean.view_as(model.input_mean))
        model.input_std.copy_(std.view_as(model.input_std))
    # Wrapped after the weights are final: DDP copies rank 0's parameters and buffers to every rank.
    net = model if not distributed.launched() else DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    if cfg["train.holdout"]:
        (train_x, train_y), (eval_x, eval_y) = hold_out(train_x, train_y, cfg["train.holdout"], cfg["seed"])
        console.print(f"{layer}: eval loss on {len(eval_x):,} held-out training images (train.holdout="
                      f"{cfg['train.holdout']}); the eval split is not used")
    else:
        eval_x, eval_y = inputs(cache, "eval", layer, cfg["train.in_memory"], device)
    best = min((h["eval_loss"] for h in history), default=math.inf)
    batch = cfg["train.batch_size"]
    steps = math.ceil(len(train_x) / batch)  # per epoch
    with progress() as bar:
        task = bar.add_task(f"{layer} epoch {start + 1}/{epochs}", total=len(train_x), rate="")
        for epoch in range(start, epochs):
            def lr_at(step, epoch=epoch):
                return _lr(cfg, epoch * steps + step, epochs * steps)

            rng = np.random.default_rng(_seed(cfg["seed"], layer, epoch))
            bar.reset(task, total=len(train_x), description=f"{layer} epoch {epoch + 1}/{epochs}")
            t0 = time.perf_counter()

            def advance(n):
                bar.advance(task, n)
                bar.update(task, rate=rate_text(bar.tasks[0].completed, time.perf_counter() - t0, "samples"))

            data = batches(train_x, train_y, batch, rng, cfg["train.shuffle_buffer"], device)
            train_loss, seen = _train_epoch(net, optimizer, data, device, advance, lr_at)
            eval_loss = evaluate(model, eval_x, eval_y, batch, device)
            seconds = time.perf_counter() - t0
            if not (math.isfinite(train_loss) and math.isfinite(eval_loss)):
                kept = f"kept {out / 'last.pt'} (epoch {len(history)})" if history else "no checkpoint was written"
                raise UserError(f"{layer}: loss became {train_loss if not math.isfinite(train_loss) else eval_loss}"
                                f" in epoch {epoch + 1}; stopped, {kept}; try a lower train.lr")
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "eval_loss": eval_loss, "lr": lr_at(0),
                            "seconds": round(seconds, 3), "samples": seen,
                            "samples_per_s": round(seen / seconds, 1)})
            if distributed.is_main():  # one writer: every rank holds the same weights
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
                         **guard, "config_hash": config.digest(cfg), "versions": runtime.versions()}
                with storage.replacing(out / "last.pt") as tmp:
                    torch.save(state, tmp)
                if eval_loss < best:
                    with storage.replacing(out / "best.pt") as tmp:
                        torch.save(state, tmp)
                storage.write_text(out / HISTORY, "".join(json.dumps(h) + "\n" for h in history))
            best = min(best, eval_loss)
            console.print(f"{layer} epoch {epoch + 1}/{epochs}: train {train_loss:.5f}  eval {eval_loss:.5f}  "
                          f"({seconds:.1f} s, {seen / seconds:,.0f} samples/s)")
    return history, start


def _train_epoch(model, optimizer, data, device, advance, lr_at):
    """One pass over `data` with the learning rate `lr_at(step)`; returns (mean loss, samples), over
    all ranks. The loss stays on the device until the end."""
    model.train()
    world = distributed.world_size()
    total, seen = torch.zeros((), device=device), 0
    for step, (x, y, global_batch) in enumerate(data):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        weight = world * len(x) / global_batch  # DDP averages gradients over ranks: this makes it the batch mean
        loss = _loss(model, x, y, device, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * (len(x) / weight if weight else 0)
        seen += len(x)
        advance(len(x) * world)
    total, seen = distributed.all_sum([total.item(), seen], device)
    return total / seen, int(seen)


def load_decoder(path, device="cpu"):
    """(decoder in eval mode, checkpoint dict) from a `last.pt` or `best.pt`; else DamagedCheckpoint."""
    checkpoint = load_checkpoint(path)
    try:
        spec = checkpoint["decoder"]
        model = Decoder(tuple(spec["in_shape"]), spec["width"], out_size=spec.get("out_size", 64),  # 64: older ones
                        layout=spec.get("layout"))
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DamagedCheckpoint(f"{path} is damaged and cannot be loaded ({storage.reason(e)})") from e
    return model.to(device).eval(), checkpoint


def load_checkpoint(path):
    """The checkpoint dict, or a one-line DamagedCheckpoint naming the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a cut-short zip raises RuntimeError, others EOFError, pickle errors
        raise DamagedCheckpoint(f"{path} is damaged and cannot be loaded ({storage.reason(e)})") from e
    if not isinstance(checkpoint, dict) or not {"model", "optimizer", "history", "decoder"} <= set(checkpoint):
        raise DamagedCheckpoint(f"{path} is damaged and cannot be loaded (not a decoder checkpoint)")
    return checkpoint


@torch.no_grad()
def evaluate(model, x_all, y_all, batch, device):
    """Mean pixel MSE over the whole split, in order; under torchrun each rank takes a contiguous share."""
    model.eval()
    start, stop = distributed.share(len(x_all), distributed.rank(), distributed.world_size())
    total, n = 0.0, 0
    for x, y in _ordered(x_all, y_all, batch, device, start, stop):
        total += _loss(model, x, y, device).item() * len(x)
        n += len(x)
    total, n = distributed.all_sum([total, n], device)
    return total / n


@torch.no_grad()
def reconstruct(model, x_all, batch, device):
    """Decoder outputs for a whole split, clamped to [0, 1], as a CPU float tensor (N, 3, S, S)."""
    model.eval()
    outs = []
    for start in range(0, len(x_all), batch):
        x = torch.as_tensor(np.asarray(x_all[start:start + batch])).to(device).float()
        with autocast(device):
            outs.append(model(x).float().clamp_(0, 1).cpu())
    return torch.cat(outs)


def to_hwc(images):
    """Float (B, 3, S, S) -> numpy (B, S, S, 3): how figures and the encoder take decoder outputs."""
    return images.permute(0, 2, 3, 1).numpy()


def to_uint8(images):
    """Decoder outputs in [0, 1] -> uint8 (B, S, S, 3), the cached images' own form."""
    return to_hwc((images * 255).round().to(torch.uint8))


def to_target(images):
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1]: what decoders predict."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def _loss(model, x, y, device, weight=1.0):
    """Pixel MSE of the batch, times `weight` (1 outside torchrun)."""
    with autocast(device):
        out = model(x.float()).float()
        if len(x) == 0:
            return out.sum() * 0  # an empty share still joins DDP's gradient all-reduce
        return F.mse_loss(out, to_target(y)) * weight


def adam(parameters, device, fused=True, **options):
    """Adam, fused where PyTorch has the fused kernel (CPU and CUDA): ~1.8x faster fc-decoder steps."""
    return torch.optim.Adam(parameters, fused=fused and device.type in ("cpu", "cuda"), **options)


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def inputs(cache, split, layer, in_memory, device):
    """The split's (features, images): in memory (on the GPU if room, else numpy arrays, which
    gather rows faster than CPU tensors do) or, when they do not fit, the HDF5 datasets."""
    x, y = cache[split][layer], cache[split]["images"]
    nbytes = x.size * x.dtype.itemsize + y.size
    if in_memory == "auto":
        in_memory = nbytes < 0.5 * _available_ram()
    if not in_memory:
        return x, y
    x, y = x[()], y[()]
    if device.type == "cuda" and nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    return x, y


def batches(x, y, batch, rng, buffer, device):
    """Shuffled training batches (x, y, size of the global batch): an index permutation in memory,
    a shuffle buffer from HDF5. Under torchrun every rank draws the same permutation and takes its
    contiguous share of each batch, so the global batch is the single-process one; streamed, each
    rank reads its own blocks (batch / world samples a step: results then depend on the world size)."""
    rank, world = distributed.rank(), distributed.world_size()
    if isinstance(x, torch.Tensor):  # already on the GPU
        order = torch.from_numpy(rng.permutation(len(x))).to(x.device)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            mine = idx[slice(*distributed.share(len(idx), rank, world))]
            yield x[mine], y[mine], len(idx)
    elif isinstance(x, np.ndarray):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            mine = np.sort(idx[slice(*distributed.share(len(idx), rank, world))])  # friendlier memory access
            yield torch.from_numpy(x[mine]).to(device), torch.from_numpy(y[mine]).to(device), len(idx)
    else:
        for bx, by in feature_cache.stream(x, y, max(1, batch // world), buffer, rng, rank, world):
            yield torch.from_numpy(bx).to(device), torch.from_numpy(by).to(device), len(bx) * world


def _ordered(x, y, batch, device, begin=0, end=None):
    for start in range(begin, len(x) if end is None else end, batch):
        stop = min(start + batch, len(x) if end is None else end)
        yield torch.as_tensor(x[start:stop]).to(device), torch.as_tensor(y[start:stop]).to(device)


def standardisation(dataset, limit=2048, arrange=None):
    """Per-channel (mean, std) of the features, from about `limit` samples spread evenly over the
    split (it is stored class by class: the first samples would be a few classes), taken channels
    first as `arrange` (Decoder.arrange) lays them out. Units that barely vary (dead ReLUs) are
    divided by a tenth of the typical std rather than by ~0, so that an image unlike the sample
    cannot blow them up."""
    sample = torch.as_tensor(dataset[::max(1, len(dataset) // limit)]).float()  # numpy, HDF5 or a GPU tensor
    sample = arrange(sample) if arrange else sample
    dims = [0, *range(2, sample.dim())]
    mean, std = sample.mean(dims), sample.std(dims)
    floor = 0.1 * std.mean().item()
    return mean, std.clamp(min=floor) if floor > 0 else torch.ones_like(std)


def _lr(cfg, step, total):
    """The learning rate at optimiser step `step` of the run's `total`: a linear warm-up over the
    first `train.warmup` of the steps, then `train.lr` held (none) or decayed to zero (cosine). A
    function of the step alone, so a resumed run follows the uninterrupted one's schedule."""
    peak, warm = cfg["train.lr"], round(cfg["train.warmup"] * total)
    step = min(step, total - 1)  # a streamed epoch can run a step longer than ceil(n / batch)
    if step < warm:
        return peak * (step + 1) / warm
    if cfg["train.schedule"] == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return peak


def hold_out(x, y, fraction, seed):
    """((train x, y), (held-out x, y)): a seeded `fraction` of the training split, the same images
    for every layer, to tune training on without touching the eval split."""
    if isinstance(x, h5py.Dataset):
        raise UserError("train.holdout needs the training split in memory: set train.in_memory=true "
                        "(or a smaller split)")
    order = np.random.default_rng(_seed(seed, "holdout")).permutation(len(x))
    n = round(fraction * len(x))
    held, kept = np.sort(order[:n]), np.sort(order[n:])
    if isinstance(x, torch.Tensor):
        held, kept = torch.from_numpy(held).to(x.device), torch.from_numpy(kept).to(x.device)
    return (x[kept], y[kept]), (x[held], y[held])


def _seed(seed, layer, epoch=-1):
    """Per-layer (and per-epoch) seeds: training one layer alone gives the same run as all four."""
    return int(np.random.SeedSequence([seed, zlib.crc32(layer.encode()), epoch + 1]).generate_state(1)[0])


def _resume_point(out, guard, fresh):
    path = out / "last.pt"
    if fresh or not path.exists():
        return None
    try:
        checkpoint = load_checkpoint(path)
    except DamagedCheckpoint as damaged:
        return _instead_of_damaged(out, guard, damaged)
    key = _mismatch(checkpoint, guard)
    if key:
        raise UserError(f"{path} was trained with {key} {checkpoint.get(key)}, now {guard[key]}; "
                        f"pass --fresh to start this decoder over")
    return checkpoint


def _mismatch(checkpoint, guard):
    """The first guarded setting a checkpoint was trained with that differs from now, else None."""
    return next((key for key in guard if checkpoint.get(key, 0.0 if key == "holdout" else None) != guard[key]), None)


def _instead_of_damaged(out, guard, damaged):
    """Resume from an intact `best.pt` when `last.pt` is damaged (a resumed run equals an uninterrupted
    one, so only time is lost); the damaged file is moved aside, not overwritten. No usable `best.pt`:
    refuse, pointing at --fresh."""
    last, best, layer = out / "last.pt", out / "best.pt", guard["decoder"]["layer"]
    try:
        checkpoint = load_checkpoint(best) if best.exists() else None
    except DamagedCheckpoint:
        checkpoint = None
    if checkpoint is None or _mismatch(checkpoint, guard):
        raise UserError(f"{damaged}; no intact {best.name} to resume from: pass --fresh to start {layer} over "
                        f"(train_decoders.py --layers {layer} --fresh)")
    aside = last.with_name(last.name + ".damaged")
    last.replace(aside)
    with storage.replacing(last) as tmp:  # render finds a last.pt even when no epoch is left to train
        shutil.copyfile(best, tmp)
    warn(f"{damaged}; moved it to {aside.name} and resuming from {best} (epoch {len(checkpoint['history'])})")
    return checkpoint


def read_history(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _available_ram():
    """Linux's MemAvailable (free plus reclaimable page cache). MemFree (sysconf's AVPHYS_PAGES),
    used before, shrinks as the page cache fills, so on a busy machine the default conv2 split (772
    MB) was sometimes streamed instead of loaded, which changes the batch order and so the history."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _show_summary(histories):
    table = Table(title="decoders")
    for column in ("layer", "epochs", "train loss", "eval loss", "best eval", "s/epoch", "samples/s"):
        table.add_column(column, justify="right" if column != "layer" else "left")
    for layer, history in histories.items():
        if not history:
            continue
        last = history[-1]
        table.add_row(layer, str(last["epoch"]), f"{last['train_loss']:.5f}", f"{last['eval_loss']:.5f}",
                      f"{min(h['eval_loss'] for h in history):.5f}",
                      f"{np.mean([h['seconds'] for h in history]):.1f}",
                      f"{np.mean([h['samples_per_s'] for h in history]):,.0f}")
    console.print(table)
