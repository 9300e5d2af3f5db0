import re
import urllib.error

import pytest
import torch
import torchvision

from inversion import config, encoder
from inversion.errors import UserError


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _state(seed):
    torch.manual_seed(seed)
    return torchvision.models.alexnet().state_dict()


def test_imagenet_weights_load_through_the_standard_hub_path(torch_home):
    path = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True)
    state = _state(123)
    torch.save(state, path)
    assert encoder.hub_checkpoint() == path
    for weights in ("imagenet", "auto"):
        model, identity = encoder.load("alexnet", weights)
        assert identity["kind"] == "imagenet" and identity["name"] == "AlexNet_Weights.IMAGENET1K_V1"
        assert len(identity["sha256"]) == 64
        assert torch.equal(model.features[0].weight, state["features.0.weight"])
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert "ImageNet-pretrained" in encoder.describe(identity) and encoder.is_pretrained(identity)


def _offline(monkeypatch):
    def fail(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torchvision.models.AlexNet_Weights.IMAGENET1K_V1, "get_state_dict", fail)


def test_auto_falls_back_to_labelled_random_init(torch_home, monkeypatch, capsys):
    _offline(monkeypatch)
    model, identity = encoder.load("alexnet", "auto", seed=7)
    assert identity == {"arch": "alexnet", "kind": "random", "seed": 7}
    assert "RANDOM-INIT" in capsys.readouterr().err
    assert "random init, not ImageNet-pretrained" in encoder.describe(identity)
    assert not encoder.is_pretrained(identity)


def test_imagenet_unavailable_says_where_to_put_the_file(torch_home, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(UserError, match="alexnet-owt-7be5be79.pth"):
        encoder.load("alexnet", "imagenet")


def test_random_init_is_seeded():
    a, _ = encoder.load("alexnet", "random", seed=1)
    b, _ = encoder.load("alexnet", "random", seed=1)
    c, _ = encoder.load("alexnet", "random", seed=2)
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_state_dict_file_and_wrong_shapes(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(_state(5), good)
    model, identity = encoder.load("alexnet", str(good))
    assert identity["kind"] == "file" and len(identity["sha256"]) == 64
    assert encoder.reload(identity) is not None
    bad = _state(5)
    bad["classifier.6.weight"] = torch.zeros(10, 4096)
    bad["classifier.6.bias"] = torch.zeros(10)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="does not fit"):
        encoder.load("alexnet", str(tmp_path / "bad.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.pth"):
        encoder.load("alexnet", str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="no such file"):
        encoder.load("alexnet", str(tmp_path / "absent.pth"))


# The README's table: each AlexNet layer by hand, after the ReLU (and the max-pool where one follows).
def _alexnet_by_hand(model, x):
    f, c = model.features, model.classifier
    flat = torch.flatten(model.avgpool(f(x)), 1)
    return {"conv1": f[:3](x), "conv2": f[:6](x), "conv3": f[:8](x), "conv4": f[:10](x), "conv5": f(x),
            "fc6": c[:3](flat), "fc7": c[:6](flat), "fc8": model(x)}


def test_every_alexnet_layer_is_the_documented_node_from_one_forward():
    model, _ = encoder.load("alexnet", "random")
    x = torch.randn(2, 3, 224, 224)
    out = encoder.extractor(model, "alexnet", list(config.ALEXNET_NODES))(x)
    expected = _alexnet_by_hand(model, x)
    assert list(out) == list(expected)
    for layer, value in expected.items():
        torch.testing.assert_close(out[layer], value, rtol=1e-5, atol=1e-5, msg=layer)
    assert encoder.feature_shapes("alexnet", 224, list(out)) == {
        "conv1": (64, 27, 27), "conv2": (192, 13, 13), "conv3": (384, 13, 13), "conv4": (256, 13, 13),
        "conv5": (256, 6, 6), "fc6": (4096,), "fc7": (4096,), "fc8": (1000,)}


def test_any_torchvision_classifier_by_node_name():
    model, identity = encoder.load("resnet18", "random", seed=3)
    assert identity == {"arch": "resnet18", "kind": "random", "seed": 3}
    assert encoder.describe(identity).startswith("resnet18 random init, not ImageNet-pretrained")
    x = torch.randn(2, 3, 96, 96)
    out = encoder.extractor(model, "resnet18", ["layer2", "fc"])(x)
    by_hand = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
    torch.testing.assert_close(out["layer2"], by_hand)
    torch.testing.assert_close(out["fc"], model(x))
    assert encoder.feature_shapes("resnet18", 96, ["layer2", "fc"]) == {"layer2": (128, 12, 12), "fc": (1000,)}
    assert encoder.network_order("resnet18", ["fc", "layer1.0.relu", "layer2"]) == ["layer1.0.relu", "layer2", "fc"]
    nodes = dict(encoder.list_nodes("resnet18", 64))
    assert nodes["layer4.1.relu_1"] == (512, 2, 2) and nodes["fc"] == (1000,) and "x" not in nodes


@pytest.mark.parametrize("arch, layers, fragment", [
    ("resnet19", ["fc"], "unknown torchvision classifier 'resnet19' (nearest: resnet18"),
    ("resnet18", ["layer5"], "'layer5' is not a node of ResNet (nearest: layer4"),
    ("resnet18", ["layer2.1.relu_9"], "nearest: layer2.1.relu_1"),
])
def test_unknown_arch_or_node_names_the_nearest(arch, layers, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        encoder.feature_shapes(arch, 224, layers)


def test_a_node_that_is_not_one_tensor_is_refused():
    # shufflenet's channel shuffle reads sizes off tensors: those nodes return ints and Sizes
    nodes = dict(encoder.list_nodes("shufflenet_v2_x0_5", 224))
    assert nodes["stage2.0.size"] == "not one tensor (Size)"
    with pytest.raises(UserError, match="'stage2.0.size' of shufflenet_v2_x0_5 outputs Size, not one tensor"):
        encoder.feature_shapes("shufflenet_v2_x0_5", 224, ["stage2.0.size"])


def test_preprocess_is_the_documented_pipeline():
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = encoder.preprocess(images, 96, "alexnet")
    expected = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float() / 255, size=(96, 96),
                                               mode="bilinear", align_corners=False)
    mean, std = encoder.normalisation("alexnet")
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
    expected = (expected - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
