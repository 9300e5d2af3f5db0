"""train_encoder.py: `encoder.arch` trained from scratch as a classifier, for when ImageNet weights cannot be
had (no internet, blocked downloads) or when the question is what a network trained on *this* data keeps.

Top to bottom: the dataset's training images of every class (or `num_classes` of them) are decoded once
into one uint8 array (Tiny ImageNet: 1.2 GB) and augmented in batches (augment.py); the network gets batch
norm where it has none (batchnorm.py); SGD with Nesterov momentum, a linear warm-up and a cosine to zero per
step, label smoothing; progressive resizing: `min_input_size` for most epochs (a fraction of the compute),
`encoder.input_size` for the last `full_size_epochs`. After every epoch, top-1 and top-5 on the held-out
images at `encoder.input_size`, through the extraction's own preprocessing, and a checkpoint; at the end
the batch norm is folded away and the weights file written (core/encoder_weights.py).

Resuming (after Ctrl-C, SIGTERM or a kill) gives the same weights as a run never stopped: each epoch's image
order, crops, flips and dropout come from generators seeded by (seed, epoch), and an in-progress checkpoint
holds their state at the step it was written.
"""

import contextlib
import math
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from inversion.core import config, data, distributed, encoder, encoder_weights, host, runtime, seeds, splits, storage
from inversion.core.console import (Interrupted, Timer, console, deferred_interrupts, interrupt_requested, progress,
                                    rate_text, summary)
from inversion.encoder_training import augment, batchnorm, checkpointing

EVAL_BATCH = 200


def train(cfg, fresh=False):
    """Train (or resume) and write the weights file; returns its path."""
    device = runtime.pick_device(cfg["device"])
    precision = runtime.resolve_precision(cfg["precision"], device)
    host.keep_freed_memory()
    distributed.setup(device)
    job = prepare(cfg)
    with storage.lock(job.out / "train.lock", job.out) if distributed.is_main() else contextlib.nullcontext():
        run = build(cfg, job, device, fresh)
        epochs = cfg["encoder_training.epochs"]
        console.print(f"training {job.display} on {job.description} from scratch on "
                      f"{runtime.describe_device(device, precision)}: {epochs} epochs of {len(job.train_y):,} images, "
                      f"held out {len(job.eval_y):,}" + (f", resuming at epoch {len(run.history) + 1}" if run.history else ""))
        with Timer() as timer, progress() as bar, deferred_interrupts():
            run.bar = bar
            for epoch in range(len(run.history), epochs):
                train_epoch(cfg, job, run, epoch, device, precision)
                run.partial = None
                if distributed.any_rank([interrupt_requested()])[0]:
                    raise Interrupted(f"kept {epoch + 1} finished epochs ({job.out / checkpointing.LAST})")
        path = finish(cfg, job, run, device)
    distributed.teardown()
    trained = sum(h["images"] for h in run.history[run.started:])
    summary("trained", trained, timer.seconds, "images", f"wrote {path}")
    return path


def prepare(cfg):
    """The split, its images decoded once, and where the run writes."""
    path = data.locate(cfg["data.path"], cfg["data.format"])
    dataset = data.open_dataset(path, cfg["data.format"])
    split = splits.classifier_split(dataset, cfg["seed"], cfg["encoder_training.num_classes"],
                                    cfg["encoder_training.train_per_class"], cfg["split.eval_per_class"])
    output = encoder_weights.default_path(cfg, path)
    size = cfg["data.image_size"]
    with Timer() as timer:
        train_x = decode(dataset, [m for m, _ in split.train], size, "decoding training images")
        eval_x = decode(dataset, [m for m, _ in split.eval], size, "decoding held-out images")
    summary("decoded", len(train_x) + len(eval_x), timer.seconds, "images", f"{(train_x.nbytes + eval_x.nbytes) / 2**30:.2f} GiB")
    name = "Tiny ImageNet" if dataset.format == "tiny-imagenet" else path.name
    return SimpleNamespace(
        split=split, out=checkpointing.folder(output), output=output, display=encoder.display_name(cfg["encoder.arch"]),
        description=f"{name} ({len(split.wnids)} classes)", train_x=train_x, eval_x=eval_x,
        train_y=torch.tensor([label for _, label in split.train]), eval_y=torch.tensor([label for _, label in split.eval]),
        dataset={"name": name, "file": path.name, "format": dataset.format, "fingerprint": split.fingerprint(dataset)})


