"""Stage two: train one decoder per layer straight from the cached tensors.

Nothing here touches the encoder or a JPEG: inputs are the cached activations, targets the cached images
scaled to [0, 1]. Each epoch ends in atomically written checkpoint files (see `checkpoints`), so a killed
run loses at most the epoch in progress and a re-run continues up to `train.epochs`. Within an epoch an
in-progress checkpoint is written every `train.checkpoint_minutes` and on Ctrl-C or SIGTERM (after the step
in hand), and a re-run continues it at the next step, as the uninterrupted run would have gone on. A decoder
folder has one writer at a time (a lock file in it).

Per layer, top to bottom: build the decoder and its optimiser, resume, load the data, train an epoch,
evaluate, save.
"""

import contextlib
import math
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from inversion.core import checkpoints, config, distributed, feature_cache, host, runtime, seeds, storage
from inversion.core.console import (Interrupted, Timer, console, deferred_interrupts, interrupt_requested, progress,
                                    rate_text, summary)
from inversion.core.errors import UserError
from inversion.core.images import to_target
from inversion.core.layouts import default_layout
from inversion.train import batching, in_progress, losses, schedules, training_log

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
    precision = runtime.resolve_precision(cfg["precision"], device)
    host.keep_freed_memory()
    distributed.setup(device)
    ranks = f", {distributed.world_size()} ranks (DistributedDataParallel)" if distributed.launched() else ""
    setting = cfg["train.epochs"]
    cfg = dict(cfg, **{"train.epochs": resolve_epochs(setting, device)})  # the lr schedule needs the number
    console.print(f"training {', '.join(layers)} from {cache.path} on {runtime.describe_device(device, precision)}{ranks}, "
                  f"{cfg['train.epochs']} epochs" + (f" (train.epochs: auto on {device.type})" if setting == "auto" else ""))
    histories = {}
    with Timer() as timer, cache, contextlib.ExitStack() as locks:
        for layer in layers if distributed.is_main() else ():  # all before any work: a second run refuses at once
            out = checkpoints.folder(cfg, layer)
            locks.enter_context(storage.lock(out / "train.lock", out))
        samples = 0
        for layer in layers:
            try:
                histories[layer], start = train_layer(cfg, cache, layer, device, fresh, precision)
            except KeyboardInterrupt as e:
                raise _interrupted(cfg, layer, list(histories), e) from e
            samples += sum(h["samples"] for h in histories[layer][start:])
    distributed.teardown()
    _show_summary(histories)
    summary("trained", samples, timer.seconds, "samples", f"{len(layers)} decoders in {checkpoints.folder(cfg)}")
    return histories


def resolve_epochs(setting, device):
    """`train.epochs`: an int, or auto = AUTO_EPOCHS by device type (MPS and others: the CPU's)."""
    return AUTO_EPOCHS.get(device.type, AUTO_EPOCHS["cpu"]) if setting == "auto" else setting


def train_layer(cfg, cache, layer, device, fresh=False, precision="fp32"):
    """Returns (history, number of epochs that were already done before this call). `precision`: what the
    steps compute in (runtime.resolve_precision); it is recorded, not pinned, so a run resumes under another."""
    run = build(cfg, cache, layer, device, fresh, precision)
    start, epochs = len(run.history), cfg["train.epochs"]
    if start >= epochs:
        console.print(f"{layer}: already trained for {start} epochs (train.epochs={epochs})")
        return run.history, start
    if start:
        console.print(f"{layer}: resuming from {run.out / checkpoints.LAST} at epoch {start + 1}")
    data = load_data(cfg, cache, layer, run, device)
    steps = math.ceil(len(data.train_x) / cfg["train.batch_size"])  # per epoch
    run.order = in_progress.batch_order(cfg, data)
    partial = None if fresh else in_progress.resume(cfg, run, start, steps)
    schedule = schedules.lr_schedule(run.optimizer, cfg, epochs * steps,
                           done=partial["schedule_done"] if partial else start * steps)
    best = min((h["eval_loss"] for h in run.history), default=math.inf)
    provenance = {**run.guard, "encoder": cache.attrs["encoder"], "config_hash": config.digest(cfg),
                  "versions": host.versions()}
    log = training_log.open_log(cfg, layer, start, provenance, data.eval_x, data.eval_y)  # None: not logging
    # Ctrl-C and SIGTERM wait for the step in hand (deferred_interrupts), then the ranks stop together.
    with progress() as bar, log or contextlib.nullcontext(), deferred_interrupts():
        run.bar, run.task = bar, bar.add_task(f"{layer} epoch {start + 1}/{epochs}", total=len(data.train_x), rate="")
        boundaries = in_progress.Boundaries(cfg, run, steps, schedule, device)
        for epoch in range(start, epochs):
            best = train_epoch(cfg, run, data, epoch, schedule, boundaries, best, log, partial, device)
            partial = None
            if distributed.any_rank([interrupt_requested()])[0]:
                raise Interrupted(f"{layer}: kept its {epoch + 1} finished epochs ({run.out / checkpoints.LAST})")
    return run.history, start


