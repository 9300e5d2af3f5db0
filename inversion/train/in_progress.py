"""In-progress checkpoints: a decoder's state within an epoch, written every `train.checkpoint_minutes` and
on Ctrl-C or SIGTERM after the step in hand, and continued by a re-run at the next step exactly as the
uninterrupted run would have gone on (weights, optimiser, schedule, each rank's loss sums and random state)."""

import time

import torch

from inversion.core import checkpoints, config, distributed, host
from inversion.core.console import Interrupted, console, interrupt_requested
from inversion.train import batching


class Boundaries:
    """Between optimiser steps: an in-progress checkpoint when `train.checkpoint_minutes` have passed since the
    last checkpoint or a Ctrl-C / SIGTERM waits, then, for the latter, the stop. The ranks agree on both
    (`distributed.any_rank`), so they checkpoint and stop at the same step."""

    def __init__(self, cfg, run, steps, schedule, device):
        minutes = cfg["train.checkpoint_minutes"]
        self.cfg, self.run, self.steps, self.schedule, self.device = cfg, run, steps, schedule, device
        self.interval, self.last = None if minutes is None else minutes * 60, time.monotonic()

    def saved(self):
        self.last = time.monotonic()

    def after_step(self, epoch, skip, lr, seconds):
        """The `after_step` of epoch `epoch` (0-based) resumed after `skip` steps, whose first step ran at `lr`;
        `seconds()`: the epoch's training time so far."""
        def check(steps, total, seen):
            due = self.interval is not None and time.monotonic() - self.last >= self.interval
            stop, due = distributed.any_rank([interrupt_requested(), due])
            if not (stop or due):
                return
            path = self._write(epoch, skip + steps, lr, seconds(), total, seen)
            self.saved()
            if stop:
                distributed.barrier()  # no rank exits (and so has torchrun stop the others) before the write
                raise Interrupted(f"{self.run.guard['decoder']['layer']}: kept epoch {epoch + 1} up to step "
                                  f"{skip + steps} of {self.steps} ({path})")
        return check

    def _write(self, epoch, step, lr, seconds, total, seen):
        """Rank 0 writes what every rank needs to continue: the shared weights and optimiser state, and each
        rank's own loss sums, random state and objective counts."""
        run = self.run
        ranks = distributed.gather({"total": total.detach().cpu(), "seen": seen, "rng": rng_state(self.device),
                                    "counts": dict(run.objective.counts) if run.objective else {}})
        path = run.out / checkpoints.IN_PROGRESS
        if distributed.is_main():
            extra, extra_state = run.objective.state() if run.objective else ({}, {})
            checkpoints.save_in_progress(run.out, {
                **run.guard, "completed": len(run.history), "epoch": epoch + 1, "step": step, "steps": self.steps,
                "schedule_done": self.schedule.done, "lr": lr, "seconds": seconds, "order": run.order,
                "ranks": ranks, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "config_hash": config.digest(self.cfg), "versions": host.versions(), **extra, **extra_state})
        return path


def batch_order(cfg, data):
    """What an epoch's batches depend on besides (seed, layer, epoch): an in-progress checkpoint continues
    only under the same."""
    streamed = batching.is_streamed(data.train_x)
    return {"batch_size": cfg["train.batch_size"], "seed": cfg["seed"], "world": distributed.world_size(),
            "samples": len(data.train_x), "streamed": streamed,
            "shuffle_buffer": cfg["train.shuffle_buffer"] if streamed else None}


def resume(cfg, run, completed, steps):
    """The in-progress state of epoch `completed` + 1, loaded into the model and optimisers, or None."""
    state = checkpoints.load_in_progress(run.out, run.guard, completed, run.order)
    if state is None:
        return None
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # as in build: the schedule replays from this run's train.lr
        group["lr"] = cfg["train.lr"]
        group.pop("initial_lr", None)
    if run.objective:
        run.objective.load(state, state)
    console.print(f"{run.guard['decoder']['layer']}: continuing epoch {completed + 1} after step {state['step']} of "
                  f"{steps} ({run.out / checkpoints.IN_PROGRESS})")
    return state


def rng_state(device):
    """torch's global generators: the discriminator's dropout draws from them (seeded per epoch)."""
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}


def restore_rank_state(partial, run, device):
    """This rank's random state and objective counts as the in-progress checkpoint left them; returns its
    (loss sum, samples) so far."""
    mine = partial["ranks"][distributed.rank()]
    torch.set_rng_state(mine["rng"]["cpu"])
    if "cuda" in mine["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(mine["rng"]["cuda"], device)
    if run.objective:
        run.objective.counts.update(mine["counts"])
    return mine["total"].to(device), mine["seen"]