def decode(dataset, members, size, what, batch=256):
    """uint8 (N, size, size, 3) of `members`, decoded in as many processes as there are cores."""
    out = torch.empty((len(members), size, size, 3), dtype=torch.uint8)
    with data.BatchDecoder(dataset, size, workers=max(1, host.cores())) as decoder, progress() as bar:
        task = bar.add_task(what, total=len(members), rate="")
        t0 = time.perf_counter()
        chunks = [members[s:s + batch] for s in range(0, len(members), batch)]
        for s, images in zip(range(0, len(members), batch), decoder.map(chunks)):
            out[s:s + len(images)] = torch.from_numpy(images)
            bar.update(task, advance=len(images), rate=rate_text(s + len(images), time.perf_counter() - t0, "images"))
    return out


def build(cfg, job, device, fresh):
    """The model (batch norm added where the arch has none), its optimiser, and the state to resume from."""
    arch, classes = cfg["encoder.arch"], len(job.split.wnids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds.derive_seed(cfg["seed"], "encoder_training"))
        model = encoder.build(arch, classes)
    wanted = cfg["encoder_training.batchnorm"]
    if wanted is True or (wanted == "auto" and not batchnorm.has_batchnorm(model)):
        batchnorm.add(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]  # biases and batch norm: no weight decay
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg["encoder_training.weight_decay"]},
                                 {"params": rest, "weight_decay": 0.0}], lr=cfg["encoder_training.lr"],
                                momentum=cfg["encoder_training.momentum"], nesterov=True)
    guard = checkpointing.guard(cfg, job.dataset["fingerprint"], distributed.world_size())
    last, partial = checkpointing.resume_point(job.out, guard, fresh)
    resumed = partial or last  # an in-progress state continues last.pt's
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
    net = DistributedDataParallel(model) if distributed.launched() else model
    history = last["history"] if last else []
    return SimpleNamespace(model=model, net=net, optimizer=optimizer, guard=guard, history=history,
                           started=len(history), partial=partial, bar=None, last_save=time.monotonic())


def input_size_at(cfg, epoch):
    """Progressive resizing: `min_input_size` for all epochs but the last `full_size_epochs`, which train at
    `encoder.input_size`, the size the held-out images are scored at and extraction feeds the encoder.
    Most epochs cost a fraction (a quarter at 112 of 224 px: docs/encoder-training.md)."""
    last = cfg["encoder_training.epochs"] - cfg["encoder_training.full_size_epochs"]
    return cfg["encoder.input_size"] if epoch >= last else min(cfg["encoder_training.min_input_size"], cfg["encoder.input_size"])


