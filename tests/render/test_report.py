import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import pixel_size
from inversion.core import figures
from inversion.core.errors import UserError
from inversion.render import report


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


def test_a_damaged_checkpoint_is_skipped_with_a_warning(trained, tmp_path, capsys):
    shutil.copytree(Path(trained["output.dir"]) / "decoders", tmp_path / "decoders")
    best = tmp_path / "decoders/fc8/best.pt"
    best.write_bytes(best.read_bytes()[:1000])  # cut short
    capsys.readouterr()
    result = report.render(dict(trained, **{"output.dir": str(tmp_path)}))
    warning = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING: fc8"))
    assert f"{best} is damaged" in warning and "--layers fc8" in warning
    assert set(result["report"]["layers"]) == {"conv5"} and best.stat().st_size == 1000