def train_epoch(cfg, run, data, epoch, schedule, boundaries, best, log, partial, device):
    """One epoch, from its beginning or from the step an in-progress checkpoint (`partial`) reached, then its
    evaluation and checkpoint; returns the best eval loss so far."""
    layer, epochs = run.guard["decoder"]["layer"], cfg["train.epochs"]
    skip = partial["step"] if partial else 0
    run.bar.reset(run.task, total=len(data.train_x), description=f"{layer} epoch {epoch + 1}/{epochs}",
                  completed=min(len(data.train_x), skip * cfg["train.batch_size"]))
    lr, t0 = partial["lr"] if partial else run.optimizer.param_groups[0]["lr"], time.perf_counter()
    rng = np.random.default_rng(seeds.derive_seed(cfg["seed"], layer, epoch + 1))
    batches = _batches(cfg, data, run, rng, device, epoch, skip)  # seeds the objective's draws for the epoch
    sums = in_progress.restore_rank_state(partial, run, device) if partial else None  # ... which a partial epoch continues
    before = partial["seconds"] if partial else 0.0
    after_step = boundaries.after_step(epoch, skip, lr, lambda: before + time.perf_counter() - t0)
    train_loss, seen = train_one_epoch(run.net, run.optimizer, schedule, batches, device,
                                       _advance(run.bar, run.task, t0), run.objective, after_step, sums, run.precision,
                                       cfg["train.grad_clip"])
    eval_loss = evaluate(run.model, data.eval_x, data.eval_y, cfg["train.batch_size"], device, run.precision)
    seconds = before + time.perf_counter() - t0
    _check_finite(layer, epoch, train_loss, eval_loss, run)
    run.history.append({"epoch": epoch + 1, "train_loss": train_loss, "eval_loss": eval_loss, "lr": lr,
                        "seconds": round(seconds, 3), "samples": seen, "samples_per_s": round(seen / seconds, 1),
                        "precision": run.precision,
                        **(run.objective.summary() if run.objective else {})})
    if log:
        log.epoch(run.model, run.history[-1])
    if distributed.is_main():  # one writer: every rank holds the same weights
        # eval_loss is pixel MSE, which the perceptual terms trade away on purpose: best = last then
        save(cfg, run, is_best=eval_loss < best or run.objective is not None)
        checkpoints.drop_in_progress(run.out)  # after the save: a kill between the two leaves a stale one, unused
    boundaries.saved()
    console.print(f"{layer} epoch {epoch + 1}/{epochs}: train {train_loss:.5f}  eval {eval_loss:.5f}  "
                  f"({seconds:.1f} s, {seen / seconds:,.0f} samples/s)")
    return min(best, eval_loss)


def build(cfg, cache, layer, device, fresh, precision="fp32"):
    """The decoder (seeded per layer), its Adam and its history, resumed from the layer's checkpoint where
    there is one; `guard` holds what a checkpoint is pinned to."""
    out = checkpoints.folder(cfg, layer)
    out.mkdir(parents=True, exist_ok=True)
    shape = cache["train"][layer].shape[1:]
    layout = cache.attrs.get("layouts", {}).get(layer) or default_layout(shape)
    spec = checkpoints.make_spec(layer, shape, layout, cfg["decoder.width"], cfg["data.image_size"],
                                 cfg["decoder.fc_width"])
    guard = {"cache_hash": cache.attrs["cache_hash"], "holdout": cfg["train.holdout"], "decoder": spec}
    objective = losses.active(cfg) and losses.Objective(cfg, cache, layer, device, precision)
    if objective:
        guard["losses"] = losses.settings(cfg)  # pixel-only checkpoints stay as they were
    torch.manual_seed(seeds.derive_seed(cfg["seed"], layer, 0))
    model = checkpoints.build(spec, device)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 first settles a damaged last.pt (moved aside, best.pt linked in)
    resumed = checkpoints.resume_point(out, guard, fresh)
    if distributed.is_main():
        if fresh:
            checkpoints.drop_in_progress(out)  # else a later run would continue the old run's epoch
        distributed.barrier()
    optimizer = runtime.adam(model.parameters(), device, lr=cfg["train.lr"], betas=tuple(cfg["train.betas"]),
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
                           objective=objective or None, precision=precision)


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


