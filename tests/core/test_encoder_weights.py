"""The weights file of an encoder trained here, as `encoder.weights` reads it: its keys, where `auto` looks,
its place in `auto`'s order, and one line for every file that cannot be used."""

import urllib.error

import pytest
import torch
import torchvision

from inversion.core import config, encoder, encoder_weights
from inversion.core.errors import UserError

WNIDS = [f"n{i:08d}" for i in range(5)]


def record(arch="squeezenet1_1", num_classes=5, **changes):
    torch.manual_seed(3)
    model = torchvision.models.get_model(arch, num_classes=num_classes)
    return {"state_dict": model.state_dict(), "arch": arch, "num_classes": num_classes, "classes": WNIDS[:num_classes],
            "epochs": 16, "top1": 0.413, "top5": 0.682, "seed": 0,
            "dataset": {"name": "Tiny ImageNet", "file": "tiny-imagenet-200.zip", "format": "tiny-imagenet",
                        "fingerprint": "f" * 16},
            "seconds": 3600.0, "machine": "cpu (test)", "versions": {}, "precision": "bf16", "config_hash": "c" * 16,
            "history": [], **changes}


def test_a_written_file_loads_as_the_trained_encoder_and_names_it(tmp_path):
    path = encoder_weights.save(tmp_path / "enc.pt", record())
    assert set(torch.load(path, weights_only=True)) == set(encoder_weights.KEYS)
    model, identity = encoder.load("squeezenet1_1", str(path))
    assert model.classifier[1].out_channels == 5 and not model.training
    assert identity["kind"] == "trained" and identity["classes"] == WNIDS and len(identity["sha256"]) == 64
    assert encoder.describe(identity) == "squeezenet1_1 trained here on Tiny ImageNet (5 classes, 16 epochs, top-1 41.3 %)"
    assert encoder.is_pretrained(identity) and encoder.reload(identity) is not None
    with pytest.raises(ValueError, match="needs top1"):
        encoder_weights.save(tmp_path / "x.pt", {k: v for k, v in record().items() if k != "top1"})


def test_files_that_cannot_be_used_end_in_one_line_naming_them(tmp_path):
    other_arch = encoder_weights.save(tmp_path / "alexnet.pt", record("alexnet", 5))
    with pytest.raises(UserError, match=r"alexnet\.pt holds a trained alexnet, not encoder\.arch squeezenet1_1"):
        encoder.load("squeezenet1_1", str(other_arch))
    wrong_count = tmp_path / "count.pt"
    torch.save(record(num_classes=5) | {"num_classes": 7, "classes": WNIDS + ["a", "b"]}, wrong_count)
    with pytest.raises(UserError, match=r"count\.pt does not fit torchvision's squeezenet1_1 \(size mismatch"):
        encoder.load("squeezenet1_1", str(wrong_count))
    torch.save(record() | {"classes": WNIDS[:3]}, tmp_path / "names.pt")
    with pytest.raises(UserError, match=r"names\.pt names 3 classes for num_classes 5"):
        encoder.load("squeezenet1_1", str(tmp_path / "names.pt"))
    torch.save({k: v for k, v in record().items() if k not in ("top1", "seed")}, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"old\.pt lacks top1, seed; train it again"):
        encoder.load("squeezenet1_1", str(tmp_path / "old.pt"))
    (tmp_path / "damaged.pt").write_bytes(open(other_arch, "rb").read()[:5000])
    with pytest.raises(UserError, match=r"cannot read .*damaged\.pt"):
        encoder.load("alexnet", str(tmp_path / "damaged.pt"))
    with pytest.raises(UserError, match=r"no such file: .*absent\.pt"):
        encoder.load("alexnet", str(tmp_path / "absent.pt"))


def test_auto_takes_imagenet_weights_then_the_file_trained_here_then_random(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch/hub/checkpoints" / encoder.hub_checkpoint("squeezenet1_1").name
    trained = encoder_weights.save(tmp_path / "encoders/squeezenet1_1-tiny.pt", record())

    def offline(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1, "get_state_dict", offline)
    assert encoder.load("squeezenet1_1", "auto", trained=trained)[1]["kind"] == "trained"
    assert encoder.load("squeezenet1_1", "auto", trained=tmp_path / "none.pt")[1]["kind"] == "random"
    assert "train one here with python train_encoder.py (it writes" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub.parent.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), hub)
    assert encoder.load("squeezenet1_1", "auto", trained=trained)[1]["kind"] == "imagenet"


def test_the_default_path_names_the_arch_the_dataset_and_what_differs(tmp_path):
    cfg = config.defaults()
    assert encoder_weights.default_path(cfg, "/data/tiny-imagenet-200.zip").as_posix() == \
        "encoders/alexnet-tiny-imagenet-200.pt"
    cfg.update({"encoder_training.num_classes": 20, "encoder_training.train_per_class": 100, "seed": 2})
    assert encoder_weights.default_path(cfg, "/data/photos").name == "alexnet-photos-20classes-100perclass-seed2.pt"
    cfg["encoder_training.output"] = str(tmp_path / "mine.pt")
    assert encoder_weights.default_path(cfg, "/data/photos") == tmp_path / "mine.pt"
