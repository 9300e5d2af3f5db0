import json
import subprocess
import sys

import pytest
import torch

from inversion import training
from inversion.errors import UserError


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
    assert {p.name for p in folder.iterdir()} == {"last.pt", "best.pt", "history.jsonl"}
    assert training.read_history(folder / "history.jsonl") == history
    model, checkpoint = training.load_decoder(folder / "last.pt")
    assert checkpoint["cache_hash"] and checkpoint["decoder"]["layer"] == "conv5" and checkpoint["versions"]
    assert model.input_scale.item() != 1.0


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


def test_streamed_input_trains_like_in_memory_input_up_to_order(built, tmp_path):
    streamed = train(cfg_in(built, tmp_path, **{"train.in_memory": False, "train.shuffle_buffer": 5}))
    assert len(streamed) == 2 and all(h["samples"] == 18 for h in streamed)


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
    code = (f"import sys, json; from inversion import training; "
            f"training.train(json.loads(sys.argv[1]), ['conv5']); "
            f"bad = [m for m in ('inversion.data', 'inversion.encoder', 'torchvision', 'PIL') if m in sys.modules]; "
            f"assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                            env={"TORCH_HOME": str(tmp_path / "no_torch_home"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_checkpoints_from_before_image_size_load_as_64_pixel_decoders(built, tmp_path):
    train(cfg_in(built, tmp_path, **{"train.epochs": 1}))
    path = tmp_path / "decoders/conv5/last.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["decoder"].pop("out_size") == 64
    torch.save(checkpoint, tmp_path / "old.pt")
    model, _ = training.load_decoder(tmp_path / "old.pt")
    assert model(torch.zeros(1, 256, 6, 6)).shape == (1, 3, 64, 64)


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # as a full disk or a bad copy leaves it


def test_damaged_last_pt_resumes_from_best_pt_or_asks_for_fresh(built, tmp_path, capsys):
    straight = train(cfg_in(built, tmp_path / "straight"))
    cfg = cfg_in(built, tmp_path / "cut", **{"train.epochs": 1})
    train(cfg)
    folder = tmp_path / "cut/decoders/conv5"
    truncate(folder / "last.pt")
    damaged = (folder / "last.pt").read_bytes()
    with pytest.raises(training.DamagedCheckpoint, match=r"last\.pt is damaged"):
        training.load_decoder(folder / "last.pt")
    capsys.readouterr()
    resumed = train(dict(cfg, **{"train.epochs": 2}))  # best.pt (epoch 1) is intact: resume from it
    err = capsys.readouterr().err
    assert f"{folder / 'last.pt'} is damaged" in err and "resuming from" in err and "best.pt (epoch 1)" in err
    assert losses(resumed) == losses(straight)
    assert (folder / "last.pt.damaged").read_bytes() == damaged  # set aside, not overwritten

    truncate(folder / "last.pt")
    truncate(folder / "best.pt")
    with pytest.raises(UserError) as raised:
        train(dict(cfg, **{"train.epochs": 3}))
    message = str(raised.value)
    assert message.startswith(f"{folder / 'last.pt'} is damaged") and "--layers conv5 --fresh" in message
    assert "\n" not in message
    assert len(train(dict(cfg, **{"train.epochs": 1}), fresh=True)) == 1


def test_a_second_training_of_the_same_decoder_refuses_naming_the_first(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 1})
    lock = tmp_path / "decoders/conv5/train.lock"
    code = ("import sys, json, time; from inversion import training; real = training._train_epoch\n"
            "def slow(*a):\n    print('training', flush=True); time.sleep(60); return real(*a)\n"
            "training._train_epoch = slow; training.train(json.loads(sys.argv[1]), ['conv5'])")
    first = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg)], stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.DEVNULL)
    try:
        assert first.stdout.readline().strip() == "training"
        with pytest.raises(UserError, match=rf"another process \(pid {first.pid}\) is writing .*decoders/conv5"):
            train(cfg)
        assert lock.read_text().strip() == str(first.pid) and not (lock.parent / "last.pt").exists()
    finally:
        first.kill()
        first.wait()
    assert len(train(cfg)) == 1  # the kernel let go of the killed one's lock
    assert not lock.exists()


def test_auto_epochs_follow_the_device_and_are_printed(built, tmp_path, capsys):
    assert training.resolve_epochs("auto", torch.device("cpu")) == 5
    assert training.resolve_epochs("auto", torch.device("cuda")) == 30
    assert training.resolve_epochs(2, torch.device("cuda")) == 2
    cfg = cfg_in(built, tmp_path, **{"train.epochs": "auto", "train.schedule": "cosine"})
    history = training.train(cfg, ["fc8"])["fc8"]
    assert len(history) == 5 and "5 epochs (train.epochs: auto on cpu)" in capsys.readouterr().err
