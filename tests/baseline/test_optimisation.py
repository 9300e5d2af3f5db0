import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from typer.testing import CliRunner

from conftest import Forked, make_cfg, pixel_size
from inversion.baseline import objective, optimisation
from inversion.core import config, console, encoder, feature_cache, figures
from inversion.core.errors import UserError
from inversion.extract import extraction
from inversion.render import report


def _settings(cfg, **changes):
    return {**optimisation.settings(cfg), **changes}


@pytest.fixture(scope="module")
def trained(trained):
    return dict(trained, **{"optimisation.iterations": 3, "optimisation.layers": {}})  # no per-layer 800 for conv5 and fc6


def test_the_iterations_option_sets_every_layer_even_with_its_own_entry():
    cfg = optimisation.with_iterations(config.defaults(), 7)  # the defaults give conv5 its own 800
    assert {layer: optimisation.layer_settings(optimisation.settings(cfg), layer)["iterations"]
            for layer in ("conv2", "conv5", "fc6")} == {"conv2": 7, "conv5": 7, "fc6": 7}
    assert cfg["optimisation.layers"]["conv5"] == {"lambda_tv": 0.3}  # the rest of the entry stays
    assert config.defaults()["optimisation.layers"]["conv5"]["iterations"] == 800


def test_layer_settings_put_a_layers_entry_over_the_global_values():
    s = optimisation.settings(config.defaults())
    s["layers"] = {"conv5": {"lambda_tv": 10.0, "jitter": 4}}
    conv5, fc8 = optimisation.layer_settings(s, "conv5"), optimisation.layer_settings(s, "fc8")
    assert (conv5["lambda_tv"], conv5["jitter"], conv5["lr"]) == (10.0, 4, s["lr"])
    assert fc8 == {key: value for key, value in s.items() if key != "layers"}
    stored = {"settings": {"iterations": 7}, "layers": {"conv5": {"optimisation": {}}, "fc8": {"optimisation": {}}}}
    assert optimisation.iterations_text(stored) == "7 iterations"  # results stored before per-layer settings
    stored["layers"]["fc8"]["optimisation"]["settings"] = {"iterations": 30}
    assert optimisation.iterations_text(stored) == "iterations conv5 7, fc8 30"


def test_preprocess_float_is_the_extraction_pipeline():
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    as_float = images.permute(0, 3, 1, 2).float() / 255
    assert torch.equal(encoder.preprocess(images, 64), encoder.preprocess_float(as_float, 64))


def test_an_encoder_that_cannot_be_had_again_is_refused(tiny_zip, tmp_path):
    weights = tmp_path / "squeezenet.pth"  # a small classifier: the check does not depend on the arch
    torch.manual_seed(3)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), weights)
    cfg = make_cfg(tmp_path, tiny_zip, f"encoder.weights={weights}", "encoder.arch=squeezenet1_1",
                   "layers=[features.12.cat]")
    extraction.extract(cfg)
    torch.manual_seed(4)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), weights)  # the file changed since the cache was built
    with pytest.raises(UserError, match="encoder that built the cache"):
        optimisation.run(cfg, num_images=1)


