"""Stage two: train one decoder per layer straight from the cached tensors.

Nothing here touches the encoder or a JPEG: inputs are the cached activations, targets the cached images
scaled to [0, 1]. Each epoch ends in atomically written checkpoint files (see `checkpoints`), so a killed
run loses at most the epoch in progress and a re-run continues up to `train.epochs`. A decoder folder has
one writer at a time (a lock file in it).

Per layer, top to bottom: build the decoder and its optimiser, resume, load the data, train an epoch,
evaluate, save.
"""

import contextlib
import math
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from . import batching, checkpoints, config, decoders, distributed, feature_cache, losses, runtime, storage, training_log
from .console import Timer, console, progress, rate_text, summary
from .errors import UserError
from .images import to_target

# train.epochs: auto. On the CPU, 3 epochs of the default schedule keep the default run near half an hour on
# 2 cores (docs/performance.md). On CUDA a conv2 epoch of the default split is ~310 steps of a decoder that a
# GPU runs in a few ms, so 30 epochs of all four decoders take minutes (an estimate, not yet measured).
AUTO_EPOCHS = {"cpu": 3, "cuda": 30}


def train(cfg, layers=None, fresh=False):
    """Train (or resume) the decoders of `layers`; returns {layer: history}."""
    layers = layers or cfg["layers"]
    losses.check_objective(cfg)
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
            out = checkpoints.folder(cfg, layer)
            locks.enter_context(storage.lock(out / "train.lock", out))
        samples = 0
        for layer in layers:
            histories[layer], start = train_layer(cfg, cache, layer, device, fresh)
            samples += sum(h["samples"] for h in histories[layer][start:])
    distributed.teardown()
    _show_summary(histories)
    summary("trained", samples, timer.seconds, "samples", f"{len(layers)} decoders in {checkpoints.folder(cfg)}")
    return histories


def resolve_epochs(setting, device):
    """`train.epochs`: an int, or auto = AUTO_EPOCHS by device type (MPS and others: the CPU's)."""
    return AUTO_EPOCHS.get(device.type, AUTO_EPOCHS["cpu"]) if setting == "auto" else setting


def train_layer(cfg, cache, layer, device, fresh=False):
    """Returns (history, number of epochs that were already done before this call)."""
    run = build(cfg, cache, layer, device, fresh)
    start, epochs = len(run.history), cfg["train.epochs"]
    if start >= epochs:
        console.print(f"{layer}: already trained for {start} epochs (train.epochs={epochs})")
        return run.history, start
    if start:
        console.print(f"{layer}: resuming from {run.out / checkpoints.LAST} at epoch {start + 1}")
    data = load_data(cfg, cache, layer, run, device)
    steps = math.ceil(len(data.train_x) / cfg["train.batch_size"])  # per epoch
    schedule = lr_schedule(run.optimizer, cfg, epochs * steps, done=start * steps)
    best = min((h["eval_loss"] for h in run.history), default=math.inf)
    provenance = {**run.guard, "encoder": cache.attrs["encoder"], "config_hash": config.digest(cfg),
                  "versions": runtime.versions()}
    log = training_log.open_log(cfg, layer, start, provenance, data.eval_x, data.eval_y)  # None: not logging
    with progress() as bar, log or contextlib.nullcontext():
        task = bar.add_task(f"{layer} epoch {start + 1}/{epochs}", total=len(data.train_x), rate="")
        for epoch in range(start, epochs):
            bar.reset(task, total=len(data.train_x), description=f"{layer} epoch {epoch + 1}/{epochs}")
            lr, t0 = run.optimizer.param_groups[0]["lr"], time.perf_counter()
            rng = np.random.default_rng(runtime.derive_seed(cfg["seed"], layer, epoch + 1))
            batches = _batches(cfg, data, run, rng, device, epoch)
            train_loss, seen = train_one_epoch(run.net, run.optimizer, schedule, batches, device,
                                               _advance(bar, task, t0), run.objective)
            eval_loss = evaluate(run.model, data.eval_x, data.eval_y, cfg["train.batch_size"], device)
            seconds = time.perf_counter() - t0
            _check_finite(layer, epoch, train_loss, eval_loss, run)
            run.history.append({"epoch": epoch + 1, "train_loss": train_loss, "eval_loss": eval_loss, "lr": lr,
                                "seconds": round(seconds, 3), "samples": seen,
                                "samples_per_s": round(seen / seconds, 1),
                                **(run.objective.summary() if run.objective else {})})
            if log:
                log.epoch(run.model, run.history[-1])
            if distributed.is_main():  # one writer: every rank holds the same weights
                # eval_loss is pixel MSE, which the perceptual terms trade away on purpose: best = last then
                save(cfg, run, is_best=eval_loss < best or run.objective is not None)
            best = min(best, eval_loss)
            console.print(f"{layer} epoch {epoch + 1}/{epochs}: train {train_loss:.5f}  eval {eval_loss:.5f}  "
                          f"({seconds:.1f} s, {seen / seconds:,.0f} samples/s)")
    return run.history, start


