import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inversion.core import feature_cache
from inversion.core.errors import UserError
from inversion.core.images import to_target
from inversion.render import report


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


def test_runs_on_another_encoders_cache_of_the_same_images_side_by_side(trained, built, tmp_path):
    """The trained-vs-random comparison: a second encoder's cache of the same images, its decoders scored by
    that encoder and labelled by it; a run on other images is refused, naming what differs."""
    import shutil

    import torchvision

    from inversion.extract import extraction
    from inversion.train import training

    _, cache_path = built
    (tmp_path / "cache").mkdir()
    shutil.copy(cache_path, tmp_path / "cache")  # a private cache.dir: the session's stays as it is
    here = dict(trained, **{"cache.dir": str(tmp_path / "cache")})
    weights = tmp_path / "second-alexnet.pt"
    torch.manual_seed(1)
    torch.save(torchvision.models.alexnet().state_dict(), weights)
    other = dict(here, **{"encoder.weights": str(weights), "output.dir": str(tmp_path / "other"), "train.epochs": 1})
    extraction.extract(other)
    training.train(other, ["fc8"])

    result = report.render(dict(here, **{"render.compare_with": [other["output.dir"]]}))
    metrics = result["report"]
    theirs = metrics["compared_runs"][other["output.dir"]]["fc8"]
    assert "second-alexnet.pt" in metrics["compared_encoders"][other["output.dir"]]
    assert "top1_agreement" in theirs and "top1_agreement" not in metrics["layers"]["fc8"]  # random: auto skips it
    assert theirs["feature_error"]["fc8"] != metrics["layers"]["fc8"]["feature_error"]["fc8"]
    out = Path(here["output.dir"])
    results = (out / "results.md").read_text()
    assert f"| fc8 | `{other['output.dir']}` | AlexNet weights from {weights}" in results
    assert "| baseline: mean train image | - |" in results
    assert 'id="compared"' in (out / "report.html").read_text()

    moved = dict(other, **{"split.eval_per_class": 1, "output.dir": str(tmp_path / "moved")})
    extraction.extract(moved)
    training.train(moved, ["fc8"])
    with pytest.raises(UserError, match=r"other images than this run .*split.eval_per_class 1 there, 2 here"):
        report.render(dict(here, **{"render.compare_with": [moved["output.dir"]]}))
