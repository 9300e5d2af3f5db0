"""Mahendran & Vedaldi's objective and its descent, on hand-computed values and tiny problems."""

import pytest
import torch

from inversion.baseline import objective, optimisation
from inversion.core import config, encoder, encoder_graph, feature_cache


def _settings(cfg, **changes):
    return {**optimisation.settings(cfg), **changes}


def test_regularisers_against_hand_computed_values():
    u = torch.tensor([[[[1.0, -2.0], [3.0, 5.0]]]])  # one image, one channel, 2x2
    assert objective.alpha_norm(u, 2).item() == pytest.approx((1 + 4 + 9 + 25) / 4)
    assert objective.alpha_norm(u, 6).item() == pytest.approx((1 + 64 + 729 + 15625) / 4)
    # only the top-left pixel has both neighbours: dx = -2 - 1, dy = 3 - 1
    assert objective.total_variation(u, 2).item() == pytest.approx(9 + 4)
    assert objective.total_variation(u, 1).item() == pytest.approx(13 ** 0.5)
    v = torch.arange(9.0).view(1, 1, 3, 3)  # dx = 1 and dy = 3 at each of the 4 valid pixels
    assert objective.total_variation(v, 2).item() == pytest.approx(10)
    flat = torch.full((2, 3, 4, 4), 0.7)
    assert objective.total_variation(flat, 2).abs().max().item() < 1e-9
    assert objective.alpha_norm(flat, 6).tolist() == pytest.approx([0.7 ** 6] * 2)


def test_objective_decreases_on_a_tiny_problem():
    model, _ = encoder.load("alexnet", "random", seed=0)
    taps = encoder_graph.extractor(model, "alexnet", ["conv2"]).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        phi0 = taps(encoder.preprocess_float(torch.rand(2, 3, 16, 16), 64))["conv2"]
    s = _settings(config.defaults(), iterations=15, jitter=0)  # no jitter: 15 steps on a 16-px image
    _, trace = objective.invert(taps, "conv2", phi0, 16, s, 64, "alexnet", seed=0)
    assert trace["objective"][-1] < 0.7 * trace["objective"][0]
    assert len(trace["objective"]) == len(trace["feature_term"]) == 15
    assert all(0 < f < o for f, o in zip(trace["feature_term"], trace["objective"]))  # the regularisers are > 0


def test_final_relative_drop_compares_the_last_two_tenths():
    assert objective.final_relative_drop([9.0] * 16 + [3.0, 3.0, 2.0, 2.0]) == pytest.approx(0.5)
    assert objective.final_relative_drop([5.0, 4.0, 2.0]) == pytest.approx(1.0)  # under 20 steps: the last two
    assert objective.final_relative_drop([1.0] * 30) == 0
    assert objective.final_relative_drop([1.0]) is None


def test_features_move_toward_the_cached_target(built):
    """Random-init encoder, real cached features of a few eval images, the cache's own preprocessing."""
    cfg, path = built
    with feature_cache.open_for(cfg) as cache:
        phi0 = torch.from_numpy(cache["eval"]["conv5"][:3]).float()
        size = cache["eval"]["images"].shape[1]
        model = encoder.reload(cache.attrs["encoder"])
    taps = encoder_graph.extractor(model, "alexnet", ["conv5"]).eval()
    images, trace = objective.invert(taps, "conv5", phi0, size, _settings(cfg, iterations=25),
                                     cfg["encoder.input_size"], "alexnet", seed=0)
    distance = trace["feature_distance"]
    assert distance["end"] < 0.6 * distance["start"], distance
    assert images.shape == (3, 3, size, size) and 0 <= images.min() and images.max() <= 1
