import json

import numpy as np
import torch
from PIL import Image

from conftest import pixel_size
from inversion.core import checkpoints, feature_cache, figures, inference
from inversion.render import analyses, report


def test_top5_on_a_hand_made_vector():
    x = torch.tensor([[0., 9, 1, 8, 2, 7, 3, 6, -1, 5]])
    mean = torch.full((10,), 0.5)
    top = analyses.top_k_only(x, mean)
    rest = analyses.without_top_k(x, mean)
    assert top.tolist() == [[0.5, 9, 0.5, 8, 0.5, 7, 0.5, 6, 0.5, 5]]
    assert rest.tolist() == [[0, 0.5, 1, 0.5, 2, 0.5, 3, 0.5, -1, 0.5]]
    assert torch.equal(analyses.top_k_only(x, mean, k=10), x)  # every score kept: nothing changes


def test_top5_is_per_image():
    x = torch.tensor([[5., 4, 3, 2, 1, 0, 0], [0., 0, 1, 2, 3, 4, 5]])
    kept = analyses.top_k_only(x, torch.zeros(7)) != 0
    assert kept.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]


def test_binarized_keeps_only_the_pattern_of_nonzero_activations():
    x = torch.tensor([[-1., 0, 2, 3], [4, 0, 0, 0.1]])
    positive_mean = torch.tensor([5., 6, 7, 8])
    assert analyses.binarized(x, positive_mean).tolist() == [[0, 0, 7, 8], [5, 0, 0, 8]]


def test_dropout_keeps_half_and_doubles_it_seeded():
    x = torch.rand(3, 4, 5, 5) + 0.5  # no zeros, so every zero below was dropped
    out = analyses.dropout50(x, torch.Generator().manual_seed(1))
    flat_in, flat_out = x.flatten(1), out.flatten(1)
    assert ((flat_out == 0).sum(1) == 50).all()  # exactly half of each image's 100 units
    kept = flat_out != 0
    assert torch.allclose(flat_out[kept], 2 * flat_in[kept])
    again = analyses.dropout50(x, torch.Generator().manual_seed(1))
    other = analyses.dropout50(x, torch.Generator().manual_seed(2))
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert not torch.equal(out[0] == 0, out[1] == 0)  # each image gets its own half


def test_interpolation_and_random_features():
    a, b = torch.randn(4, 2, 2), torch.randn(4, 2, 2)
    steps = analyses.interpolation(a, b)
    assert steps.shape == (analyses.STEPS, 4, 2, 2)
    assert torch.equal(steps[0], a) and torch.equal(steps[-1], b)
    assert torch.allclose(steps[analyses.STEPS // 2 - 1:analyses.STEPS // 2 + 1].mean(0), (a + b) / 2, atol=1e-6)
    mean, std = torch.tensor([0., 10]), torch.tensor([1., 0])
    x = analyses.random_features(mean, std, 1000, torch.Generator().manual_seed(0), relu=True)
    assert x.shape == (1000, 2) and (x >= 0).all() and (x[:, 1] == 10).all()
    assert 0.3 < (x[:, 0] == 0).float().mean() < 0.7  # clipped at 0, about half the draws
    y = analyses.random_features(mean, std, 1000, torch.Generator().manual_seed(0), relu=False)
    assert (y[:, 0] < 0).any()


def test_train_stats_in_chunks_equal_the_whole_split_at_once():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(10, 3, 2)), 0).astype(np.float32)
    x[:, 0, 0] = 0  # a unit that never fires
    stats = analyses.train_stats(x, chunk=3)
    assert np.allclose(stats.mean, x.mean(0), atol=1e-6) and np.allclose(stats.std, x.std(0), atol=1e-5)
    units = x.reshape(10, -1).T
    expected = np.array([u[u > 0].mean() if (u > 0).any() else 0 for u in units]).reshape(3, 2)
    assert np.allclose(stats.positive_mean, expected, atol=1e-6) and stats.positive_mean[0, 0] == 0
    assert stats.relu and not analyses.train_stats(x - 0.01, chunk=4).relu


