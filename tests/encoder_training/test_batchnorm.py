"""Batch norm added for training and folded away: the saved network is torchvision's own and computes what
the trained one does."""

import torch
import torchvision
from torch import nn

from inversion.encoder_training import batchnorm


def test_alexnet_gets_batch_norm_after_every_conv_and_hidden_fc_and_folds_back_exactly():
    torch.manual_seed(0)
    model = batchnorm.add(torchvision.models.alexnet(num_classes=7))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 5 + 2 and batchnorm.has_batchnorm(model)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics that are not the init's
            model(torch.randn(4, 3, 96, 96) * 2 + 0.5)
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    plain = torchvision.models.alexnet(num_classes=7)
    plain.load_state_dict(batchnorm.fold(model))  # strict: exactly torchvision's keys and shapes
    assert not batchnorm.has_batchnorm(plain)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        trained, folded = model.eval()(x), plain.eval()(x)
    assert torch.allclose(trained, folded, rtol=1e-4, atol=1e-4 * trained.abs().max().item())


def test_a_network_without_relu_after_its_layers_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Linear(4, 2))
    assert not batchnorm.has_batchnorm(batchnorm.add(model))
    assert batchnorm.fold(model).keys() == model.state_dict().keys()
