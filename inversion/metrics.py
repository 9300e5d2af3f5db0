"""Reconstruction quality. Images are float tensors (N, 3, H, W) in [0, 1].

Definitions (docs/rendering.md quotes them):
- MSE: per-image mean of squared pixel differences, averaged over images.
- PSNR: per-image 10*log10(1 / MSE_i) in dB, capped at PSNR_CAP for identical images, averaged.
- SSIM: Wang et al. (2004): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1,
  per RGB channel over valid window positions; averaged over channels, positions, then images.
- Normalised error: mean_i ||x_i - y_i||_2 divided by mean_i ||x_i - x_pi(i)||_2, the mean
  distance between random pairs of the same images (pi a seeded permutation without fixed
  points). 0 is perfect; about 1 means no better than a random other image.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP = 100.0


def mse(x, y):
    return (x - y).pow(2).flatten(1).mean(1)


def psnr(x, y):
    return 10 * torch.log10(1 / mse(x, y).clamp_min(10 ** (-PSNR_CAP / 10)))


def ssim(x, y, window=11, sigma=1.5, k1=0.01, k2=0.03):
    c1, c2 = k1 ** 2, k2 ** 2
    coords = torch.arange(window, dtype=x.dtype) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=x.shape[1])

    # (Co)variances are shift-invariant: computing them on mean-centred images keeps
    # E[x^2] - E[x]^2 from cancelling badly in float32.
    a, b = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)
    xc, yc = x - a, y - b
    mxc, myc = blur(xc), blur(yc)
    mx, my = mxc + a, myc + b
    vx, vy, cov = blur(xc * xc) - mxc ** 2, blur(yc * yc) - myc ** 2, blur(xc * yc) - mxc * myc
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def pair_distance(x, seed=0):
    """Mean L2 distance between random pairs of distinct images: the normaliser."""
    n = len(x)
    if n < 2:
        return math.nan
    perm = np.random.default_rng(seed).permutation(n)
    perm = np.where(perm == np.arange(n), (perm + 1) % n, perm)  # no image paired with itself
    return (x - x[torch.from_numpy(perm)]).flatten(1).norm(dim=1).mean().item()


def normalized_error(original, reconstruction, normaliser, batch=256):
    """summarize's normalised error alone, for callers that need no SSIM (the analyses)."""
    total = 0.0
    for start in range(0, len(original), batch):
        total += (original[start:start + batch] - reconstruction[start:start + batch]).flatten(1).norm(dim=1).sum().item()
    return total / len(original) / normaliser


def summarize(original, reconstruction, normaliser, batch=256):
    """All per-split metrics as plain floats; batched so memory stays small."""
    sums = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0, "l2": 0.0}
    for start in range(0, len(original), batch):
        x, y = original[start:start + batch], reconstruction[start:start + batch]
        sums["mse"] += mse(x, y).sum().item()
        sums["psnr"] += psnr(x, y).sum().item()
        sums["ssim"] += ssim(x, y).sum().item()
        sums["l2"] += (x - y).flatten(1).norm(dim=1).sum().item()
    n = len(original)
    return {"mse": sums["mse"] / n, "psnr_db": sums["psnr"] / n, "ssim": sums["ssim"] / n,
            "normalized_error": sums["l2"] / n / normaliser}
