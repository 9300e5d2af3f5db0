import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import Forked, read_history, wait_at_batch
from inversion.core import checkpoints, console, feature_cache, host
from inversion.train import batching, training, schedules
from inversion.core.errors import UserError


def cfg_in(built, tmp_path, **overrides):
    cfg, _ = built
    return dict(cfg, **{"output.dir": str(tmp_path), **overrides})


def train(cfg, fresh=False):
    return training.train(cfg, ["conv5"], fresh=fresh)["conv5"]


def losses(history):
    return [(h["epoch"], h["train_loss"], h["eval_loss"]) for h in history]


def test_training_lowers_the_eval_loss_and_writes_artifacts(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 6})
    history = train(cfg)
    assert len(history) == 6 and history[-1]["eval_loss"] < 0.7 * history[0]["eval_loss"]
    folder = tmp_path / "decoders" / "conv5"
    assert {p.name for p in folder.iterdir()} == {"last.pt", "best.pt", "optimizer.pt", "history.jsonl"}
    assert read_history(folder / "history.jsonl") == history
    model, checkpoint = checkpoints.load_decoder(folder / "best.pt")
    assert checkpoint["cache_hash"] and checkpoint["decoder"]["layer"] == "conv5" and checkpoint["versions"]
    with h5py.File(built[1], "r") as f:  # the tiny split is under 2,048 samples: the statistics use them all
        features = torch.from_numpy(f["train/conv5"][()]).float()
    assert torch.allclose(model.input_mean.flatten(), features.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.input_std.flatten(), training.standardisation(features.numpy())[1])


def test_standardisation_samples_the_whole_class_ordered_split_and_floors_dead_units():
    features = np.zeros((10_000, 3), np.float32)
    features[5_000:, 0] = 1.0                          # the second half of the classes is brighter
    features[:, 1] = np.random.default_rng(0).normal(5.0, 2.0, 10_000)
    mean, std = training.standardisation(features)     # column 2: a dead unit, always 0
    mean, std = mean.tolist(), std.tolist()             # plain floats: pytest.approx iterates over tensors
    assert mean[0] == pytest.approx(0.5, abs=0.01) and mean[1] == pytest.approx(5.0, abs=0.2)
    assert std[1] == pytest.approx(2.0, rel=0.1)
    assert std[2] == pytest.approx(0.1 * (std[0] + std[1] + 0.0) / 3, rel=0.2)  # not ~0: floored


def test_same_seed_same_history_and_seed_matters(built, tmp_path):
    a = train(cfg_in(built, tmp_path / "a"))
    b = train(cfg_in(built, tmp_path / "b"))
    assert losses(a) == losses(b)
    other = train(cfg_in(built, tmp_path / "c", **{"train.lr": 5e-4}))
    assert losses(other) != losses(a)