def lr_at(cfg, step, total):
    """The learning rate of optimiser step `step` of `total`: linear warm-up, then a cosine to zero."""
    peak, warm = cfg["encoder_training.lr"], round(cfg["encoder_training.warmup"] * total)
    if step < warm:
        return peak * (step + 1) / warm
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train_epoch(cfg, job, run, epoch, device, precision):
    """One epoch (from its beginning or from an in-progress checkpoint), its evaluation and checkpoint."""
    size = input_size_at(cfg, epoch)
    order, generator, start, sums = epoch_state(cfg, job, run, epoch)
    steps = len(order)
    task = run.bar.add_task(f"epoch {epoch + 1}/{cfg['encoder_training.epochs']} at {size} px", total=steps, rate="")
    run.bar.update(task, completed=start)
    t0, seconds_before = time.perf_counter(), run.partial["seconds"] if run.partial else 0.0

    def after_step(step, sums):
        if step == steps:
            return  # the epoch's own checkpoint follows
        run.bar.update(task, completed=step, rate=rate_text((step - start) * len(order[0]) * distributed.world_size(),
                                                           time.perf_counter() - t0, "images"))
        seconds = seconds_before + time.perf_counter() - t0
        if _checkpoint_due(cfg, run):
            state = in_progress_state(run, epoch, step, sums, generator, seconds)
            _save(job, checkpointing.IN_PROGRESS, state)
            run.last_save = time.monotonic()
            if interrupt_requested():
                raise Interrupted(f"kept epoch {epoch + 1} up to step {step} of {steps} ({job.out / checkpointing.IN_PROGRESS})")

    total = cfg["encoder_training.epochs"] * steps
    loss, images = train_one_epoch(run.net, run.optimizer, batches(cfg, job, order, start, size, generator, device),
                                   lambda step: lr_at(cfg, epoch * steps + step, total), start, sums, device, precision,
                                   cfg["encoder_training.label_smoothing"], after_step)
    seconds = seconds_before + time.perf_counter() - t0
    top1, top5, eval_loss = evaluate(run.model, job.eval_x, job.eval_y, cfg["encoder.input_size"], cfg["encoder.arch"],
                                     device, precision)
    run.bar.remove_task(task)
    entry = {"epoch": epoch + 1, "input_size": size, "train_loss": loss, "eval_loss": eval_loss, "top1": top1,
             "top5": top5, "seconds": seconds, "images": images, "images_per_s": images / max(seconds, 1e-9),
             "lr": lr_at(cfg, (epoch + 1) * steps - 1, total), "precision": precision,
             "minutes": (run.history[-1]["minutes"] if run.history else 0.0) + seconds / 60}
    run.history.append(entry)
    console.print(f"epoch {epoch + 1}: loss {loss:.4f}, held-out top-1 {top1:.1%}, top-5 {top5:.1%} "
                  f"({size} px, {seconds:.0f} s, {entry['images_per_s']:,.0f} images/s)")
    _save(job, checkpointing.LAST, {"guard": run.guard, "model": run.model.state_dict(),
                                    "optimizer": run.optimizer.state_dict(), "history": run.history})
    (job.out / checkpointing.IN_PROGRESS).unlink(missing_ok=True)
    _log(cfg, job, run, entry)
    run.last_save = time.monotonic()


def epoch_state(cfg, job, run, epoch):
    """(this rank's batches of image indices, the augmentation generator, the first step, loss sums) of the
    epoch: from its beginning, or as an in-progress checkpoint left it (then the global RNG too)."""
    world, rank, batch = distributed.world_size(), distributed.rank(), cfg["encoder_training.batch_size"]
    perm = torch.from_numpy(np.random.default_rng(seeds.derive_seed(cfg["seed"], "encoder_training", epoch))
                            .permutation(len(job.train_y)))
    steps = len(perm) // batch  # whole batches only: batch norm needs more than one image
    order = [perm[s * batch:(s + 1) * batch][rank::world] for s in range(steps)]
    generator = torch.Generator().manual_seed(seeds.derive_seed(cfg["seed"], "augment", epoch, rank))
    torch.manual_seed(seeds.derive_seed(cfg["seed"], "dropout", epoch, rank))
    if not run.partial:
        return order, generator, 0, (0.0, 0)
    mine = run.partial["ranks"][rank]
    generator.set_state(mine["generator"])
    torch.set_rng_state(mine["rng"])
    return order, generator, run.partial["step"], (mine["loss_sum"], mine["seen"])


def batches(cfg, job, order, start, size, generator, device):
    """(images, labels) of the epoch's batches `order` from step `start`, augmented (augment.py)."""
    for indices in order[start:]:
        x = augment.training_batch(job.train_x[indices], size, cfg["encoder_training.crop_scale"],
                                   cfg["encoder.arch"], generator, device)
        yield x.contiguous(memory_format=torch.channels_last), job.train_y[indices].to(device)


