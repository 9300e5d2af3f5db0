import re

import pytest
import torch

from inversion.core import decoders, encoder, encoder_graph
from inversion.core.errors import UserError
from inversion.core.layouts import ALEXNET_NODES, layout_text


# The README's table: each AlexNet layer by hand, after the ReLU (and the max-pool where one follows).
def _alexnet_by_hand(model, x):
    f, c = model.features, model.classifier
    flat = torch.flatten(model.avgpool(f(x)), 1)
    return {"conv1": f[:3](x), "conv2": f[:6](x), "conv3": f[:8](x), "conv4": f[:10](x), "conv5": f(x),
            "fc6": c[:3](flat), "fc7": c[:6](flat), "fc8": model(x)}


# One node of each torchvision family, random init, probed on the meta device: (arch, node, per-image
# shape, layout, the (C, H, W) map or vector its decoder reads).
FAMILIES = [
    ("alexnet", "features.5", (192, 13, 13), "chw", (192, 13, 13)),
    ("vgg11", "features.10", (256, 28, 28), "chw", (256, 28, 28)),
    ("resnet18", "layer3", (256, 14, 14), "chw", (256, 14, 14)),
    ("densenet121", "features.denseblock2", (512, 28, 28), "chw", (512, 28, 28)),
    ("googlenet", "inception4a", (512, 14, 14), "chw", (512, 14, 14)),
    ("inception_v3", "Mixed_6a", (768, 12, 12), "chw", (768, 12, 12)),
    ("mobilenet_v3_small", "features.6", (40, 14, 14), "chw", (40, 14, 14)),
    ("efficientnet_b0", "features.4", (80, 14, 14), "chw", (80, 14, 14)),
    ("regnet_x_400mf", "trunk_output.block3", (160, 14, 14), "chw", (160, 14, 14)),
    ("squeezenet1_0", "features.6", (256, 27, 27), "chw", (256, 27, 27)),
    ("shufflenet_v2_x0_5", "stage3", (96, 14, 14), "chw", (96, 14, 14)),
    ("mnasnet0_5", "layers.10", (40, 14, 14), "chw", (40, 14, 14)),
    ("convnext_tiny", "features.3", (192, 28, 28), "chw", (192, 28, 28)),
    ("convnext_tiny", "features.1.0.block.3", (56, 56, 384), "hwc", (384, 56, 56)),  # inside a block: NHWC
    ("swin_t", "features.5", (14, 14, 384), "hwc", (384, 14, 14)),
    ("swin_v2_t", "features.3", (28, 28, 192), "hwc", (192, 28, 28)),
    ("vit_b_16", "encoder.layers.encoder_layer_5", (197, 768), "cls_tokens", (768, 14, 14)),
    ("vit_b_32", "permute", (49, 768), "tokens", (768, 7, 7)),
    ("vit_b_16", "conv_proj", (768, 14, 14), "chw", (768, 14, 14)),
    ("maxvit_t", "blocks.1", (128, 28, 28), "chw", (128, 28, 28)),
    ("resnet18", "fc", (1000,), "vector", (1000,)),
]


def test_every_alexnet_layer_is_the_documented_node_from_one_forward():
    model, _ = encoder.load("alexnet", "random")
    x = torch.randn(2, 3, 224, 224)
    out = encoder_graph.extractor(model, "alexnet", list(ALEXNET_NODES))(x)
    expected = _alexnet_by_hand(model, x)
    assert list(out) == list(expected)
    for layer, value in expected.items():
        torch.testing.assert_close(out[layer], value, rtol=1e-5, atol=1e-5, msg=layer)
    assert encoder_graph.feature_shapes("alexnet", 224, list(out)) == {
        "conv1": (64, 27, 27), "conv2": (192, 13, 13), "conv3": (384, 13, 13), "conv4": (256, 13, 13),
        "conv5": (256, 6, 6), "fc6": (4096,), "fc7": (4096,), "fc8": (1000,)}


def test_any_torchvision_classifier_by_node_name():
    model, identity = encoder.load("resnet18", "random", seed=3)
    assert identity == {"arch": "resnet18", "kind": "random", "seed": 3}
    assert encoder.describe(identity).startswith("resnet18 random init, not ImageNet-pretrained")
    x = torch.randn(2, 3, 96, 96)
    out = encoder_graph.extractor(model, "resnet18", ["layer2", "fc"])(x)
    by_hand = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
    torch.testing.assert_close(out["layer2"], by_hand)
    torch.testing.assert_close(out["fc"], model(x))
    assert encoder_graph.feature_shapes("resnet18", 96, ["layer2", "fc"]) == {"layer2": (128, 12, 12), "fc": (1000,)}
    assert encoder_graph.network_order("resnet18", ["fc", "layer1.0.relu", "layer2"]) == ["layer1.0.relu", "layer2", "fc"]
    nodes = {name: rest for name, *rest in encoder_graph.list_nodes("resnet18", 64)}
    assert nodes["layer4.1.relu_1"] == [(512, 2, 2), "chw", None] and nodes["fc"] == [(1000,), "vector", None]
    assert "x" not in nodes


