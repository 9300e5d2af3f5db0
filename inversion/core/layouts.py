"""The names layers go by and the layouts their outputs come in: what config, the encoder's graph, the
decoders and the cache share, without importing torch. LAYOUTS: channels-first maps (C, H, W),
channels-last maps (H, W, C), tokens on a square grid with or without a class token first, vectors."""

import math

# AlexNet's eight layers and their torchvision graph nodes: after the ReLU, and after the
# max-pool where one follows (fc8 = the logits). docs/configuration.md has this table.
ALEXNET_NODES = {"conv1": "features.2", "conv2": "features.5", "conv3": "features.7", "conv4": "features.9",
                 "conv5": "features.12", "fc6": "classifier.2", "fc7": "classifier.5", "fc8": "classifier.6"}

LAYOUTS = ("chw", "hwc", "tokens", "cls_tokens", "vector")
TOKENS = ("tokens", "cls_tokens")


def default_layout(shape):
    """The layout of a cache or checkpoint that does not record one: they held AlexNet-style
    channels-first maps and vectors only."""
    return "vector" if len(shape) == 1 else "chw"


def map_shape(shape, layout):
    """The (C, H, W) map or (D,) vector a decoder sees for a node's per-image `shape` in `layout`;
    ValueError where the shape cannot be in that layout."""
    dims = {"chw": 3, "hwc": 3, "tokens": 2, "cls_tokens": 2, "vector": 1}.get(layout)
    if dims is None or len(shape) != dims:
        raise ValueError(f"a {len(shape)}-D feature shape {tuple(shape)} cannot be in layout {layout!r}")
    if layout == "hwc":
        return (shape[2], shape[0], shape[1])
    if layout in TOKENS:
        patches = shape[0] - (layout == "cls_tokens")
        grid = math.isqrt(max(patches, 0))
        if patches < 1 or grid * grid != patches:
            raise ValueError(f"{shape[0]} tokens are not {'1 + ' * (layout == 'cls_tokens')}a square grid")
        return (shape[1], grid, grid)
    return tuple(shape)


def layout_text(shape, layout):
    """How a layout reads in listings: `C x H x W`, `H x W x C`, `tokens 1+14x14 x 768`, `vector`."""
    if layout in ("tokens", "cls_tokens"):
        channels, grid, _ = map_shape(shape, layout)
        return f"tokens {'1+' * (layout == 'cls_tokens')}{grid}x{grid} x {channels}"
    return {"chw": "C x H x W", "hwc": "H x W x C", "vector": "vector"}[layout]
