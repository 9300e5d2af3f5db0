import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inversion.core import feature_cache, figures
from inversion.render import report
from inversion.core.images import to_target
from inversion.core.errors import UserError

from conftest import pixel_size


def test_render_from_cache_and_checkpoints_alone(trained, tmp_path, capsys):
    cfg = dict(trained, **{"data.path": str(tmp_path / "does-not-exist.zip")})
    result = report.render(cfg)
    err = capsys.readouterr().err
    assert "conv2: no checkpoint" in err and "fc6: no checkpoint" in err  # skipped with a warning
    out = tmp_path.parent / cfg["output.dir"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["layers"]) == {"conv5", "fc8"}
    for values in [*metrics["layers"].values(), *metrics["baselines"].values()]:
        assert set(values) >= {"mse", "psnr_db", "ssim", "normalized_error"}
        assert 0 <= values["mse"] < 1 and -1 <= values["ssim"] <= 1 and values["normalized_error"] > 0
    assert metrics["top1_agreement"].startswith("skipped: random-init encoder")
    assert metrics["encoder"] == {"arch": "alexnet", "kind": "random", "seed": 0}
    assert metrics["precision"] == "fp32"  # what the decoders decoded in (the suite's setting)
    results = (out / "results.md").read_text()
    assert "random init, not ImageNet-pretrained" in results and metrics["config_hash"] in results
    assert all(c["wnid"] in results for c in metrics["classes"])
    for name in metrics["figures"]:
        assert (out / name).stat().st_size > 0 and f"({name})" in results
    assert {f.name for f in result["files"]} >= {"loss_per_layer.png", "loss_per_layer.pdf", "loss_all_layers.png",
                                                 "reconstructions.png", "grid_conv5.png", "grid_fc8.png"}

    sizes = {
        "loss_per_layer.png": pixel_size(figures.loss_panels_inches(2)),
        "loss_all_layers.png": pixel_size(figures.LOSS_ALL_INCHES),
        "reconstructions.png": pixel_size(figures.comparison_inches(cfg["render.num_images"], 3)),
        "grid_conv5.png": pixel_size(figures.LAYER_GRID_INCHES),
    }
    for name, size in sizes.items():
        with Image.open(out / name) as im:
            assert im.size == size, name
            assert metrics["config_hash"] in im.info["Description"] and "random init" in im.info["Title"]
            assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas


def test_same_image_choice_every_run():
    labels = np.repeat(np.arange(5), 4)
    a = figures.choose_rows(labels, 7, seed=0)
    assert list(a) == list(figures.choose_rows(labels, 7, seed=0))
    assert len(set(a)) == 7 and set(labels[a[:5]]) == set(range(5))  # every class before any repeats


def test_no_checkpoints_is_a_clear_error(built, tmp_path):
    cfg, _ = built
    with pytest.raises(UserError, match="train_decoders.py"):
        report.render(dict(cfg, **{"output.dir": str(tmp_path)}))


def test_no_cache_is_a_clear_error(trained, tmp_path):
    with pytest.raises(UserError, match="extract_features.py"):
        report.render(dict(trained, **{"cache.dir": str(tmp_path)}))


def test_mosaic_tiles_images():
    images = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    images[3] = 9
    m = figures.mosaic(images, pad=1)
    assert m.shape == (5, 5, 3) and (m[3:, 3:] == 9).all() and (m[2] == 255).all()


def test_a_damaged_checkpoint_is_skipped_with_a_warning(trained, tmp_path, capsys):
    shutil.copytree(Path(trained["output.dir"]) / "decoders", tmp_path / "decoders")
    best = tmp_path / "decoders/fc8/best.pt"
    best.write_bytes(best.read_bytes()[:1000])  # cut short
    capsys.readouterr()
    result = report.render(dict(trained, **{"output.dir": str(tmp_path)}))
    warning = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING: fc8"))
    assert f"{best} is damaged" in warning and "--layers fc8" in warning
    assert set(result["report"]["layers"]) == {"conv5"} and best.stat().st_size == 1000


def test_comparison_grid_caption(monkeypatch, tmp_path):
    seen = []

    def capture(fig, *args):
        seen.append(fig._suptitle.get_text())
        figures.plt.close(fig)
        return []
    monkeypatch.setattr(figures, "save", capture)
    images = np.zeros((1, 4, 4, 3))
    figures.comparison_grid(images, {"conv2": images}, ["a"], tmp_path / "g", "note")
    figures.comparison_grid(images, {"conv2": images}, ["a"], tmp_path / "g", "note", caption="Decoder vs optimisation")
    assert seen == ["Reconstructions from each layer (eval images)\nnote", "Decoder vs optimisation\nnote"]


def test_sharpness_metrics_and_a_second_run_side_by_side(trained, built, tmp_path):
    from inversion.train import training

    other = tmp_path / "other"
    training.train(dict(trained, **{"output.dir": str(other), "train.epochs": 1, "loss.feature": 0.05,
                                    "train.init_from": str(Path(trained["output.dir"]) / "decoders")}), ["conv5", "fc8"])
    cfg = dict(trained, **{"render.compare_with": [str(other)]})
    result = report.render(cfg)
    out = Path(cfg["output.dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    for values in metrics["layers"].values():
        assert values["high_frequency_ratio"] > 0
    assert set(metrics["layers"]["conv5"]["feature_error"]) == {"conv5"}  # conv5 is the comparator too
    assert set(metrics["layers"]["fc8"]["feature_error"]) == {"fc8", "conv5"}
    assert set(metrics["compared_runs"]) == {str(other)}
    assert set(metrics["compared_runs"][str(other)]["fc8"]) >= {"normalized_error", "high_frequency_ratio", "feature_error"}
    assert {f.name for f in result["files"]} >= {"reconstructions_compared.png", "spectrum.png"}
    results = (out / "results.md").read_text()
    assert "## Runs compared" in results and f"| fc8 | `{other}` |" in results and "HF ratio" in results
    with Image.open(out / "reconstructions_compared.png") as im:
        assert np.asarray(im.convert("L")).std() > 5
    with pytest.raises(UserError, match="no decoder checkpoints under"):
        report.render(dict(cfg, **{"render.compare_with": [str(tmp_path / "nothing")]}))


def test_feature_error_skips_a_comparator_the_arch_does_not_have(trained, capsys):
    """The default comparator is AlexNet's conv5: another arch's render still scores its own layers."""
    from inversion.render import comparison

    cfg = dict(trained, **{"loss.comparator": "no_such_node"})
    with feature_cache.open_for(cfg) as cache:
        originals = to_target(torch.from_numpy(cache.load("eval", "images")))
        recon = {"conv5": originals.clamp(0, 1) * 0.5}
        errors = comparison.feature_errors(cfg, cache, originals, recon, torch.device("cpu"))
    assert list(errors["conv5"]) == ["conv5"] and errors["conv5"]["conv5"] > 0
    assert "loss.comparator=no_such_node is not a node of alexnet" in capsys.readouterr().err
