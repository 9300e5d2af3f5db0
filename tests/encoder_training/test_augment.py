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


def test_flipping_and_normalising_before_the_resize_is_resizing_first():
    """The batch equals the plain order, crop and resize (bilinear) then flip then normalise, image by image."""
    import torch.nn.functional as F

    images = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    x = augment.training_batch(images, 112, (0.35, 1.0), "alexnet", torch.Generator().manual_seed(2), "cpu")
    generator = torch.Generator().manual_seed(2)  # the same draws in the same order: boxes, then flips
    boxes = augment.crop_boxes(6, 64, (0.35, 1.0), generator)
    flip = torch.rand(6, generator=generator) < 0.5
    mean, std = encoder.normalisation_tensors("alexnet", "cpu")
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        ys, xs = (torch.linspace(a, b, 113)[:-1] + (b - a) / 224 for a, b in ((y0, y1), (x0, x1)))  # pixel centres
        grid = torch.stack(torch.meshgrid(xs / 32 - 1, ys / 32 - 1, indexing="xy"), -1)[None]
        plain = F.grid_sample(images[i:i + 1].permute(0, 3, 1, 2).float() / 255, grid, padding_mode="border",
                              align_corners=False)
        plain = (plain.flip(-1) if flip[i] else plain) - mean
        assert torch.allclose(x[i:i + 1], plain / std, atol=1e-4), i
