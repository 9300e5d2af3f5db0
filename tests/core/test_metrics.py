import math

import numpy as np
import pytest
import torch

from inversion.core import metrics


def blurred(x):
    """A 5x5 box blur (reflect-padded): the same image with its fine detail gone."""
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    return torch.nn.functional.avg_pool2d(padded, 5, stride=1)


def test_identical_images_are_perfect():
    x = torch.rand(3, 3, 64, 64)
    assert torch.equal(metrics.mse(x, x), torch.zeros(3))
    assert torch.allclose(metrics.ssim(x, x), torch.ones(3))
    assert torch.allclose(metrics.psnr(x, x), torch.full((3,), metrics.PSNR_CAP))


def test_known_values():
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.7)
    assert metrics.mse(a, b).item() == pytest.approx(0.25)
    assert metrics.psnr(a, b).item() == pytest.approx(10 * math.log10(1 / 0.25))
    c1 = 0.01 ** 2  # constant images: SSIM reduces to the luminance term
    assert metrics.ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.7 + c1) / (0.2 ** 2 + 0.7 ** 2 + c1), rel=1e-5)
    x = torch.rand(2, 3, 32, 32)
    assert metrics.ssim(x, 1 - x).mean() < 0


def test_normalised_error_and_pair_distance():
    x = torch.zeros(4, 3, 16, 16)
    x[1] += 1  # one white image among black ones: each pair is 0 or 16*sqrt(3) apart
    d = metrics.pair_distance(x, seed=0)
    assert d * 4 / (16 * math.sqrt(3)) == pytest.approx(round(d * 4 / (16 * math.sqrt(3))))
    assert d > 0  # image 1 is paired with another image, never with itself
    s = metrics.summarize(x, x, d)
    assert s["normalized_error"] == 0 and s["mse"] == 0 and s["ssim"] == pytest.approx(1)
    y = torch.rand(8, 3, 16, 16)
    shuffled = y[torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])]
    exact = (y - shuffled).flatten(1).norm(dim=1).mean().item()
    assert metrics.summarize(y, shuffled, exact)["normalized_error"] == pytest.approx(1)


def test_high_frequency_ratio_is_one_for_the_originals_and_low_for_blurred_ones():
    x = torch.rand(6, 3, 32, 32)
    assert metrics.high_frequency_ratio(x, x) == pytest.approx(1.0)
    assert metrics.high_frequency_ratio(x, blurred(x)) < 0.1
    assert metrics.high_frequency_ratio(x, torch.full_like(x, 0.5)) == 0.0  # flat: no detail at all
    assert metrics.high_frequency_ratio(x, 0.5 * x) == pytest.approx(0.25)  # half the contrast: a quarter of the power


def test_radial_spectrum_puts_a_pure_frequency_in_its_ring():
    size, k = 32, 5
    column = torch.cos(2 * math.pi * k * torch.arange(size) / size)
    freqs, power = metrics.radial_spectrum(column.expand(1, 3, size, size).clone())
    assert len(freqs) == size // 2 and freqs[-1] == 0.5
    assert power.argmax() == k - 1 and power[np.arange(len(power)) != k - 1].max() < 1e-9


def test_feature_error_is_zero_for_identical_features_and_one_for_random_pairs():
    f = torch.randn(8, 10)
    assert metrics.feature_error(f, f) == 0.0
    perm = torch.from_numpy(np.roll(np.arange(8), 1))
    shuffled = metrics.feature_error(f, f[perm])
    assert 0.5 < shuffled < 1.5  # another image's features: about as far as a random pair
    assert metrics.feature_error(f, f + 0.01 * torch.randn_like(f)) < 0.05
