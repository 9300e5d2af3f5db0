import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import Forked, cfg_in, epoch_losses, read_history, train
from inversion.core import checkpoints
from inversion.core.errors import UserError
from inversion.train import batching, training


def losses_of(history):
    return [(h["train_loss"], h["eval_loss"]) for h in history]


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
    assert epoch_losses(a) == epoch_losses(b)
    other = train(cfg_in(built, tmp_path / "c", **{"train.lr": 5e-4}))
    assert epoch_losses(other) != epoch_losses(a)


def test_two_epochs_equal_one_plus_resume_plus_one(built, tmp_path):
    straight = train(cfg_in(built, tmp_path / "straight", **{"train.epochs": 2}))
    train(cfg_in(built, tmp_path / "split", **{"train.epochs": 1}))
    resumed = train(cfg_in(built, tmp_path / "split", **{"train.epochs": 2}))
    assert epoch_losses(resumed) == epoch_losses(straight)
    a = torch.load(tmp_path / "straight/decoders/conv5/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split/decoders/conv5/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = train(cfg_in(built, tmp_path / "split", **{"train.epochs": 2}))
    assert epoch_losses(again) == epoch_losses(straight)  # nothing left to do


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
    assert epoch_losses(resumed) == epoch_losses(straight) and [h["lr"] for h in resumed] == [h["lr"] for h in straight]
    assert straight[0]["lr"] < straight[1]["lr"] > straight[2]["lr"]  # warm-up step, then the decay


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
    code = ("import sys, json; from inversion.train import training; "
            "training.train(json.loads(sys.argv[1]), ['conv5']); "
            "bad = [m for m in ('inversion.core.data', 'inversion.core.encoder', 'torchvision', 'PIL') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                            env={"TORCH_HOME": str(tmp_path / "no_torch_home"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


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


def test_the_perceptual_path_with_pixel_loss_alone_is_the_plain_loop(built, tmp_path, monkeypatch):
    """Drawing batches as row indices (so cached comparator features can ride along) keeps the order and
    the numbers of the plain loop: only the extra terms change what is learnt."""
    plain = train(cfg_in(built, tmp_path / "plain"))
    from inversion.train import losses
    monkeypatch.setattr(losses, "active", lambda cfg: True)
    routed = train(cfg_in(built, tmp_path / "routed"))
    assert losses_of(routed) == losses_of(plain)
    assert torch.load(tmp_path / "routed/decoders/conv5/last.pt", weights_only=True)["losses"]["loss.pixel"] == 1.0


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
    assert [h["precision"] for h in resumed] == ["bf16", "fp32"] and epoch_losses(resumed)[0] == epoch_losses(first)[0]
    assert resumed[1]["eval_loss"] == pytest.approx(fp32[1]["eval_loss"], rel=0.05)


def test_grad_clip_bounds_each_step():
    """Under plain SGD with lr 1 a step moves the weights by exactly the gradient: clipped, by `grad_clip`.
    (That a run under the default clip learns is test_training_lowers_the_eval_loss_and_writes_artifacts.)"""
    from inversion.core import decoders
    model = decoders.Decoder((8, 4, 4), width=0.125)
    x, y = torch.randn(16, 8, 4, 4) * 100, torch.randint(0, 255, (16, 64, 64, 3), dtype=torch.uint8)

    def step_size(clip):
        trial = decoders.Decoder((8, 4, 4), width=0.125)
        trial.load_state_dict(model.state_dict())
        before = torch.cat([p.detach().flatten().clone() for p in trial.parameters()])
        optimizer = torch.optim.SGD(trial.parameters(), lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        training.train_one_epoch(trial, optimizer, schedule, [(x, y, len(x))], torch.device("cpu"), lambda n: None,
                                 grad_clip=clip)
        return (torch.cat([p.detach().flatten() for p in trial.parameters()]) - before).norm().item()

    assert step_size(None) > 0.1 and step_size(0.01) == pytest.approx(0.01, rel=1e-3)
