"""train_encoder.py on the tiny data (SqueezeNet 1.1 at 64 px: nothing here depends on the arch but the
folding, which test_batchnorm checks on AlexNet): the weights file, resuming into the same weights, refusals."""

import json
import os
import signal
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from conftest import Forked, forked_ranks, make_cfg, wait_at_batch
from inversion.core import console, encoder, encoder_weights
from inversion.core.errors import UserError
from inversion.encoder_training import checkpointing, training

TINY = ("encoder.arch=squeezenet1_1", "encoder.input_size=64", "encoder_training.min_input_size=48", "encoder_training.full_size_epochs=1",
        "encoder_training.epochs=2", "encoder_training.batch_size=8", "encoder_training.warmup=0.2",
        "encoder_training.tensorboard=false")  # 40 training images: 5 steps an epoch


def tiny_cfg(tmp, data_path, *overrides):
    tmp.mkdir(parents=True, exist_ok=True)
    return make_cfg(tmp, data_path, *TINY, f"encoder_training.output={tmp}/encoders/tiny.pt", *overrides)


def timeless(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s", "minutes")} for h in history]


def test_writes_torchvisions_own_network_with_every_key_and_extraction_uses_it(tiny_zip, tmp_path):
    cfg = tiny_cfg(tmp_path, tiny_zip)
    path = training.train(cfg)
    record = torch.load(path, weights_only=True)
    assert set(record) == set(encoder_weights.KEYS)
    assert record["arch"] == "squeezenet1_1" and record["num_classes"] == 5 and record["epochs"] == 2
    assert record["classes"] == sorted(record["classes"]) and len(record["classes"]) == 5
    assert 0 <= record["top1"] <= record["top5"] <= 1 and record["dataset"]["name"] == "Tiny ImageNet"
    assert [h["input_size"] for h in record["history"]] == [48, 64]
    plain = torchvision.models.squeezenet1_1(num_classes=5)
    plain.load_state_dict(record["state_dict"])  # strict: torchvision's keys and shapes, no batch norm left
    assert {type(m) for m in plain.modules()} == {type(m) for m in torchvision.models.squeezenet1_1().modules()}
    assert (tmp_path / "encoders/tiny/history.json").is_file() and not (tmp_path / "encoders/tiny/in-progress.pt").exists()
    model, identity = encoder.load("squeezenet1_1", "auto", trained=encoder_weights.default_path(cfg, tiny_zip))
    assert identity["kind"] in ("trained", "imagenet")  # imagenet where torchvision's cache has the weights


def test_sigterm_mid_epoch_keeps_the_steps_and_the_resumed_run_writes_the_uninterrupted_weights(tiny_zip, tmp_path):
    straight = torch.load(training.train(tiny_cfg(tmp_path / "straight", tiny_zip)), weights_only=True)
    cfg = tiny_cfg(tmp_path / "stopped", tiny_zip)
    reached, folder = tmp_path / "reached", tmp_path / "stopped/encoders/tiny"

    def stopped_in_epoch_2():
        wait_at_batch(5 + 4, reached, module=training)
        console.run(training.train)(cfg)
    child = Forked(stopped_in_epoch_2)
    child.wait_for(reached)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait() == 128 + signal.SIGTERM, child.text()[-3000:]
    assert child.text().strip().splitlines()[-1] == (f"interrupted by SIGTERM: kept epoch 2 up to step 4 of 5 "
                                                     f"({folder / checkpointing.IN_PROGRESS}); re-run the same "
                                                     f"command to continue")
    assert not (tmp_path / "stopped/encoders/tiny.pt").exists()  # no weights file before the run is done
    resumed = torch.load(training.train(cfg), weights_only=True)
    assert timeless(resumed["history"]) == timeless(straight["history"])
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in straight["state_dict"].items())


def test_a_kill_after_an_epoch_resumes_from_it_and_other_settings_refuse_to(tiny_zip, tmp_path):
    cfg = tiny_cfg(tmp_path, tiny_zip, "encoder_training.epochs=1")
    first = torch.load(training.train(cfg), weights_only=True)
    longer = dict(cfg, **{"encoder_training.epochs": 2})
    with pytest.raises(UserError, match=r"holds a training run with other settings: encoder_training\.epochs 1 then, "
                                         r"2 now; re-run with --fresh"):
        training.train(longer)
    again = torch.load(training.train(cfg), weights_only=True)  # finished: nothing to train, the same file
    assert all(torch.equal(again["state_dict"][k], v) for k, v in first["state_dict"].items())
    assert len(torch.load(training.train(longer, fresh=True), weights_only=True)["history"]) == 2


def test_the_pipeline_runs_on_it_through_a_path_and_through_auto_and_every_output_names_it(tiny_zip, tmp_path,
                                                                                       monkeypatch):
    from inversion.extract import extraction
    from inversion.render import report
    from inversion.train import training as decoder_training

    cfg = tiny_cfg(tmp_path, tiny_zip, "encoder_training.epochs=1")
    path = training.train(cfg)

    def offline(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1, "get_state_dict", offline)
    for weights in (str(path), "auto"):
        run = dict(cfg, **{"encoder.weights": weights, "layers": ["flatten"], "render.top1": "auto",
                           "output.dir": str(tmp_path / f"out-{weights == 'auto'}"), "train.epochs": 1})
        extraction.extract(run)
        decoder_training.train(run, ["flatten"])
        report.render(run)
        out = Path(run["output.dir"])
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["encoder"]["kind"] == "trained" and metrics["encoder"]["path"] == str(path)
        named = "squeezenet1_1 trained here on Tiny ImageNet (5 classes, 1 epoch, top-1 "
        assert metrics["encoder_description"].startswith(named)
        assert named in (out / "results.md").read_text() and named in (out / "report.html").read_text()
        assert set(metrics["top1_true_class"]) == {"original", "flatten"} and "flatten" in metrics["top1_agreement"]
        with Image.open(out / "reconstructions.png") as im:
            assert named in im.info["Title"]


def test_two_ranks_train_it_together_and_rank_0_writes_the_file(tiny_zip, tmp_path):
    """Under torchrun (two Gloo processes as it starts them): each rank trains on its half of every batch, the
    held-out images are scored across both, and one file is written."""
    cfg = tiny_cfg(tmp_path, tiny_zip)
    ranks = forked_ranks(console.run(training.train), cfg)
    for rank in ranks:
        assert rank.wait() == 0, rank.text()[-3000:]
    record = torch.load(tmp_path / "encoders/tiny.pt", weights_only=True)
    assert [h["images"] for h in record["history"]] == [40, 40] and record["epochs"] == 2
    torchvision.models.squeezenet1_1(num_classes=5).load_state_dict(record["state_dict"])
    assert "wrote" in ranks[0].text() and not (tmp_path / "encoders/tiny/in-progress.pt").exists()