def train_one_epoch(net, optimizer, batches, lr, start, sums, device, precision, label_smoothing, after_step):
    """The steps from `start` on, at the learning rate `lr(step)`; returns (mean training loss, images), over
    all ranks. `sums`: this rank's (loss sum, images) of the steps before `start`; `after_step(step, sums)` runs
    between steps (it may checkpoint, or raise to stop), not after the last, which the epoch's checkpoint follows."""
    net.train()
    loss_sum, seen = sums
    step = start
    for step, (x, y) in enumerate(batches, start):
        for group in optimizer.param_groups:
            group["lr"] = lr(step)
        with runtime.autocast(device, precision):
            loss = F.cross_entropy(net(x).float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
        after_step(step + 1, (loss_sum, seen))
    loss_sum, seen = distributed.all_sum([loss_sum, seen], device)
    return loss_sum / max(seen, 1), int(seen)


@torch.no_grad()
def evaluate(model, images, labels, input_size, arch, device, precision, batch=EVAL_BATCH):
    """(top-1, top-5, loss) on the held-out images, preprocessed as extraction preprocesses; over all ranks."""
    model.eval()
    start, stop = distributed.share(len(labels), distributed.rank(), distributed.world_size())
    top1 = top5 = loss = 0.0
    for s in range(start, stop, batch):
        x = encoder.preprocess(images[s:min(s + batch, stop)].to(device), input_size, arch)
        y = labels[s:min(s + batch, stop)].to(device)
        with runtime.autocast(device, precision):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        best = logits.topk(min(5, logits.shape[1]), 1).indices
        top1 += (best[:, 0] == y).sum().item()
        top5 += (best == y[:, None]).any(1).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
    top1, top5, loss = distributed.all_sum([top1, top5, loss], device)
    return top1 / len(labels), top5 / len(labels), loss / len(labels)


def in_progress_state(run, epoch, step, sums, generator, seconds):
    ranks = distributed.gather({"generator": generator.get_state(), "rng": torch.get_rng_state(),
                                "loss_sum": sums[0], "seen": sums[1]})
    return {"guard": run.guard, "epoch": epoch, "step": step, "seconds": seconds, "ranks": ranks,
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()}


def finish(cfg, job, run, device):
    """Fold batch norm away, check the folded network computes what the trained one does, score it in fp32 as
    extraction runs it (the file's top-1 and top-5), write the file."""
    arch, classes = cfg["encoder.arch"], len(job.split.wnids)
    plain = encoder.build(arch, classes)
    folding = batchnorm.has_batchnorm(run.model) and not batchnorm.has_batchnorm(plain)
    plain.load_state_dict(batchnorm.fold(run.model.cpu()) if folding else run.model.state_dict())
    check = encoder.preprocess(job.eval_x[:8], cfg["encoder.input_size"], arch)
    with torch.no_grad():
        trained, folded = run.model.eval()(check), plain.eval()(check)
    if not torch.allclose(trained, folded, rtol=1e-3, atol=1e-3 * trained.abs().max().item()):
        raise RuntimeError(f"folding batch norm changed the logits by up to {(trained - folded).abs().max():.3g}")
    top1, top5, _ = evaluate(plain.to(device), job.eval_x, job.eval_y, cfg["encoder.input_size"], arch, device, "fp32")
    console.print(f"the saved network (fp32, batch norm folded): held-out top-1 {top1:.1%}, top-5 {top5:.1%}")
    record = {"state_dict": plain.cpu().state_dict(), "arch": arch, "num_classes": classes, "classes": job.split.wnids,
              "epochs": len(run.history), "top1": top1, "top5": top5, "seed": cfg["seed"], "dataset": job.dataset,
              "seconds": sum(h["seconds"] for h in run.history), "history": run.history,
              "machine": runtime.describe_device(device), "versions": host.versions(),
              "precision": run.history[-1]["precision"], "config_hash": config.digest(cfg)}
    return encoder_weights.save(job.output, record) if distributed.is_main() else job.output


def _checkpoint_due(cfg, run):
    minutes = cfg["encoder_training.checkpoint_minutes"]
    due = minutes is not None and time.monotonic() - run.last_save >= 60 * minutes
    stop, due = distributed.any_rank([interrupt_requested(), due])
    return stop or due


def _save(job, name, state):
    if distributed.is_main():
        checkpointing.save(job.out, name, state)
    distributed.barrier()


def _log(cfg, job, run, entry):
    """history.json and, with encoder_training.tensorboard, TensorBoard scalars: one point per epoch."""
    if not distributed.is_main():
        return
    checkpointing.write_history(job.out, run.history)
    if not cfg["encoder_training.tensorboard"]:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    # purge_step: whatever an interrupted run logged from this epoch on is dropped, so no epoch shows twice
    with SummaryWriter(job.out / "tensorboard", purge_step=entry["epoch"]) as writer:
        for name in ("train_loss", "eval_loss", "top1", "top5", "lr", "images_per_s", "input_size"):
            writer.add_scalar(name, entry[name], entry["epoch"])