def build(cfg, cache, layer, device, fresh):
    """The decoder (seeded per layer), its Adam and its history, resumed from the layer's checkpoint where
    there is one; `guard` holds what a checkpoint is pinned to."""
    out = checkpoints.folder(cfg, layer)
    out.mkdir(parents=True, exist_ok=True)
    shape = cache["train"][layer].shape[1:]
    layout = cache.attrs.get("layouts", {}).get(layer) or decoders.default_layout(shape)
    spec = checkpoints.make_spec(layer, shape, layout, cfg["decoder.width"], cfg["data.image_size"],
                                 cfg["decoder.fc_width"])
    guard = {"cache_hash": cache.attrs["cache_hash"], "holdout": cfg["train.holdout"], "decoder": spec}
    objective = losses.active(cfg) and losses.Objective(cfg, cache, layer, device)
    if objective:
        guard["losses"] = losses.settings(cfg)  # pixel-only checkpoints stay as they were
    torch.manual_seed(runtime.derive_seed(cfg["seed"], layer, 0))
    model = checkpoints.build(spec, device)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 first settles a damaged last.pt (moved aside, best.pt linked in)
    resumed = checkpoints.resume_point(out, guard, fresh)
    if distributed.is_main():
        distributed.barrier()
    optimizer = adam(model.parameters(), device, lr=cfg["train.lr"], betas=tuple(cfg["train.betas"]),
                     weight_decay=cfg["train.weight_decay"])
    history = []
    if resumed:
        checkpoint, state = resumed
        model.load_state_dict(checkpoint["model"])
        if state:
            optimizer.load_state_dict(state["optimizer"])
            for group in optimizer.param_groups:  # the schedule starts from this run's train.lr, not the saved one
                group["lr"] = cfg["train.lr"]
                group.pop("initial_lr", None)
        history = checkpoint["history"]
        if objective:
            objective.load(checkpoint, state)
    elif cfg["train.init_from"]:
        model.load_state_dict(losses.initial_weights(cfg["train.init_from"], layer, guard)["model"])
    return SimpleNamespace(out=out, guard=guard, model=model, net=model, optimizer=optimizer, history=history,
                           objective=objective or None)


def load_data(cfg, cache, layer, run, device):
    """The layer's training and evaluation input; a new decoder takes its input statistics from the
    training split as loaded, and under torchrun the model is wrapped once its weights are final."""
    train_x, train_y = batching.inputs(cache, "train", layer, cfg["train.in_memory"], device)
    # Said because it shapes the history: streaming shuffles in another order than in memory.
    console.print(f"{layer}: inputs {'streamed from HDF5' if batching.is_streamed(train_x) else 'in memory'}")
    if run.objective:
        losses.check_inputs(cfg, train_x)
    # from the split as loaded (in memory: no second, strided read of the HDF5 file); a fine-tuned decoder
    # keeps the statistics it was trained with
    if not run.history and not cfg["train.init_from"]:
        mean, std = standardisation(train_x, arrange=run.model.arrange)
        run.model.input_mean.copy_(mean.view_as(run.model.input_mean))
        run.model.input_std.copy_(std.view_as(run.model.input_std))
    if distributed.launched():  # DDP copies rank 0's parameters and buffers to every rank
        run.net = DistributedDataParallel(run.model, device_ids=[device] if device.type == "cuda" else None)
        if run.objective:
            run.objective.wrap(device)
    if cfg["train.holdout"]:
        (train_x, train_y), (eval_x, eval_y) = batching.hold_out(train_x, train_y, cfg["train.holdout"], cfg["seed"])
        console.print(f"{layer}: eval loss on {len(eval_x):,} held-out training images (train.holdout="
                      f"{cfg['train.holdout']}); the eval split is not used")
    else:
        eval_x, eval_y = batching.inputs(cache, "eval", layer, cfg["train.in_memory"], device)
    targets = run.objective.comparator_targets(cache, "train") if run.objective else None
    return SimpleNamespace(train_x=train_x, train_y=train_y, eval_x=eval_x, eval_y=eval_y, comparator_targets=targets)


