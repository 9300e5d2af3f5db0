import urllib.error

import pytest
import torch
import torchvision

from inversion import encoder
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
        model, identity = encoder.load(weights)
        assert identity["kind"] == "imagenet" and identity["name"] == "AlexNet_Weights.IMAGENET1K_V1"
        assert len(identity["sha256"]) == 64
        assert torch.equal(model.features[0].weight, state["features.0.weight"])
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert "ImageNet-pretrained" in encoder.describe(identity) and encoder.is_pretrained(identity)


def _offline(monkeypatch):
    def fail(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(encoder.IMAGENET, "get_state_dict", fail)


def test_auto_falls_back_to_labelled_random_init(torch_home, monkeypatch, capsys):
    _offline(monkeypatch)
    model, identity = encoder.load("auto", seed=7)
    assert identity == {"kind": "random", "seed": 7}
    assert "RANDOM-INIT" in capsys.readouterr().err
    assert "random init, not ImageNet-pretrained" in encoder.describe(identity)
    assert not encoder.is_pretrained(identity)


def test_imagenet_unavailable_says_where_to_put_the_file(torch_home, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(UserError, match="alexnet-owt-7be5be79.pth"):
        encoder.load("imagenet")


def test_random_init_is_seeded():
    a, _ = encoder.load("random", seed=1)
    b, _ = encoder.load("random", seed=1)
    c, _ = encoder.load("random", seed=2)
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_state_dict_file_and_wrong_shapes(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(_state(5), good)
    model, identity = encoder.load(str(good))
    assert identity["kind"] == "file" and len(identity["sha256"]) == 64
    assert encoder.reload(identity) is not None
    bad = _state(5)
    bad["classifier.6.weight"] = torch.zeros(10, 4096)
    bad["classifier.6.bias"] = torch.zeros(10)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="does not fit"):
        encoder.load(str(tmp_path / "bad.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.pth"):
        encoder.load(str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="no such file"):
        encoder.load(str(tmp_path / "absent.pth"))


def test_taps_and_shapes_match_torchvision():
    model, _ = encoder.load("random")
    x = torch.randn(2, 3, 224, 224)
    out = encoder.taps(model, x, ["conv2", "conv5", "fc6", "fc8"])
    assert torch.allclose(out["fc8"], model(x), atol=1e-5)
    assert torch.allclose(out["conv5"], model.features(x))
    assert encoder.feature_shapes(224, ["conv2", "conv5", "fc6", "fc8"]) == {
        "conv2": (192, 13, 13), "conv5": (256, 6, 6), "fc6": (4096,), "fc8": (1000,)}
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == encoder.feature_shapes(224, list(out))


def test_preprocess_is_the_documented_pipeline():
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = encoder.preprocess(images, 96)
    expected = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float() / 255, size=(96, 96),
                                               mode="bilinear", align_corners=False)
    expected = (expected - torch.tensor(encoder.MEAN).view(1, 3, 1, 1)) / torch.tensor(encoder.STD).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
