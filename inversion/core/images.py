"""Images in the pipeline's two forms: uint8 (B, S, S, 3) as decoded and cached, and float (B, 3, S, S) in
[0, 1] as decoders predict them. Every module converts through these three functions."""

import torch


def to_target(images):
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1]: what decoders predict."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def to_hwc(images):
    """Float (B, 3, S, S) -> numpy (B, S, S, 3): how figures and the encoder take decoder outputs."""
    return images.permute(0, 2, 3, 1).numpy()


def to_uint8(images):
    """Decoder outputs in [0, 1] -> uint8 (B, S, S, 3), the cached images' own form."""
    return to_hwc((images * 255).round().to(torch.uint8))
