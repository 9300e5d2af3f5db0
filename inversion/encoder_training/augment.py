"""Training input made in batches from the decoded uint8 images: a random crop of a random part of each
image (area `crop_scale`, aspect 3/4..4/3), resized to the step's input size, flipped half the time,
normalised as the encoder's extraction normalises. One `roi_align` call crops and resizes a whole batch
(bilinear, as extraction resizes), so two CPU cores spend their time in the network, not in per-image
Python. Held-out images go through extraction's own preprocessing (encoder.preprocess), no crop."""

import math

import torch
from torchvision.ops import roi_align

from inversion.core import encoder


def crop_boxes(n, size, scale, generator):
    """(n, 4) boxes (x0, y0, x1, y1) in pixels of a `size` x `size` image: area a fraction in `scale` of
    the image, aspect ratio log-uniform in 3/4..4/3, placed uniformly where it fits."""
    area = torch.empty(n).uniform_(*scale, generator=generator) * size * size
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(1, size)
    h = torch.sqrt(area / ratio).clamp(1, size)
    x0 = torch.rand(n, generator=generator) * (size - w)
    y0 = torch.rand(n, generator=generator) * (size - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def training_batch(images, input_size, scale, arch, generator, device):
    """uint8 (B, S, S, 3) -> float (B, 3, input_size, input_size): cropped, resized, flipped, normalised.
    Normalised and flipped at the stored size S, before the resize: both commute with it (a bilinear sample is
    a weighted mean, and a mirrored crop of the mirrored image is the mirrored crop), and at 64 px they touch
    a sixth of the pixels they would at 160. One sample per output pixel (`sampling_ratio=1`): plain bilinear
    interpolation, as extraction resizes, where four per pixel cost three times as much for a slight blur."""
    mean, std = encoder.normalisation_tensors(arch, device)
    x = (images.to(device).permute(0, 3, 1, 2).float().div_(255) - mean) / std
    size = x.shape[-1]
    boxes = crop_boxes(len(x), size, scale, generator).to(device)
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    mirrored = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
    boxes = torch.where(flip[:, None], mirrored, boxes)
    rois = torch.cat([torch.arange(len(x), device=device, dtype=x.dtype)[:, None], boxes], 1)
    return roi_align(x, rois, output_size=input_size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