def test_two_epochs_equal_one_plus_resume_plus_one(built, tmp_path):
    straight = train(cfg_in(built, tmp_path / "straight", **{"train.epochs": 2}))
    train(cfg_in(built, tmp_path / "split", **{"train.epochs": 1}))
    resumed = train(cfg_in(built, tmp_path / "split", **{"train.epochs": 2}))
    assert losses(resumed) == losses(straight)
    a = torch.load(tmp_path / "straight/decoders/conv5/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split/decoders/conv5/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = train(cfg_in(built, tmp_path / "split", **{"train.epochs": 2}))
    assert losses(again) == losses(straight)  # nothing left to do


def test_a_run_killed_mid_schedule_resumes_on_the_same_learning_rates(built, tmp_path, monkeypatch):
    cfg = {"train.epochs": 3, "train.schedule": "cosine", "train.warmup": 0.3}
    straight = train(cfg_in(built, tmp_path / "straight", **cfg))
    evaluate, calls = training.evaluate, []

    def killed_in_epoch_2(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(training, "evaluate", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_in(built, tmp_path / "killed", **cfg))
    monkeypatch.setattr(training, "evaluate", evaluate)
    resumed = train(cfg_in(built, tmp_path / "killed", **cfg))
    assert losses(resumed) == losses(straight) and [h["lr"] for h in resumed] == [h["lr"] for h in straight]
    assert straight[0]["lr"] < straight[1]["lr"] > straight[2]["lr"]  # warm-up step, then the decay


def test_streamed_input_trains_like_in_memory_input_up_to_order(built, tmp_path, monkeypatch):
    seen = []  # per training batch, the images it held (as bytes: one key per image)
    real = batching.batches

    def recording(*args):
        for x, y, n in real(*args):
            seen.append([bytes(image.numpy()) for image in y])
            yield x, y, n
    monkeypatch.setattr(batching, "batches", recording)
    runs = {}
    for mode in (True, False):
        seen.clear()
        history = train(cfg_in(built, tmp_path / str(mode), **{"train.in_memory": mode, "train.shuffle_buffer": 5}))
        epochs = [sum(seen[i * 5:(i + 1) * 5], []) for i in range(2)]  # 18 images in batches of 4: 5 a epoch
        runs[mode] = history, epochs
        assert len(seen) == 10 and all(len(set(epoch)) == 18 == len(epoch) for epoch in epochs)  # each image once
    (memory, memory_order), (streamed, streamed_order) = runs[True], runs[False]
    assert sorted(memory_order[0]) == sorted(streamed_order[0]) and memory_order != streamed_order
    assert [h["samples"] for h in streamed] == [h["samples"] for h in memory] == [18, 18]
    for a, b in zip(streamed, memory):  # the same data and initialisation; only the order differs
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=0.25)


def test_changed_decoder_config_refuses_to_resume_until_fresh(built, tmp_path):
    train(cfg_in(built, tmp_path, **{"train.epochs": 1}))
    wider = cfg_in(built, tmp_path, **{"train.epochs": 2, "decoder.width": 0.25})
    with pytest.raises(UserError, match="--fresh"):
        train(wider)
    assert len(train(wider, fresh=True)) == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(built, tmp_path):
    train(cfg_in(built, tmp_path, **{"train.epochs": 1}))
    last = tmp_path / "decoders/conv5/last.pt"
    before = last.read_bytes()
    with pytest.raises(UserError, match=r"loss became (nan|inf).*kept .*last\.pt \(epoch 1\)"):
        train(cfg_in(built, tmp_path, **{"train.epochs": 2, "train.lr": 1e30}))
    assert last.read_bytes() == before


def test_no_cache_says_which_command_to_run(built, tmp_path):
    with pytest.raises(UserError, match="extract_features.py"):
        train(cfg_in(built, tmp_path, **{"cache.dir": str(tmp_path / "empty")}))


def test_training_needs_neither_encoder_weights_nor_the_dataset(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"data.path": str(tmp_path / "nowhere.zip"), "train.epochs": 1})
    code = ("import sys, json; from inversion import training; "
            "training.train(json.loads(sys.argv[1]), ['conv5']); "
            "bad = [m for m in ('inversion.core.data', 'inversion.core.encoder', 'torchvision', 'PIL') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                            env={"TORCH_HOME": str(tmp_path / "no_torch_home"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_checkpoints_from_before_image_size_load_as_64_pixel_decoders(built, tmp_path):
    train(cfg_in(built, tmp_path, **{"train.epochs": 1}))
    path = tmp_path / "decoders/conv5/last.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["decoder"].pop("out_size") == 64
    torch.save(checkpoint, tmp_path / "old.pt")
    model, _ = checkpoints.load_decoder(tmp_path / "old.pt")
    assert model(torch.zeros(1, 256, 6, 6)).shape == (1, 3, 64, 64)


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # as a full disk or a bad copy leaves it


def test_damaged_last_pt_resumes_from_best_pt_or_asks_for_fresh(built, tmp_path, capsys):
    straight = train(cfg_in(built, tmp_path / "straight"))
    cfg = cfg_in(built, tmp_path / "cut", **{"train.epochs": 1})
    train(cfg)
    folder = tmp_path / "cut/decoders/conv5"
    shutil.copyfile(folder / "best.pt", folder / "copy")  # two files, as a copied folder holds them
    (folder / "copy").replace(folder / "best.pt")
    truncate(folder / "last.pt")
    damaged = (folder / "last.pt").read_bytes()
    with pytest.raises(checkpoints.DamagedCheckpoint, match=r"last\.pt is damaged"):
        checkpoints.load_decoder(folder / "last.pt")
    capsys.readouterr()
    resumed = train(dict(cfg, **{"train.epochs": 2}))  # best.pt (epoch 1) is intact: resume from it
    err = capsys.readouterr().err
    assert f"{folder / 'last.pt'} is damaged" in err and "resuming from" in err and "best.pt (epoch 1)" in err
    assert losses(resumed) == losses(straight)  # optimizer.pt is epoch 1's too: exactly the same run
    assert (folder / "last.pt.damaged").read_bytes() == damaged  # set aside, not overwritten

    truncate(folder / "last.pt")  # now the same file as best.pt (epoch 2 is the best): both are cut
    with pytest.raises(UserError) as raised:
        train(dict(cfg, **{"train.epochs": 3}))
    message = str(raised.value)
    assert message.startswith(f"{folder / 'last.pt'} is damaged") and "--layers conv5 --fresh" in message
    assert "\n" not in message
    assert len(train(dict(cfg, **{"train.epochs": 1}), fresh=True)) == 1


def test_best_pt_is_last_pt_when_the_last_epoch_is_best_and_holds_no_optimiser_state(built, tmp_path, monkeypatch):
    losses_by_epoch = iter([0.5, 0.4, 0.9])  # epochs 1 and 2 improve, epoch 3 does not
    monkeypatch.setattr(training, "evaluate", lambda *args: next(losses_by_epoch))
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 2})
    train(cfg)
    folder = tmp_path / "decoders/conv5"
    assert os.path.samefile(folder / "best.pt", folder / "last.pt")  # the weights are on disk once
    best = torch.load(folder / "best.pt", weights_only=True)
    assert "optimizer" not in best and len(best["history"]) == 2
    assert torch.load(folder / "optimizer.pt", weights_only=True)["epoch"] == 2
    train(dict(cfg, **{"train.epochs": 3}))
    assert not os.path.samefile(folder / "best.pt", folder / "last.pt")
    assert len(torch.load(folder / "best.pt", weights_only=True)["history"]) == 2  # epoch 2 stays the best
    assert len(torch.load(folder / "last.pt", weights_only=True)["history"]) == 3