def train_one_epoch(model, optimizer, schedule, data, device, advance, objective=None, after_step=None, sums=None,
                    precision="fp32", grad_clip=None):
    """One pass over `data`, stepping the lr schedule after every optimiser step; returns (mean loss,
    samples), over all ranks. The loss stays on the device until the end. With an `objective` (perceptual
    losses) each batch also carries its comparator targets, and the objective takes the step.
    `after_step(steps, loss sum, samples)` runs between steps (it may checkpoint, or raise to stop), not after
    the last, which the epoch's own checkpoint follows; `sums`: this rank's (loss sum, samples) of the steps an
    in-progress checkpoint already took. `grad_clip`: the largest global gradient norm a step applies (None: any)."""
    model.train()
    world = distributed.world_size()
    total, seen = sums or (torch.zeros((), device=device), 0)
    batches = iter(data)
    batch, steps = next(batches, None), 0
    while batch is not None:
        x, y, *comparator_targets, global_batch = batch
        weight = world * len(x) / global_batch  # DDP averages gradients over ranks: this makes it the batch mean
        if objective:
            loss = objective.step(model, optimizer, x, y, comparator_targets[0], weight)
        else:
            loss = pixel_loss(model, x, y, device, weight, precision)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        schedule.step()
        total += loss.detach() * (len(x) / weight if weight else 0)
        seen += len(x)
        advance(len(x) * world)
        batch, steps = next(batches, None), steps + 1
        if after_step and batch is not None:
            after_step(steps, total, seen)
    total, seen = distributed.all_sum([total.item(), seen], device)
    return total / seen, int(seen)


def _interrupted(cfg, layer, finished, error):
    """The one line an interrupted training ends in: what each layer keeps."""
    before = f"{', '.join(finished)} finished; " if finished else ""
    if isinstance(error, Interrupted):
        return Interrupted(before + str(error))
    last = checkpoints.folder(cfg, layer) / checkpoints.LAST
    kept = f"its finished epochs are kept ({last})" if last.exists() else "no epoch was finished"
    return Interrupted(f"{before}{layer}: {kept}")


@torch.no_grad()
def evaluate(model, x_all, y_all, batch, device, precision="fp32"):
    """Mean pixel MSE over the whole split, in order; under torchrun each rank takes a contiguous share."""
    model.eval()
    start, stop = distributed.share(len(x_all), distributed.rank(), distributed.world_size())
    total, n = 0.0, 0
    for x, y in batching.ordered(x_all, y_all, batch, device, start, stop):
        total += pixel_loss(model, x, y, device, precision=precision).item() * len(x)
        n += len(x)
    total, n = distributed.all_sum([total, n], device)
    return total / n


def save(cfg, run, is_best):
    extra, extra_state = run.objective.state() if run.objective else ({}, {})
    checkpoint = {"model": run.model.state_dict(), "history": run.history, **run.guard,
                  "config_hash": config.digest(cfg), "versions": host.versions(), "precision": run.precision,
                  **extra}
    checkpoints.save(run.out, checkpoint, {"optimizer": run.optimizer.state_dict(), **extra_state}, is_best)


def _batches(cfg, data, run, rng, device, epoch, skip=0):
    """The epoch's shuffled batches after the first `skip`; with perceptual losses drawn as row indices, so
    that the cached comparator features of the same rows come along."""
    if not run.objective:
        return batching.batches(data.train_x, data.train_y, cfg["train.batch_size"], rng,
                                cfg["train.shuffle_buffer"], device, skip)
    run.objective.start_epoch(cfg["seed"], run.guard["decoder"]["layer"], epoch)
    rows = np.arange(len(data.train_x))
    return losses.with_comparator_targets(
        batching.batches(rows, rows, cfg["train.batch_size"], rng, cfg["train.shuffle_buffer"], device, skip),
        data.train_x, data.train_y, data.comparator_targets, device)


def pixel_loss(model, x, y, device, weight=1.0, precision="fp32"):
    """Pixel MSE of the batch, times `weight` (1 outside torchrun); the loss itself in fp32."""
    with runtime.autocast(device, precision):
        out = model(x.float()).float()
        if len(x) == 0:
            return out.sum() * 0  # an empty share still joins DDP's gradient all-reduce
        return F.mse_loss(out, to_target(y)) * weight


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
