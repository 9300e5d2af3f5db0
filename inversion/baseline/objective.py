"""Mahendran & Vedaldi's objective (CVPR 2015) and the gradient descent that minimises it: for target features
phi0 (cached), over the image x, per image,

    ||phi(x) - phi0||^2 / ||phi0||^2  +  lambda_alpha * R_alpha(x)  +  lambda_tv * TV_beta(x)

Choices, so the two methods answer the same question (docs/optimisation-baseline.md lists which constants are M&V's):
- x is an RGB image in [0, 1] at the cache's image size S, the space the decoders predict in, and
  phi is the extraction itself: `encoder.preprocess_float` (bilinear resize to input_size,
  normalisation) then the layer's tap. The cached image therefore maps onto phi0 exactly (up to
  cache.dtype), and a reconstruction is compared with its original at the same S.
- The regularisers see u = (x - mean) / std, the mean-subtracted image scaled by the encoder's own
  normalisation (M&V regularise the mean-subtracted image brought to a unit-like range), and are
  means over pixels and channels rather than sums, so a lambda does not depend on S:
      R_alpha = mean_{c,i,j} |u_cij|^alpha
      TV_beta = mean_{c,i<H-1,j<W-1} ((u_c,i,j+1 - u_cij)^2 + (u_c,i+1,j - u_cij)^2)^(beta/2)
- Adam (or SGD with momentum) whose step decays to zero on a cosine; jitter: each step the image
  is rolled by a seeded random shift of up to `jitter` pixels before the encoder sees it
  (Mahendran & Vedaldi's IJCV 2016 follow-up), so no single pixel grid is over-fitted.
- The start (`optimisation.init`) is the encoder's mean colour plus small seeded Gaussian noise (`mean`, M&V's
  start), or the trained decoder's reconstruction (`decoder`: the decoder then the optimisation, the two
  methods in turn). The result is clamped to [0, 1] only for metrics and figures, as decoder outputs are.

All images of a layer form one batch; the objective is the sum of the per-image objectives, so an image's
gradient does not depend on the batch.
"""

import math

import numpy as np
import torch

from inversion.core import encoder, runtime
from inversion.core.errors import UserError


def final_relative_drop(history):
    """(mean of the second-to-last tenth of the trace - mean of the last tenth) / mean of the last tenth:
    how much the objective still fell at the end (small = it has stopped falling); None under 2 steps.
    Under the cosine schedule the last tenth's steps are under 2.5% of lr, so a small value says the
    run has settled, not that more iterations would not help: compare runs of different lengths for that."""
    if len(history) < 2:
        return None
    n = max(1, len(history) // 10)
    last, before = float(np.mean(history[-n:])), float(np.mean(history[-2 * n:-n]))
    return (before - last) / last if last else None


def alpha_norm(u, alpha):
    """Per-image mean of |u|^alpha."""
    return u.abs().pow(alpha).flatten(1).mean(1)


def total_variation(u, beta):
    """Per-image mean of (dx^2 + dy^2)^(beta/2) over pixels with both a right and a lower neighbour.
    The clamp keeps the gradient finite at zero differences for beta < 2 (it changes no value above 1e-12)."""
    dx = u[:, :, :-1, 1:] - u[:, :, :-1, :-1]
    dy = u[:, :, 1:, :-1] - u[:, :, :-1, :-1]
    return (dx * dx + dy * dy).clamp_min(1e-12).pow(beta / 2).flatten(1).mean(1)


def feature_loss(taps, layer, x, phi0, input_size, arch):
    """Per-image ||phi(x) - phi0||^2 / ||phi0||^2, through the cache's own preprocessing."""
    phi = taps(encoder.preprocess_float(x, input_size, arch))[layer].float()
    return (phi - phi0).pow(2).flatten(1).sum(1) / phi0.pow(2).flatten(1).sum(1).clamp_min(1e-12)


def objective(taps, layer, x, phi0, s, input_size, arch, shift=(0, 0), precision="fp32"):
    """Per-image objective (B,) and its feature term; `shift` rolls x (jitter) before the encoder, which runs
    in `precision` (the regularisers and the fit's sums stay fp32)."""
    mean, std = encoder.normalisation_tensors(arch, x.device)
    u = (x - mean) / std
    with runtime.autocast(x.device, precision):
        fit = feature_loss(taps, layer, torch.roll(x, shift, (2, 3)) if any(shift) else x, phi0, input_size, arch)
    return fit + s["lambda_alpha"] * alpha_norm(u, s["alpha"]) + s["lambda_tv"] * total_variation(u, s["beta"]), fit


def invert(taps, layer, phi0, image_size, s, input_size, arch, seed, on_step=None, precision="fp32", start=None):
    """Optimise a batch of images towards `phi0` (B, *shape) on phi0's device, from `start` (B, 3, S, S) where
    given, else from the encoder's mean colour plus `init_std` of seeded noise.

    Returns (images (B, 3, S, S) clamped to [0, 1] on the CPU, {objective: [mean per step],
    feature_term: [its feature term's mean per step], feature_distance: {start, end}}), the feature
    distance being the mean relative ||phi(x) - phi0|| / ||phi0|| without jitter, of the images as returned.
    """
    device = phi0.device
    generator = torch.Generator().manual_seed(seed)
    if start is None:
        mean, _ = encoder.normalisation_tensors(arch, device)
        noise = torch.randn(len(phi0), 3, image_size, image_size, generator=generator)
        start = mean + s["init_std"] * noise.to(device)
    start = start.to(device)
    x = start.clone().requires_grad_(True)
    if s["optimizer"] == "adam":
        optimizer = runtime.adam([x], device, lr=s["lr"])
    else:
        optimizer = torch.optim.SGD([x], lr=s["lr"], momentum=s["momentum"], fused=device.type in ("cpu", "cuda"))
    history, fits = [], []
    for step in range(s["iterations"]):
        for group in optimizer.param_groups:
            group["lr"] = s["lr"] * 0.5 * (1 + math.cos(math.pi * step / s["iterations"]))
        shift = tuple(torch.randint(-s["jitter"], s["jitter"] + 1, (2,), generator=generator).tolist())
        value, fit = objective(taps, layer, x, phi0, s, input_size, arch, shift, precision)
        optimizer.zero_grad(set_to_none=True)
        value.sum().backward()
        optimizer.step()
        history.append(value.mean().item())
        fits.append(fit.mean().item())
        if not math.isfinite(history[-1]):
            raise UserError(f"{layer}: the objective became {history[-1]} at step {step + 1}; "
                            f"try a lower optimisation.lr")
        if on_step:
            on_step(step, history[-1])
    with torch.no_grad():
        x = x.detach().clamp(0, 1)
        moved = {"start": distance(taps, layer, start, phi0, input_size, arch),
                 "end": distance(taps, layer, x, phi0, input_size, arch)}
    return x.cpu(), {"objective": history, "feature_term": fits, "feature_distance": moved}


def distance(taps, layer, x, phi0, input_size, arch):
    """The mean over images of the relative ||phi(x) - phi0|| / ||phi0||."""
    return feature_loss(taps, layer, x, phi0, input_size, arch).sqrt().mean().item()
