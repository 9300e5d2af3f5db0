"""The learning-rate schedule of decoder training, stepped once per optimiser step and replayed on resume."""

import warnings

import torch


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


class _Held(torch.optim.lr_scheduler.LRScheduler):
    """`train.lr` held: the no-schedule schedule, so the loop always has one to step."""

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]


class _Capped:
    """A schedule that stops stepping at its last step."""

    def __init__(self, schedule, total):
        self.schedule, self.total, self.done = schedule, total, 0

    def step(self):
        if self.done < self.total - 1:
            self.schedule.step()
        self.done += 1