def test_a_missing_optimizer_state_resumes_the_weights_and_says_so(built, tmp_path, capsys):
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 1})
    train(cfg)
    (tmp_path / "decoders/conv5/optimizer.pt").unlink()
    capsys.readouterr()
    history = train(dict(cfg, **{"train.epochs": 2}))
    assert len(history) == 2 and "resuming the weights with a fresh optimiser state" in capsys.readouterr().err


def as_previous_format(folder):
    """Rewrite a decoder folder as the code before optimizer.pt wrote it: `last.pt` and `best.pt` two full
    files, each with Adam's state inside, and a decoder spec without fc_width (which then means 4096)."""
    checkpoint = torch.load(folder / "last.pt", weights_only=True)
    checkpoint["optimizer"] = torch.load(folder / "optimizer.pt", weights_only=True)["optimizer"]
    checkpoint["decoder"].pop("fc_width", None)
    for name in ("last.pt", "best.pt"):
        (folder / name).unlink()
        torch.save(checkpoint, folder / name)
    (folder / "optimizer.pt").unlink()


def test_checkpoints_in_the_previous_format_resume_and_render(built, tmp_path):
    from inversion.render import report

    straight = train(cfg_in(built, tmp_path / "straight"))
    cfg = cfg_in(built, tmp_path / "old", **{"train.epochs": 1})
    train(cfg)
    as_previous_format(tmp_path / "old/decoders/conv5")
    result = report.render(cfg, ["conv5"])
    assert set(result["report"]["layers"]) == {"conv5"}
    assert losses(train(dict(cfg, **{"train.epochs": 2}))) == losses(straight)


def test_a_second_training_of_the_same_decoder_refuses_naming_the_first(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 1})
    lock = tmp_path / "decoders/conv5/train.lock"
    started = tmp_path / "started"

    def slowly():
        training.train_one_epoch = lambda *a: (started.touch(), time.sleep(60))
        training.train(cfg, ["conv5"])
    first = Forked(slowly)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not started.exists():
            time.sleep(0.02)
        with pytest.raises(UserError, match=rf"another process \(pid {first.pid}\) is writing .*decoders/conv5"):
            train(cfg)
        assert lock.read_text().strip() == str(first.pid) and not (lock.parent / "last.pt").exists()
    finally:
        first.kill()
    assert len(train(cfg)) == 1  # the kernel let go of the killed one's lock
    assert not lock.exists()


def test_auto_epochs_follow_the_device_and_are_printed(built, tmp_path, capsys):
    assert training.resolve_epochs("auto", torch.device("cpu")) == 3
    assert training.resolve_epochs("auto", torch.device("cuda")) == 30
    assert training.resolve_epochs(2, torch.device("cuda")) == 2
    cfg = cfg_in(built, tmp_path, **{"train.epochs": "auto", "train.schedule": "cosine"})
    history = training.train(cfg, ["fc8"])["fc8"]
    assert len(history) == 3 and "3 epochs (train.epochs: auto on cpu)" in capsys.readouterr().err


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


