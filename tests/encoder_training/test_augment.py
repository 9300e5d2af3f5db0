"""Training crops and flips, made in batches: inside the image, at the asked-for area, seeded."""

import math

import torch

from inversion.core import encoder
from inversion.encoder_training import augment


def test_crops_lie_inside_the_image_at_the_asked_for_area_and_aspect():
    boxes = augment.crop_boxes(2000, 64, (0.35, 1.0), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64 + 1e-4).all()
    area = w * h / 64 ** 2
    assert area.min() >= 0.35 - 1e-3 and area.max() <= 1 + 1e-3
    ratio = (w / h).log()
    assert ratio.abs().max() <= math.log(4 / 3) + 0.05  # clamping at the border may squeeze a wide crop


def test_a_batch_is_resized_flipped_half_the_time_normalised_and_seeded():
    ramp = torch.arange(64, dtype=torch.uint8).repeat(64, 1) * 4  # brighter to the right
    images = ramp[None, :, :, None].expand(400, 64, 64, 3).contiguous()
    x = augment.training_batch(images, 96, (1.0, 1.0), "alexnet", torch.Generator().manual_seed(1), torch.device("cpu"))
    assert x.shape == (400, 3, 96, 96)
    mean, std = encoder.normalisation_tensors("alexnet", "cpu")
    raw = x * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    rightward = (raw[:, 0, 48, -4] > raw[:, 0, 48, 3]).float().mean().item()
    assert 0.4 < rightward < 0.6  # half flipped
    again = augment.training_batch(images, 96, (1.0, 1.0), "alexnet", torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(x, again)