@pytest.mark.parametrize("arch, layers, fragment", [
    ("resnet19", ["fc"], "unknown torchvision classifier 'resnet19' (nearest: resnet18"),
    ("resnet18", ["layer5"], "'layer5' is not a node of ResNet (nearest: layer4"),
    ("resnet18", ["layer2.1.relu_9"], "nearest: layer2.1.relu_1"),
])
def test_unknown_arch_or_node_names_the_nearest(arch, layers, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        encoder_graph.feature_shapes(arch, 224, layers)


def test_a_node_that_is_not_one_tensor_is_refused():
    # shufflenet's channel shuffle reads sizes off tensors: those nodes return ints and Sizes
    nodes = {name: rest for name, *rest in encoder_graph.list_nodes("shufflenet_v2_x0_5", 224)}
    assert nodes["stage2.0.size"] == [None, None, "Size, not one tensor"]
    with pytest.raises(UserError, match="'stage2.0.size' of shufflenet_v2_x0_5 outputs Size, not one tensor"):
        encoder_graph.feature_shapes("shufflenet_v2_x0_5", 224, ["stage2.0.size"])


@pytest.mark.parametrize("arch, node, shape, layout, view", FAMILIES, ids=[f"{a}:{n}" for a, n, *_ in FAMILIES])
def test_each_family_gets_a_decoder_that_reads_its_layout(arch, node, shape, layout, view):
    assert encoder_graph.feature_layouts(arch, 224, [node]) == {node: (shape, layout)}
    with torch.device("meta"):  # the decoder's shapes are all that is checked: no memory, no compute
        model = decoders.Decoder(shape, layout=layout)
        out = model(torch.zeros(2, *shape))
        first = decoders.describe(model)[0]
    assert model.map_shape == view and out.shape == (2, 3, 64, 64)
    assert first[3:5] == (view[0], "x".join(map(str, view[1:])) or "1")


@pytest.mark.parametrize("arch, node, fragment", [
    ("maxvit_t", "blocks.0.layers.0.layers.window_attention.partition_op.reshape", "outputs 64x8x7x8x7, 5-D per image"),
    ("shufflenet_v2_x0_5", "stage2.0.view", "outputs 2x24x28x28, 4-D per image"),
    ("swin_t", "features.1.0.attn._get_relative_position_bias", "first dimension is not the batch"),
    ("convnext_tiny", "features.1.0.features_1_0_layer_scale", "first dimension is not the batch"),
    ("vit_b_16", "reshape", "outputs 768x196, 768 rows: neither tokens on a square grid"),
])
def test_a_node_no_decoder_reads_is_refused_in_one_line(arch, node, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)) as e:
        encoder_graph.feature_shapes(arch, 224, [node])
    assert "\n" not in str(e.value) and f"layers: node {node!r} of {arch}" in str(e.value)


def test_the_layout_is_read_off_the_dimensions_that_grow_with_the_input():
    """(C, H, W) and (H, W, C) with C == H == W, and a fixed-size arch's shapes, by their numbers."""
    assert encoder_graph._layout((14, 14, 14), (1, 2)) == ("chw", None)
    assert encoder_graph._layout((14, 14, 14), (0, 1)) == ("hwc", None)
    assert encoder_graph._layout((256, 6, 6), ()) == ("chw", None)  # fixed by an adaptive pool
    assert encoder_graph._layout((7, 7, 768), None) == ("hwc", None)
    assert encoder_graph._layout((50, 768), None) == ("cls_tokens", None)
    assert encoder_graph._layout((64, 768), (0,)) == ("tokens", None)
    assert encoder_graph._layout((768, 196), (1,))[0] is None
    assert [layout_text(s, k) for s, k in [((8, 8, 3), "chw"), ((8, 8, 3), "hwc"), ((197, 768), "cls_tokens"),
                                                  ((49, 32), "tokens"), ((10,), "vector")]] == [
        "C x H x W", "H x W x C", "tokens 1+14x14 x 768", "tokens 7x7 x 32", "vector"]