def test_writes_both_methods_resumes_per_layer_and_render_adds_the_table(trained, monkeypatch, capsys):
    cfg = trained
    out = Path(cfg["output.dir"])
    first = optimisation.run(cfg, ["conv5"], num_images=2)
    assert list(first["layers"]) == ["conv5"]

    computed = []
    real = optimisation._optimise_layer
    monkeypatch.setattr(optimisation, "_optimise_layer", lambda job, taps, layer, *rest: (
        computed.append(layer), real(job, taps, layer, *rest))[1])
    result = optimisation.run(cfg, ["conv5", "fc8"], num_images=2)
    assert computed == ["fc8"]  # conv5 was finished: not recomputed
    saved = json.loads((out / "optimisation.json").read_text())
    assert saved["layers"]["conv5"]["optimisation"] == first["layers"]["conv5"]["optimisation"]  # its trace too
    assert len(saved["layers"]["conv5"]["optimisation"]["objective"]) == 3
    assert (out / "optimisation_objective.png").is_file()
    with feature_cache.open_for(cfg) as cache:  # render.py's first grid rows
        rows = figures.choose_rows(cache.load("eval", "labels"), cfg["render.num_images"], cfg["seed"])[:2]
    assert [i["index"] for i in saved["images"]] == rows.tolist() and saved["cache_hash"] == result["cache_hash"]
    assert saved["encoder"] == {"arch": "alexnet", "kind": "random", "seed": 0}
    assert saved["settings"]["iterations"] == 3 and saved["settings"]["alpha"] == 6
    for layer in ("conv5", "fc8"):
        for method in ("decoder", "optimisation"):
            m = saved["layers"][layer][method]
            assert set(m) >= {"normalized_error", "mse", "psnr_db", "ssim", "seconds_per_image"}
            assert 0 <= m["mse"] < 1 and m["seconds_per_image"] > 0
    fc8 = saved["layers"]["fc8"]  # decoding is timed alone, not with the optimisation after it
    assert fc8["decoder"]["seconds_per_image"] < fc8["optimisation"]["seconds_per_image"]
    with Image.open(out / "optimisation_vs_decoder.png") as im:
        assert im.size == pixel_size(figures.comparison_inches(2, 5))
        assert "random init" in im.info["Title"] and saved["config_hash"] in im.info["Description"]

    computed.clear()
    optimisation.run(cfg, ["conv5", "fc8"], num_images=2, fresh=True)
    assert computed == ["conv5", "fc8"]
    computed.clear()
    optimisation.run(dict(cfg, **{"optimisation.iterations": 2}), ["fc8"], num_images=2)
    assert computed == ["fc8"] and "recomputing every layer" in capsys.readouterr().err
    optimisation.run(cfg, ["conv5", "fc8"], num_images=2)  # back to 3 iterations for the render below
    computed.clear()
    optimisation.run(cfg, ["fc8"], num_images=2)
    assert computed == [] and list(json.loads((out / "optimisation.json").read_text())["layers"]) == ["conv5", "fc8"]

    report.render(cfg)
    results = (out / "results.md").read_text()
    assert "Decoder vs inversion by optimisation" in results and "| fc8 | optimisation |" in results
    assert "(optimisation_vs_decoder.png)" in results
    path = out / "optimisation.json"
    assert report._optimisation_section(path, saved["cache_hash"]).count("| conv5 |") == 2
    assert report._optimisation_section(path, "another-cache") == ""
    assert report._optimisation_section(out / "missing.json", saved["cache_hash"]) == ""


def test_per_layer_settings_are_used_stored_traced_and_drawn(trained, tmp_path, monkeypatch, capsys):
    """fc8 and conv5 optimised with different settings; each layer's trace as long as its own iterations."""
    (tmp_path / "decoders").symlink_to(Path(trained["output.dir"]) / "decoders", target_is_directory=True)
    per_layer = {"fc8": {"iterations": 5, "jitter": 2}, "conv1": {"lr": 0.01}}  # conv1: not in the cache
    cfg = dict(trained, **{"output.dir": str(tmp_path), "optimisation.layers": per_layer, "optimisation.jitter": 0})
    used = []
    real = objective.invert
    monkeypatch.setattr(objective, "invert", lambda taps, layer, phi0, size, s, *rest, **kw: (
        used.append((layer, s)), real(taps, layer, phi0, size, s, *rest, **kw))[1])
    optimisation.run(cfg, ["conv5", "fc8"], num_images=2)
    assert "conv1, which this cache does not hold" in capsys.readouterr().err
    assert [(layer, s["iterations"], s["jitter"]) for layer, s in used] == [("conv5", 3, 0), ("fc8", 5, 2)]

    saved = json.loads((tmp_path / "optimisation.json").read_text())
    assert saved["settings"]["layers"] == per_layer and saved["settings"]["iterations"] == 3
    for layer, iterations, jitter in (("conv5", 3, 0), ("fc8", 5, 2)):
        entry = saved["layers"][layer]["optimisation"]
        assert (entry["settings"]["iterations"], entry["settings"]["jitter"]) == (iterations, jitter)
        assert entry["settings"]["lr"] == trained["optimisation.lr"] and "layers" not in entry["settings"]
        assert len(entry["objective"]) == len(entry["feature_term"]) == iterations
        assert entry["objective"][0] == pytest.approx(entry["objective_start"], rel=1e-5)
        assert entry["final_relative_drop"] == pytest.approx(objective.final_relative_drop(entry["objective"]),
                                                             rel=1e-4, abs=1e-6)
    with Image.open(tmp_path / "optimisation_objective.png") as im:
        assert im.size == pixel_size(figures.OBJECTIVE_INCHES)
        assert "random init" in im.info["Title"] and saved["config_hash"] in im.info["Description"]

    section = report._optimisation_section(tmp_path / "optimisation.json", saved["cache_hash"])
    assert "iterations conv5 3, fc8 5" in section and "(optimisation_objective.png)" in section
    assert "| 5 iterations, " in section and " epochs, " in section and "s training (once)" in section

    used.clear()  # another value for one layer is another setting: every layer is computed again
    optimisation.run(dict(cfg, **{"optimisation.layers": {"fc8": {"iterations": 4}}}), ["conv5", "fc8"], num_images=2)
    assert [(layer, s["iterations"]) for layer, s in used] == [("conv5", 3), ("fc8", 4)]
    assert "recomputing every layer" in capsys.readouterr().err


