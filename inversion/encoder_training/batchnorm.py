"""Batch norm for training only: added after every convolution and hidden linear layer that a ReLU follows
(AlexNet and VGG have none, and converge several times slower without it), and folded into those layers'
weights and biases at the end, so the saved network is exactly torchvision's.

Folding is exact in eval mode: BN(Wx + b) = gamma * (Wx + b - mean) / sqrt(var + eps) + beta
= (W * s) x + (b - mean) * s + beta with s = gamma / sqrt(var + eps), per output channel.
"""

import torch
from torch import nn


def has_batchnorm(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def add(model):
    """`model` with each Conv2d or Linear that a ReLU follows inside an nn.Sequential replaced by
    Sequential(layer, BatchNorm): the same module names plus `.0` / `.1`. In place; returns it."""
    for parent in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(parent.named_children())
        for (name, layer), (_, after) in zip(children, children[1:]):
            if isinstance(after, nn.ReLU) and isinstance(layer, (nn.Conv2d, nn.Linear)):
                norm = nn.BatchNorm2d(layer.out_channels) if isinstance(layer, nn.Conv2d) \
                    else nn.BatchNorm1d(layer.out_features)
                setattr(parent, name, nn.Sequential(layer, norm))
    return model


def fold(model):
    """The state_dict of `model` (made by `add`) with every batch norm folded into the layer before it:
    it loads into the arch as torchvision builds it, and computes what `model` computes in eval mode."""
    folded = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and len(module) == 2 and \
                isinstance(module[1], nn.modules.batchnorm._BatchNorm):
            folded[name] = _folded(module[0], module[1])
    state = {}
    for key, value in model.state_dict().items():
        owner = next((name for name in folded if key.startswith(name + ".")), None)
        if owner is None:
            state[key] = value
        elif key.startswith(owner + ".0."):
            state[owner + key[len(owner) + 2:]] = folded[owner][key.rsplit(".", 1)[1]]
    return state


@torch.no_grad()
def _folded(layer, norm):
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    weight = layer.weight * scale.reshape(-1, *[1] * (layer.weight.dim() - 1))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
    return {"weight": weight.clone(), "bias": ((bias - norm.running_mean) * scale + norm.bias).clone()}
