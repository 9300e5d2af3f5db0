import os
import shutil
import signal
import time

import pytest
import torch

from conftest import Forked, cfg_in, epoch_losses, read_history, train, wait_at_batch
from inversion.core import checkpoints, console
from inversion.train import training

SCHEDULED = {"train.epochs": 2, "train.schedule": "cosine", "train.warmup": 0.3}  # 18 images, batch 4: 5 steps an epoch


def same_run(a, b):
    """Two decoder folders hold the same training: every weight, optimiser moment and history number (but
    the seconds) equal."""
    timeless = lambda history: [{k: v for k, v in h.items() if k not in ("seconds", "samples_per_s")} for h in history]
    la, lb = (torch.load(folder / "last.pt", weights_only=True) for folder in (a, b))
    oa, ob = (torch.load(folder / "optimizer.pt", weights_only=True) for folder in (a, b))
    assert timeless(la["history"]) == timeless(lb["history"])
    for key in ("model", "discriminator"):
        assert set(la.get(key, {})) == set(lb.get(key, {})) and all(torch.equal(la[key][k], lb[key][k]) for k in la.get(key, {}))
    for key in ("optimizer", "discriminator_optimizer"):
        for p, state in oa.get(key, {"state": {}})["state"].items():
            assert all(torch.equal(value, ob[key]["state"][p][name]) for name, value in state.items())
    assert not (b / "in-progress.pt").exists()


@pytest.mark.parametrize("sig, objective", [(signal.SIGTERM, {}), (signal.SIGINT, {"loss.adversarial": 0.1})],
                         ids=["sigterm-pixel", "ctrl-c-adversarial"])
def test_a_signal_mid_epoch_keeps_the_steps_and_the_resumed_run_equals_the_uninterrupted_one(
        built, tmp_path, sig, objective):
    """A scheduler's SIGTERM (and Ctrl-C) in epoch 2 after step 3: the step in hand finishes, an in-progress
    checkpoint keeps the 3 steps, and the re-run continues at step 4 into the very weights of a run never
    stopped (the adversarial case: the discriminator, its balance and its dropout's random state too)."""
    settings = {**SCHEDULED, **objective}
    straight = train(cfg_in(built, tmp_path / "straight", **settings))
    cfg = cfg_in(built, tmp_path / "stopped", **settings)
    reached, folder = tmp_path / "reached", tmp_path / "stopped/decoders/conv5"

    def stopped_in_epoch_2():
        wait_at_batch(5 + 4, reached)
        console.run(training.train)(cfg, ["conv5"])
    child = Forked(stopped_in_epoch_2)
    child.wait_for(reached)
    os.kill(child.pid, sig)
    assert child.wait() == 128 + sig, child.text()[-3000:]
    how = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert child.text().strip().splitlines()[-1] == (f"interrupted by {how}: conv5: kept epoch 2 up to step 3 of 5 "
                                                     f"({folder / 'in-progress.pt'}); re-run the same command to continue")
    # Part of an epoch is no epoch: not in the history, not in best.pt (what render.py reads)
    assert len(read_history(folder / "history.jsonl")) == 1
    assert len(checkpoints.load_decoder(folder / "best.pt")[1]["history"]) == 1
    resumed = train(cfg)
    assert [h["lr"] for h in resumed] == [h["lr"] for h in straight] and straight[0]["lr"] < straight[1]["lr"]
    same_run(tmp_path / "straight/decoders/conv5", folder)


def test_checkpoint_minutes_keeps_the_steps_through_a_kill_9_and_the_resume_is_exact(built, tmp_path, capsys):
    straight = train(cfg_in(built, tmp_path / "straight", **SCHEDULED))
    cfg = cfg_in(built, tmp_path / "killed", **SCHEDULED, **{"train.checkpoint_minutes": 1e-7})  # every step
    written, folder = tmp_path / "written", tmp_path / "killed/decoders/conv5"

    def killed_after_six_checkpoints():
        save, calls = checkpoints.save_in_progress, []

        def saving(out, state):
            save(out, state)
            calls.append(1)
            if len(calls) == 6:  # epoch 1's four (none after its last step), then epoch 2 after 2 steps
                written.touch()
                time.sleep(600)
        checkpoints.save_in_progress = saving
        training.train(cfg, ["conv5"])
    child = Forked(killed_after_six_checkpoints)
    child.wait_for(written)
    child.kill()  # kill -9: nothing orderly happens
    state = torch.load(folder / "in-progress.pt", weights_only=True)
    assert (state["completed"], state["epoch"], state["step"]) == (1, 2, 2)
    assert len(read_history(folder / "history.jsonl")) == 1

    guard = {key: state[key] for key in ("cache_hash", "holdout", "decoder")}
    assert checkpoints.load_in_progress(folder, guard, 1, state["order"])["step"] == 2
    assert checkpoints.load_in_progress(folder, guard, 1, dict(state["order"], batch_size=6)) is None
    assert "not used (it was written with batch_size 4, now 6); epoch 2 starts at its beginning" in capsys.readouterr().err
    shutil.copytree(tmp_path / "killed", tmp_path / "fresh")
    fresh = dict(cfg, **{"output.dir": str(tmp_path / "fresh")})
    assert epoch_losses(train(fresh, fresh=True)) == epoch_losses(straight)
    assert not (tmp_path / "fresh/decoders/conv5/in-progress.pt").exists()

    train(cfg)
    assert "conv5: continuing epoch 2 after step 2 of 5" in capsys.readouterr().err
    same_run(tmp_path / "straight/decoders/conv5", folder)