def test_holdout_evaluates_on_seeded_train_images_the_same_for_every_layer(built, tmp_path, capsys):
    x = np.arange(20)[:, None].repeat(3, axis=1)
    (kx, ky), (hx, hy) = batching.hold_out(x, x[:, 0], 0.25, seed=0)
    assert len(hx) == 5 and len(kx) == 15 and not set(hx[:, 0]) & set(kx[:, 0]) and (hy == hx[:, 0]).all()
    (_, _), (again, _) = batching.hold_out(x * 2, x[:, 0], 0.25, seed=0)
    assert (again == 2 * hx).all()  # the same rows, whatever the layer's features
    (_, _), (other, _) = batching.hold_out(x, x[:, 0], 0.25, seed=1)
    assert (other != hx).any()
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 1, "train.holdout": 0.25})
    history = train(cfg)
    assert history[0]["samples"] == 18 - round(0.25 * 18) and "held-out training images" in capsys.readouterr().err
    assert history[0]["eval_loss"] != train(cfg_in(built, tmp_path / "plain", **{"train.epochs": 1}))[0]["eval_loss"]
    with pytest.raises(UserError, match="trained with holdout 0.25, now 0.0; pass --fresh"):
        train(dict(cfg, **{"train.holdout": 0.0, "train.epochs": 2}))
    with pytest.raises(UserError, match="train.holdout needs the training split in memory"):
        train(cfg_in(built, tmp_path / "streamed", **{"train.holdout": 0.25, "train.in_memory": False}))


def test_in_memory_auto_follows_memavailable_not_memfree(built, tmp_path, monkeypatch):
    """A full page cache shrinks MemFree but not MemAvailable; when auto followed MemFree, one of two
    default runs streamed conv2 (another batch order) and the histories differed."""
    meminfo = dict(line.split(":") for line in open("/proc/meminfo").read().splitlines())
    assert host.available_ram() == int(meminfo["MemAvailable"].split()[0]) * 1024
    with feature_cache.open_for(built[0], ["conv5"]) as cache:
        nbytes = cache["train"]["conv5"].nbytes + cache["train"]["images"].nbytes
        for ram, streamed in ((2 * nbytes - 1, True), (2 * nbytes + 1, False)):
            monkeypatch.setattr(host, "available_ram", lambda: ram)
            x, _ = batching.inputs(cache, "train", "conv5", "auto", torch.device("cpu"))
            assert isinstance(x, h5py.Dataset) == streamed


def test_the_perceptual_path_with_pixel_loss_alone_is_the_plain_loop(built, tmp_path, monkeypatch):
    """Drawing batches as row indices (so cached comparator features can ride along) keeps the order and
    the numbers of the plain loop: only the extra terms change what is learnt."""
    plain = train(cfg_in(built, tmp_path / "plain"))
    from inversion.train import losses
    monkeypatch.setattr(losses, "active", lambda cfg: True)
    routed = train(cfg_in(built, tmp_path / "routed"))
    assert losses_of(routed) == losses_of(plain)
    assert torch.load(tmp_path / "routed/decoders/conv5/last.pt", weights_only=True)["losses"]["loss.pixel"] == 1.0


def losses_of(history):
    return [(h["train_loss"], h["eval_loss"]) for h in history]


def test_bf16_trains_on_the_cpu_with_fp32_checkpoints_and_resumes_under_fp32(built, tmp_path, capsys):
    fp32 = train(cfg_in(built, tmp_path / "fp32", **{"train.epochs": 2}))
    cfg = cfg_in(built, tmp_path / "mixed", **{"train.epochs": 1, "precision": "bf16"})
    first = train(cfg)
    assert "threads), bf16, " in " ".join(capsys.readouterr().err.split())  # the line naming the device
    folder = tmp_path / "mixed/decoders/conv5"
    checkpoint = torch.load(folder / "last.pt", weights_only=True)
    state = torch.load(folder / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert checkpoint["precision"] == "bf16" and first[0]["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in checkpoint["model"].values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for s in state.values() for v in s.values() if v.dim())
    # bf16 computes other numbers than fp32, close to them
    assert first[0]["train_loss"] != fp32[0]["train_loss"]
    assert first[0]["eval_loss"] == pytest.approx(fp32[0]["eval_loss"], rel=0.05)
    resumed = train(dict(cfg, **{"train.epochs": 2, "precision": "fp32"}))  # precision is not pinned
    assert [h["precision"] for h in resumed] == ["bf16", "fp32"] and losses(resumed)[0] == losses(first)[0]
    assert resumed[1]["eval_loss"] == pytest.approx(fp32[1]["eval_loss"], rel=0.05)


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
    assert losses(train(fresh, fresh=True)) == losses(straight)
    assert not (tmp_path / "fresh/decoders/conv5/in-progress.pt").exists()

    train(cfg)
    assert "conv5: continuing epoch 2 after step 2 of 5" in capsys.readouterr().err
    same_run(tmp_path / "straight/decoders/conv5", folder)
