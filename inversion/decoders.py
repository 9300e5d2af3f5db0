"""The inversion networks: one per AlexNet layer, after Dosovitskiy & Brox (CVPR 2016), Tables 7-8.

Convolutional features: three 3x3 stride-1 convs, then 5x5 stride-2 up-convolutions.
Fully connected features: three fc layers of 4096, reshape to 256x4x4, then up-convolutions.
Leaky ReLU (0.2) after every layer but the last; the output is linear and predicts the image in
[0, 1] (RGB, not normalised). `width` scales every conv channel count (0.5 = the mission's halved
decoders; 1.0 = the paper's 256/128/64/32).

Output at `out_size` (data.image_size; 64 = Tiny ImageNet's native size): each up-convolution
doubles the grid, so the grid and out_size must be powers of two. A conv layer's map (13x13 for
conv2, 6x6 for conv5 at 224 input) is resized bilinearly to the next power of two (16, 8) after the
three convs; then log2(out_size / grid) up-convolutions follow: at 64, 2 (conv2), 3 (conv5) or
4 (fc, from 4x4); one more per doubling. The up-convolution channels are the first ones of the
paper's stack, so the widest layers sit next to the features; where more are needed than the
paper's four, the stack goes on halving (256, 128, 64, 32, 16, 8, ...).
"""

import math

import torch
from torch import nn

from .errors import UserError

OUT_SIZE = 64
LEAK = 0.2
FC_WIDTH = 4096
CONV_CHANNELS = 256                     # the paper's, before `width`
UCONV_CHANNELS = (256, 128, 64, 32)     # the paper's up-convolution stack before the RGB layer


class Decoder(nn.Sequential):
    """Feature tensor (B, *in_shape) -> image (B, 3, out_size, out_size)."""

    def __init__(self, in_shape, width=0.5, out_size=OUT_SIZE):
        layers = []
        if len(in_shape) == 1:
            size = in_features = in_shape[0]
            for _ in range(3):
                layers += [nn.Linear(in_features, FC_WIDTH), nn.LeakyReLU(LEAK)]
                in_features = FC_WIDTH
            layers.append(nn.Unflatten(1, (256, 4, 4)))
            channels, grid = 256, 4
        else:
            channels, size, _ = in_shape
            conv = _scaled(CONV_CHANNELS, width)
            for _ in range(3):
                layers += [nn.Conv2d(channels, conv, 3, padding=1), nn.LeakyReLU(LEAK)]
                channels = conv
            grid = 2 ** math.ceil(math.log2(size))
            if grid != size:
                layers.append(nn.Upsample(size=(grid, grid), mode="bilinear", align_corners=False))
        steps = round(math.log2(out_size / grid))
        if steps < 1:
            raise UserError(f"data.image_size {out_size} is not above the {grid}x{grid} grid of a "
                            f"{'x'.join(map(str, in_shape))} feature map; raise it or lower encoder.input_size")
        stack = list(UCONV_CHANNELS)
        while len(stack) < steps - 1:
            stack.append(stack[-1] // 2)
        outs = [_scaled(c, width) for c in stack[: steps - 1]] + [3]
        for i, out in enumerate(outs):
            layers.append(nn.ConvTranspose2d(channels, out, 5, stride=2, padding=2, output_padding=1))
            if i < len(outs) - 1:
                layers.append(nn.LeakyReLU(LEAK))
            channels = out
        super().__init__(*layers)
        self.in_shape = tuple(in_shape)
        # Features arrive divided by one scalar (their RMS over the training split, set before
        # training) so every layer's decoder starts from inputs of unit scale.
        self.register_buffer("input_scale", torch.ones(()))

    def forward(self, x):
        return super().forward(x / self.input_scale)


def _scaled(channels, width):
    return max(1, round(channels * width))


def describe(decoder):
    """Rows (layer, kernel, stride, out channels, out size, parameters), read off the modules."""
    x = torch.zeros(1, *decoder.in_shape)
    rows = [("input", "", "", _channels(x), _size(x), 0)]
    for module in decoder:
        x = module(x)
        if isinstance(module, nn.LeakyReLU):
            name, *rest = rows[-1]
            rows[-1] = (name + " + lrelu", *rest)
            continue
        kind = {nn.Linear: "fc", nn.Conv2d: "conv", nn.ConvTranspose2d: "uconv",
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
