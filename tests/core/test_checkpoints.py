import os
import shutil

import pytest
import torch

from conftest import cfg_in, epoch_losses, train
from inversion.core import checkpoints, decoders
from inversion.core.errors import UserError
from inversion.train import training


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # as a full disk or a bad copy leaves it


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


def test_a_layout_is_kept_in_the_checkpoint_spec_only_where_it_is_not_the_old_default():
    assert decoders.spec((192, 13, 13), "chw") == {} and decoders.spec((1000,), "vector") == {}
    assert decoders.spec((14, 14, 384), "hwc") == {"layout": "hwc"}
    with pytest.raises(ValueError, match="cannot be in layout"):
        decoders.Decoder((197, 768), layout="chw")
    with pytest.raises(ValueError, match="not 1 \\+ a square grid"):
        decoders.Decoder((198, 768), layout="cls_tokens")


@pytest.mark.parametrize("shape, layout", [((6, 6, 32), "hwc"), ((37, 16), "cls_tokens"), ((192, 13, 13), "chw")])
def test_load_decoder_rebuilds_the_layout_from_the_checkpoint_spec(tmp_path, shape, layout):
    from inversion.core import checkpoints
    model = decoders.Decoder(shape, layout=layout)
    model.input_mean.normal_()
    spec = {"layer": "x", "in_shape": list(shape), **decoders.spec(shape, layout), "width": 0.5, "out_size": 64}
    torch.save({"model": model.state_dict(), "optimizer": {}, "history": [], "decoder": spec}, tmp_path / "last.pt")
    loaded, _ = checkpoints.load_decoder(tmp_path / "last.pt")
    x = torch.randn(2, *shape)
    assert loaded.layout == layout and torch.equal(loaded(x), model.eval()(x))


def test_checkpoints_from_before_image_size_load_as_64_pixel_decoders(built, tmp_path):
    train(cfg_in(built, tmp_path, **{"train.epochs": 1}))
    path = tmp_path / "decoders/conv5/last.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["decoder"].pop("out_size") == 64
    torch.save(checkpoint, tmp_path / "old.pt")
    model, _ = checkpoints.load_decoder(tmp_path / "old.pt")
    assert model(torch.zeros(1, 256, 6, 6)).shape == (1, 3, 64, 64)


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
    assert epoch_losses(resumed) == epoch_losses(straight)  # optimizer.pt is epoch 1's too: exactly the same run
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


def test_checkpoints_in_the_previous_format_resume_and_render(built, tmp_path):
    from inversion.render import report

    straight = train(cfg_in(built, tmp_path / "straight"))
    cfg = cfg_in(built, tmp_path / "old", **{"train.epochs": 1})
    train(cfg)
    as_previous_format(tmp_path / "old/decoders/conv5")
    result = report.render(cfg, ["conv5"])
    assert set(result["report"]["layers"]) == {"conv5"}
    assert epoch_losses(train(dict(cfg, **{"train.epochs": 2}))) == epoch_losses(straight)
