import urllib.error

import pytest
import torch
import torchvision

from inversion.core import encoder
from inversion.core.errors import UserError


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _state(seed):
    torch.manual_seed(seed)
    return torchvision.models.alexnet().state_dict()


def _offline(monkeypatch):
    def fail(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torchvision.models.AlexNet_Weights.IMAGENET1K_V1, "get_state_dict", fail)


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
    """On a small classifier (5 MB of weights; AlexNet's are 244 MB): nothing here depends on the arch."""
    torch.manual_seed(5)
    state = torchvision.models.squeezenet1_1().state_dict()
    good = tmp_path / "good.pth"
    torch.save(state, good)
    model, identity = encoder.load("squeezenet1_1", str(good))
    assert identity["kind"] == "file" and len(identity["sha256"]) == 64
    assert torch.equal(model.classifier[1].weight, state["classifier.1.weight"]) and not model.training
    assert model.features[0].weight.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    assert encoder.reload(identity) is not None
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "half.pth")  # loaded as built: float32
    assert encoder.load("squeezenet1_1", str(tmp_path / "half.pth"))[0].classifier[1].weight.dtype == torch.float32
    bad = dict(state, **{"classifier.1.weight": torch.zeros(10, 512, 1, 1), "classifier.1.bias": torch.zeros(10)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"bad\.pth does not fit torchvision's squeezenet1_1 \(size mismatch"):
        encoder.load("squeezenet1_1", str(tmp_path / "bad.pth"))
    torch.save({k: v for k, v in state.items() if k != "features.0.bias"}, tmp_path / "short.pth")
    with pytest.raises(UserError, match=r"short\.pth does not fit .*features\.0\.bias"):
        encoder.load("squeezenet1_1", str(tmp_path / "short.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.pth"):
        encoder.load("squeezenet1_1", str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="no such file"):
        encoder.load("squeezenet1_1", str(tmp_path / "absent.pth"))


def test_preprocess_is_the_documented_pipeline():
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = encoder.preprocess(images, 96, "alexnet")
    expected = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float() / 255, size=(96, 96),
                                               mode="bilinear", align_corners=False)
    mean, std = encoder.normalisation("alexnet")
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
    expected = (expected - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
