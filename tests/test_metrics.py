import math

import pytest
import torch

from inversion import metrics


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
