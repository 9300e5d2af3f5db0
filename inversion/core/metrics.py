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


def radial_spectrum(images, batch=256):
    """The radially averaged power spectrum of (N, 3, S, S) images: (frequencies in cycles per pixel, mean
    power per frequency ring), averaged over images and channels. Each image's own mean (the DC term) is
    removed first, so a flat image has no power at all. Ring k holds the frequencies whose radius rounds to
    k / S; rings run from 1 / S to the Nyquist frequency 1/2, the corners beyond it left out."""
    size = images.shape[-1]
    f = torch.fft.fftfreq(size, dtype=torch.float64)
    ring = torch.round(torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2) * size).long().flatten()
    rings = size // 2
    power = torch.zeros(rings + 1, dtype=torch.float64)
    for start in range(0, len(images), batch):
        x = images[start:start + batch].double()
        x = x - x.mean((2, 3), keepdim=True)
        p = torch.fft.fft2(x).abs().pow(2).sum((0, 1)).flatten()  # summed over images and channels
        keep = ring <= rings
        power += torch.zeros(rings + 1, dtype=torch.float64).index_add_(0, ring[keep], p[keep])
    counts = torch.bincount(ring[ring <= rings], minlength=rings + 1).double()
    power = power / counts / (len(images) * images.shape[1])
    return (torch.arange(1, rings + 1, dtype=torch.float64) / size).numpy(), power[1:].numpy()


def high_frequency_ratio(original, reconstruction):
    """Fine detail of the reconstructions next to the originals': the radially averaged power spectrum of
    the reconstructions over the originals', each summed over the upper half of the spatial frequencies
    (1/4 to 1/2 cycle per pixel). 1.0 = as much fine detail as the originals, whether or not it is the
    right detail (noise counts too); a blurry decoder is far below 1."""
    freqs, ours = radial_spectrum(reconstruction)
    _, theirs = radial_spectrum(original)
    upper = freqs > 0.25
    return float(ours[upper].sum() / theirs[upper].sum())


def feature_error(original_features, reconstruction_features, seed=0):
    """Normalised distance in feature space: mean_i ||f(r_i) - f(x_i)|| over mean_i ||f(x_i) - f(x_pi(i))||,
    the features of the reconstruction against its original's, divided by the distance between the
    features of random pairs of originals (as the normalised error does with pixels): 0 = the encoder
    cannot tell the reconstruction from its original, about 1 = no closer than another image."""
    a, b = original_features.flatten(1).double(), reconstruction_features.flatten(1).double()
    return (a - b).norm(dim=1).mean().item() / pair_distance(a, seed)
