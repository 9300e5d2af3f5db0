import math

import pytest
import torch

from inversion.train import schedules


def lrs_of(cfg, total, steps, done=0):
    """The learning rate of each of `steps` optimiser steps of a `total`-step schedule, from step `done`."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg["train.lr"])
    schedule = schedules.lr_schedule(optimizer, cfg, total, done)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_lr_warms_up_linearly_then_holds_or_decays_to_zero_on_a_cosine():
    cfg = {"train.lr": 1.0, "train.warmup": 0.2, "train.schedule": "cosine"}
    lrs = lrs_of(cfg, 10, 13)
    assert lrs[:3] == [0.5, 1.0, 1.0]  # two warm-up steps, then the cosine starts at the peak
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a > b for a, b in zip(lrs[2:10], lrs[3:10]))
    assert lrs[10:] == [lrs[9]] * 3  # a streamed epoch's extra steps keep the last rate
    assert lrs_of(cfg, 10, 6, done=4) == pytest.approx(lrs[4:10])  # a resumed run replays its steps
    held = lrs_of(dict(cfg, **{"train.schedule": "none"}), 10, 10)
    assert held == [0.5] + [1.0] * 9
    assert lrs_of(dict(cfg, **{"train.schedule": "none", "train.warmup": 0.0}), 10, 10) == [1.0] * 10
