"""The inversion networks, after Dosovitskiy & Brox (CVPR 2016), Tables 7-8, for any feature shape.

A node's output comes in one of LAYOUTS (decided from the encoder's graph in encoder.py):
channels-first maps (C, H, W), channels-last maps (H, W, C, as Swin and ConvNeXt's blocks keep them),
token sequences (L, D) on a g x g patch grid with or without a class token first (ViT), and vectors.
A decoder first views its raw cached features as a channels-first map (C, H, W) or a vector (D,)
(`map_shape`): channels-last maps are permuted, tokens are laid out on their grid with their D
channels, and a class token is projected by a learned D x D matrix and added over the whole grid (it
summarises the image; dropping it would throw away what ViT's head reads). Then one rule builds a
decoder for the (C, H, W) map or vector, reconstructing a `out_size` image (a power of two):
- Vectors, and maps smaller than 4x4 (flattened first): three fc layers of `fc_width` (the paper's
  4096), reshape to (fc_width / 16)x4x4 (256x4x4), then up-convolutions. The paper's fc decoders start from 4x4, so a 1x1 or 2x2 map has
  no spatial layout worth keeping.
- Maps of 4x4 and more: first, while the map is larger than half the output, a 3x3 stride-2
  convolution halves it (VGG's early maps are 224x224; decoding them at full size would cost more
  than the encoder); then three 3x3 stride-1 convolutions; then a bilinear resize to the next power
  of two (13 -> 16, 6 -> 8, 27 -> 32); then up-convolutions.
- Up-convolutions are 5x5 stride 2, each doubling the grid until `out_size`; their channels are the
  paper's stack 256, 128, 64, 32 (halving on for longer stacks), first entries first, so the widest
  layers sit next to the features; the last one outputs RGB.
Leaky ReLU (0.2) after every layer but the last; the output is linear and predicts the image in
[0, 1] (RGB, not normalised). `width` scales every conv channel count (0.5 = the halved
decoders; 1.0 = the paper's).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from inversion.core.layouts import TOKENS, default_layout, map_shape

OUT_SIZE = 64
LEAK = 0.2
FC_WIDTH = 4096              # the paper's; decoder.fc_width (tests build tiny fc decoders with it)
FC_GRID = 4                  # fc decoders reshape to 256 x FC_GRID x FC_GRID
CONV_CHANNELS = 256          # the paper's, before `width`
UCONV_FIRST = 256            # the paper's up-convolution stack starts here and halves: 256, 128, 64, 32


def spec(shape, layout):
    """What a checkpoint's `decoder` spec adds for the layout: nothing for the default one, so that
    checkpoints of channels-first maps and vectors keep their spec (and resume) as before."""
    return {} if layout == default_layout(shape) else {"layout": layout}


class Decoder(nn.Sequential):
    """Raw cached features (B, *in_shape) in `layout` -> image (B, 3, out_size, out_size)."""

    def __init__(self, in_shape, width=0.5, out_size=OUT_SIZE, layout=None, fc_width=FC_WIDTH):
        if out_size < 2 * FC_GRID or out_size & (out_size - 1):
            raise ValueError(f"out_size must be a power of two >= {2 * FC_GRID}, got {out_size}")
        if fc_width < FC_GRID ** 2 or fc_width % FC_GRID ** 2:
            raise ValueError(f"fc_width must be a multiple of {FC_GRID ** 2}, got {fc_width}")
        layout = layout or default_layout(in_shape)
        raw_shape, in_shape = tuple(in_shape), map_shape(in_shape, layout)
        layers = []
        if uses_fc(in_shape):
            if len(in_shape) > 1:
                layers.append(nn.Flatten())
            in_features = math.prod(in_shape)
            for _ in range(3):
                layers += [nn.Linear(in_features, fc_width), nn.LeakyReLU(LEAK)]
                in_features = fc_width
            layers.append(nn.Unflatten(1, (fc_width // FC_GRID ** 2, FC_GRID, FC_GRID)))
            channels, grid = fc_width // FC_GRID ** 2, FC_GRID
        else:
            channels, (h, w) = in_shape[0], in_shape[1:]
            conv = _scaled(CONV_CHANNELS, width)
            while max(h, w) > out_size // 2:
                layers += [nn.Conv2d(channels, conv, 3, stride=2, padding=1), nn.LeakyReLU(LEAK)]
                channels, h, w = conv, (h + 1) // 2, (w + 1) // 2
            for _ in range(3):
                layers += [nn.Conv2d(channels, conv, 3, padding=1), nn.LeakyReLU(LEAK)]
                channels = conv
            grid = 2 ** math.ceil(math.log2(max(h, w)))
            if (h, w) != (grid, grid):
                layers.append(nn.Upsample(size=(grid, grid), mode="bilinear", align_corners=False))
        steps = round(math.log2(out_size / grid))
        outs = [_scaled(UCONV_FIRST // 2 ** i, width) for i in range(steps - 1)] + [3]
        for i, out in enumerate(outs):
            layers.append(nn.ConvTranspose2d(channels, out, 5, stride=2, padding=2, output_padding=1))
            if i < len(outs) - 1:
                layers.append(nn.LeakyReLU(LEAK))
            channels = out
        super().__init__(*layers)
        self.in_shape, self.layout, self.map_shape = raw_shape, layout, in_shape
        self.out_size = out_size
        if layout == "cls_tokens":  # plain parameters: a submodule would join nn.Sequential's chain
            proj = nn.Linear(in_shape[0], in_shape[0])
            self.cls_weight, self.cls_bias = proj.weight, proj.bias
        # Features arrive standardised per channel, with the training split's statistics (set before
        # training). Channels differ in offset far more than they vary across images (random-init
        # AlexNet's fc8: per-unit offsets 10x the spread), and a decoder fed them raw, or divided by one
        # scalar as before, spends its first epochs learning to subtract them (CHANGELOG.md).
        # The statistics are taken on `arrange`d features: (C, 1, 1) for maps, (D, 1) for tokens.
        stats = (in_shape[0],) + (1,) * (len(in_shape) - 1 if layout not in TOKENS else 1)
        self.register_buffer("input_mean", torch.zeros(stats))
        self.register_buffer("input_std", torch.ones(stats))

    def arrange(self, x):
        """Raw features (B, *in_shape) -> channels first, as a view (no copy): (B, C, H, W) maps,
        (B, D) vectors, (B, D, L) tokens (the class token first). Per-channel statistics are taken
        on this view (training.standardisation), so they mean the same channels as in forward."""
        if self.layout == "hwc":
            return x.permute(0, 3, 1, 2)
        if self.layout in TOKENS:
            return x.transpose(1, 2)
        return x

    def to_map(self, x):
        """Raw features -> the standardised (B, C, H, W) map or (B, D) vector the layers take."""
        x = (self.arrange(x) - self.input_mean) / self.input_std
        if self.layout not in TOKENS:
            return x
        cls = self.layout == "cls_tokens"
        grid = x[:, :, int(cls):].unflatten(2, self.map_shape[1:])
        if cls:
            grid = grid + F.linear(x[:, :, 0], self.cls_weight, self.cls_bias)[:, :, None, None]
        return grid

    def forward(self, x):
        return super().forward(self.to_map(x))

    def _load_from_state_dict(self, state, prefix, *args):
        scale = state.pop(prefix + "input_scale", None)
        if scale is not None:  # a checkpoint from before per-channel standardisation: one scalar divisor
            # built beside `scale`, not like the buffers, which are on the meta device when loading for inference
            state[prefix + "input_mean"] = torch.zeros(self.input_mean.shape, dtype=scale.dtype, device=scale.device)
            state[prefix + "input_std"] = scale.expand(self.input_std.shape).clone()
        super()._load_from_state_dict(state, prefix, *args)


def uses_fc(map_shape):
    """Whether a (C, H, W) map or (D,) vector is decoded by fc layers (vectors, maps smaller than 4x4)."""
    return len(map_shape) == 1 or map_shape[1] * map_shape[2] < FC_GRID ** 2


def _scaled(channels, width):
    return max(1, round(channels * width))


def describe(decoder):
    """Rows (layer, kernel, stride, out channels, out size, parameters), read off the modules."""
    x = decoder.to_map(torch.zeros(1, *decoder.in_shape))
    rows = [("input", "", "", _channels(x), _size(x), 0)]
    if decoder.layout == "cls_tokens":
        params = decoder.cls_weight.numel() + decoder.cls_bias.numel()
        rows.append(("class token: fc, added over the grid", "", "", _channels(x), _size(x), params))
    for module in decoder:
        x = module(x)
        if isinstance(module, nn.LeakyReLU):
            name, *rest = rows[-1]
            rows[-1] = (name + " + lrelu", *rest)
            continue
        kind = {nn.Linear: "fc", nn.Conv2d: "conv", nn.ConvTranspose2d: "uconv", nn.Flatten: "flatten",
                nn.Unflatten: "reshape", nn.Upsample: "resize"}[type(module)]
        kernel = module.kernel_size[0] if hasattr(module, "kernel_size") else ""
        stride = module.stride[0] if hasattr(module, "stride") else ""
        params = sum(p.numel() for p in module.parameters())
        rows.append((kind, kernel, stride, _channels(x), _size(x), params))
    return rows


def _channels(x):
    return x.shape[1]


def _size(x):
    return "x".join(map(str, x.shape[2:])) if x.dim() > 2 else "1"