def train_one_epoch(model, optimizer, schedule, data, device, advance, objective=None):
    """One pass over `data`, stepping the lr schedule after every optimiser step; returns (mean loss,
    samples), over all ranks. The loss stays on the device until the end. With an `objective` (perceptual
    losses) each batch also carries its comparator targets, and the objective takes the step."""
    model.train()
    world = distributed.world_size()
    total, seen = torch.zeros((), device=device), 0
    for x, y, *comparator_targets, global_batch in data:
        weight = world * len(x) / global_batch  # DDP averages gradients over ranks: this makes it the batch mean
        if objective:
            loss = objective.step(model, optimizer, x, y, comparator_targets[0], weight)
        else:
            loss = pixel_loss(model, x, y, device, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        total += loss.detach() * (len(x) / weight if weight else 0)
        seen += len(x)
        advance(len(x) * world)
    total, seen = distributed.all_sum([total.item(), seen], device)
    return total / seen, int(seen)


@torch.no_grad()
def evaluate(model, x_all, y_all, batch, device):
    """Mean pixel MSE over the whole split, in order; under torchrun each rank takes a contiguous share."""
    model.eval()
    start, stop = distributed.share(len(x_all), distributed.rank(), distributed.world_size())
    total, n = 0.0, 0
    for x, y in batching.ordered(x_all, y_all, batch, device, start, stop):
        total += pixel_loss(model, x, y, device).item() * len(x)
        n += len(x)
    total, n = distributed.all_sum([total, n], device)
    return total / n


def save(cfg, run, is_best):
    extra, extra_state = run.objective.state() if run.objective else ({}, {})
    checkpoint = {"model": run.model.state_dict(), "history": run.history, **run.guard,
                  "config_hash": config.digest(cfg), "versions": runtime.versions(), **extra}
    checkpoints.save(run.out, checkpoint, {"optimizer": run.optimizer.state_dict(), **extra_state}, is_best)


def _batches(cfg, data, run, rng, device, epoch):
    """The epoch's shuffled batches; with perceptual losses drawn as row indices, so that the cached
    comparator features of the same rows come along."""
    if not run.objective:
        return batching.batches(data.train_x, data.train_y, cfg["train.batch_size"], rng,
                                cfg["train.shuffle_buffer"], device)
    run.objective.start_epoch(cfg["seed"], run.guard["decoder"]["layer"], epoch)
    rows = np.arange(len(data.train_x))
    return losses.with_comparator_targets(
        batching.batches(rows, rows, cfg["train.batch_size"], rng, cfg["train.shuffle_buffer"], device),
        data.train_x, data.train_y, data.comparator_targets, device)


def pixel_loss(model, x, y, device, weight=1.0):
    """Pixel MSE of the batch, times `weight` (1 outside torchrun)."""
    with runtime.autocast(device):
        out = model(x.float()).float()
        if len(x) == 0:
            return out.sum() * 0  # an empty share still joins DDP's gradient all-reduce
        return F.mse_loss(out, to_target(y)) * weight


def adam(parameters, device, fused=True, **options):
    """Adam, fused where PyTorch has the fused kernel (CPU and CUDA): ~1.8x faster fc-decoder steps."""
    return torch.optim.Adam(parameters, fused=fused and device.type in ("cpu", "cuda"), **options)


class _Held(torch.optim.lr_scheduler.LRScheduler):
    """`train.lr` held: the no-schedule schedule, so the loop always has one to step."""

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]


def lr_schedule(optimizer, cfg, total, done=0):
    """Per optimiser step: a linear warm-up over the first `train.warmup` of the `total` steps, then
    `train.lr` held (none) or decayed to zero on a cosine. A resumed run replays its `done` steps, so it
    follows the uninterrupted run's rates exactly; steps past `total` (a streamed epoch can run one longer
    than ceil(n / batch)) keep the last rate."""
    warm = round(cfg["train.warmup"] * total)
    sched = torch.optim.lr_scheduler
    after = (sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warm)) if cfg["train.schedule"] == "cosine"
             else _Held(optimizer))
    if warm:
        warmup = sched.LinearLR(optimizer, start_factor=1 / warm, end_factor=1.0, total_iters=max(1, warm - 1))
        after = sched.SequentialLR(optimizer, [warmup, after], milestones=[warm])
    schedule = _Capped(after, total)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")  # the replay: no step is lost
        for _ in range(done):
            schedule.step()
    return schedule


class _Capped:
    """A schedule that stops stepping at its last step."""

    def __init__(self, schedule, total):
        self.schedule, self.total, self.done = schedule, total, 0

    def step(self):
        if self.done < self.total - 1:
            self.schedule.step()
        self.done += 1


def standardisation(dataset, limit=2048, arrange=None):
    """Per-channel (mean, std) of the features, from about `limit` samples spread evenly over the split
    (it is stored class by class: the first samples would be a few classes), taken channels first as
    `arrange` (Decoder.arrange) lays them out. Units that barely vary (dead ReLUs) are divided by a tenth
    of the typical std rather than by ~0, so that an image unlike the sample cannot blow them up."""
    sample = torch.as_tensor(dataset[::max(1, len(dataset) // limit)]).float()  # numpy, HDF5 or a GPU tensor
    sample = arrange(sample) if arrange else sample
    dims = [0, *range(2, sample.dim())]
    mean, std = sample.mean(dims), sample.std(dims)
    floor = 0.1 * std.mean().item()
    return mean, std.clamp(min=floor) if floor > 0 else torch.ones_like(std)


def _advance(bar, task, t0):
    def advance(n):
        bar.advance(task, n)
        bar.update(task, rate=rate_text(bar.tasks[0].completed, time.perf_counter() - t0, "samples"))
    return advance


def _check_finite(layer, epoch, train_loss, eval_loss, run):
    if math.isfinite(train_loss) and math.isfinite(eval_loss):
        return
    kept = f"kept {run.out / checkpoints.LAST} (epoch {len(run.history)})" if run.history else "no checkpoint was written"
    raise UserError(f"{layer}: loss became {train_loss if not math.isfinite(train_loss) else eval_loss} in epoch "
                    f"{epoch + 1}; stopped, {kept}; try a lower train.lr")


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