def test_sigterm_keeps_the_finished_layers_and_a_rerun_does_the_rest(trained, tmp_path, monkeypatch):
    (tmp_path / "decoders").symlink_to(Path(trained["output.dir"]) / "decoders", target_is_directory=True)
    cfg = dict(trained, **{"output.dir": str(tmp_path), "optimisation.iterations": 3, "optimisation.layers": {}})
    started = tmp_path / "started"

    def stopped_in_fc8():
        invert = objective.invert

        def inverting(taps, layer, *args, **kwargs):
            if layer == "fc8":
                started.touch()
                while True:
                    time.sleep(0.01)  # SIGTERM interrupts this
            return invert(taps, layer, *args, **kwargs)
        objective.invert = inverting
        console.run(optimisation.run)(cfg, ["conv5", "fc8"], 2)
    child = Forked(stopped_in_fc8)
    child.wait_for(started)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait() == 143, child.text()[-3000:]
    assert child.text().strip().splitlines()[-1] == (f"interrupted by SIGTERM: kept conv5 in {tmp_path / 'optimisation.json'}; "
                                                     f"fc8's optimisation was dropped; re-run the same command to continue")
    assert list(json.loads((tmp_path / "optimisation.json").read_text())["layers"]) == ["conv5"]
    computed, real = [], optimisation._optimise_layer
    monkeypatch.setattr(optimisation, "_optimise_layer", lambda job, taps, layer, *rest: (
        computed.append(layer), real(job, taps, layer, *rest))[1])
    assert list(optimisation.run(cfg, ["conv5", "fc8"], num_images=2)["layers"]) == ["conv5", "fc8"]
    assert computed == ["fc8"]


def test_optimisation_from_the_decoder_is_a_third_method_beside_the_other_two(trained, tmp_path, monkeypatch):
    """init: decoder starts from the decoder's reconstruction (the feature distance it starts at is the
    decoder's), is stored beside the run from the mean instead of replacing it, and is drawn beside both."""
    (tmp_path / "decoders").symlink_to(Path(trained["output.dir"]) / "decoders", target_is_directory=True)
    cfg = dict(trained, **{"output.dir": str(tmp_path), "optimisation.iterations": 3, "optimisation.layers": {}})
    optimisation.run(cfg, ["fc8"], num_images=2)
    starts, real = [], objective.invert
    monkeypatch.setattr(objective, "invert", lambda *args, **kw: (starts.append(args[-1]), real(*args, **kw))[1])
    result = optimisation.run(dict(cfg, **{"optimisation.init": "decoder"}), ["fc8"], num_images=2)
    entry = result["layers"]["fc8"]
    assert set(entry) == {"decoder", "optimisation", "decoder+optimisation"}
    assert entry["decoder+optimisation"]["settings"]["init"] == "decoder"
    assert entry["decoder+optimisation"]["feature_distance"]["start"] == pytest.approx(
        entry["decoder"]["feature_distance"], rel=1e-4)
    with np.load(tmp_path / "optimisation" / "fc8.npz") as mean_start:  # the mean start's images are kept
        assert len(mean_start["images"]) == 2
    assert len(starts) == 1 and starts[0] is not None and len(starts[0]) == 2
    with Image.open(tmp_path / "optimisation_vs_decoder.png") as im:
        assert im.size == pixel_size(figures.comparison_inches(2, 4))  # original + three methods
    section = report._optimisation_section(tmp_path / "optimisation.json", result["cache_hash"])
    assert "| fc8 | decoder+optimisation |" in section and section.count("| fc8 |") == 3


def test_command_line_errors_are_one_line(built, tmp_path):
    import invert_by_optimisation
    cfg, _ = built
    (tmp_path / "c.yaml").write_text("{}\n")
    args = ["--config", str(tmp_path / "c.yaml"), "--set", f"data.path={cfg['data.path']}", "--set", f"cache.dir={tmp_path}", "--set", "encoder.weights=random"]
    result = CliRunner().invoke(invert_by_optimisation.app, args)
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: no complete feature cache")
    result = CliRunner().invoke(invert_by_optimisation.app, [*args, "--split", "test"])
    assert result.exit_code == 2 and "--split" in result.output