def test_render_writes_the_analyses_without_the_dataset(trained, tmp_path):
    cfg = dict(trained, **{"data.path": str(tmp_path / "nowhere.zip"), "render.analyses": True})
    report.render(cfg)
    out = tmp_path.parent / cfg["output.dir"]
    metrics = json.loads((out / "metrics.json").read_text())
    table = metrics["analyses"]
    assert set(table) == {"unperturbed", "fc8_top5_only", "fc8_without_top5", "binarized", "dropout50"}
    assert set(table["unperturbed"]) == set(table["dropout50"]) == {"conv5", "fc8"}
    assert set(table["binarized"]) == {"conv5"}  # fc8's logits are not ReLU outputs
    assert set(table["fc8_top5_only"]) == {"fc8"}
    for values in table.values():
        assert all(v["normalized_error"] > 0 for v in values.values())
    assert table["unperturbed"]["fc8"]["normalized_error"] == metrics["layers"]["fc8"]["normalized_error"]
    results = (out / "results.md").read_text()
    assert "| binarized | " in results and "random-init" in results
    assert len(metrics["analysis_claims"]) == 4 and all(s in results for s in metrics["analysis_claims"])
    for name in (*analyses.NUMBERS, "interpolation", "random_features"):
        assert f"analysis_{name}.png" in metrics["figures"]
        with Image.open(out / f"analysis_{name}.png") as im:
            assert "random init" in im.info["Title"] and metrics["config_hash"] in im.info["Description"]
            assert np.asarray(im.convert("L")).std() > 5
    with Image.open(out / "analysis_binarized.png") as im:  # original | conv5 | conv5 binarized
        columns = {"original": 0, "conv5": 0, "conv5\nbinarized": 0}
        assert im.size == pixel_size(figures.image_table_inches(analyses.FIGURE_ROWS, columns))


def test_interpolation_endpoints_are_the_images_own_reconstructions(trained):
    with feature_cache.open_for(trained) as cache:
        for layer in ("conv5", "fc8"):
            model, _ = checkpoints.load_decoder(checkpoints.folder(trained, layer) / "best.pt")
            features = cache["eval"][layer]
            own = inference.decode(model, features[[1, 4]], 2, torch.device("cpu"))
            steps = analyses.interpolation_reconstructions(model, features[1], features[4], torch.device("cpu"))
            assert steps.shape[0] == analyses.STEPS
            assert torch.allclose(steps[0], own[0], atol=1e-5) and torch.allclose(steps[-1], own[1], atol=1e-5)
            assert not torch.allclose(steps[0], steps[-1])


def test_analyses_take_any_layer_set(trained, tmp_path):
    """Only conv5: no fc8 analyses, and the claims say so instead of failing."""
    cfg = dict(trained, **{"data.path": str(tmp_path / "nowhere.zip"), "render.analyses": True})
    result = report.render(cfg, ["conv5"])
    table = result["report"]["analyses"]
    assert set(table) == {"unperturbed", "binarized", "dropout50"}
    assert any("fc8 not rendered" in s for s in result["report"]["analysis_claims"])


def test_analyses_can_be_switched_off(trained, tmp_path):
    cfg = dict(trained, **{"render.analyses": False, "output.dir": str(tmp_path)})
    (tmp_path / "decoders").symlink_to(checkpoints.folder(trained))
    result = report.render(cfg, ["conv5"])
    assert result["report"]["analyses"] == "skipped: render.analyses is false"
    assert not list(tmp_path.glob("analysis_*")) and "What each layer keeps" not in (tmp_path / "results.md").read_text()


def test_claims_agree_disagree_or_stay_inconclusive():
    errors = lambda **kw: {layer: {"normalized_error": e} for layer, e in kw.items()}
    table = {"unperturbed": errors(conv2=0.5, fc6=0.6, fc8=0.65), "binarized": errors(conv2=0.6, fc6=0.62),
             "fc8_top5_only": errors(fc8=0.69), "fc8_without_top5": errors(fc8=0.66)}
    colours, pattern, scores, encoder = analyses.claims(table, 0.7, pretrained=False)
    assert colours.endswith("this run agrees.") and pattern.endswith("this run agrees.")  # fc6 +3% <= 10%
    assert scores.endswith("this run agrees.") and "random-init" in encoder
    table["binarized"] = errors(conv2=0.6, fc6=0.9)
    table["fc8_without_top5"] = errors(fc8=0.695)
    assert [s.endswith("this run does not agree.") for s in analyses.claims(table, 0.7, True)[1:3]] == [True, True]
    table["unperturbed"]["fc8"] = {"normalized_error": 0.8}  # a decoder worse than the mean image shows nothing
    colours, _, scores, _ = analyses.claims(table, 0.7, True)
    assert colours.endswith("does not agree.") and "inconclusive, since the decoder of fc8 does" in scores
    only_fc8 = {"unperturbed": errors(fc8=0.5)}
    assert "not tested" in analyses.claims(only_fc8, 0.7, False)[1]
