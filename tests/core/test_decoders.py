import pytest
import torch

from inversion.core import config, decoders, encoder_graph
from inversion.core.layouts import ALEXNET_NODES

SHAPES = encoder_graph.feature_shapes("alexnet", 224, list(ALEXNET_NODES))


ODD_SHAPES = {"1x1 map": (2048, 1, 1), "2x2 map": (512, 2, 2), "224x224 map": (64, 224, 224),
              "7x7 map": (512, 7, 7), "vector 10": (10,), "vector 4096": (4096,)}


@pytest.mark.parametrize("shape", list(SHAPES.values()) + list(ODD_SHAPES.values()),
                         ids=list(SHAPES) + list(ODD_SHAPES))
@pytest.mark.parametrize("width", [0.5, 0.25])
def test_each_decoder_maps_its_features_to_64px_rgb(shape, width):
    model = decoders.Decoder(shape, width, fc_width=64)  # tiny fc layers: the rule is the same
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 3, 64, 64)
    rows = decoders.describe(model)
    assert sum(r[-1] for r in rows) == sum(p.numel() for p in model.parameters())
    assert rows[0][3:5] == (shape[0], "x".join(map(str, shape[1:])) or "1")
    assert rows[-1][0] == "uconv" and rows[-1][3:5] == (3, "64x64")  # linear output layer
    learned = [r[0] for r in rows[1:-1] if r[0].split()[0] in ("fc", "conv", "uconv")]
    assert learned and all(name.endswith(" + lrelu") for name in learned)  # every learned layer but the last
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in model) == len(learned)


def test_width_halves_conv_channels_but_not_fc():
    half = decoders.describe(decoders.Decoder(SHAPES["conv2"], 0.5))
    full = decoders.describe(decoders.Decoder(SHAPES["conv2"], 1.0))
    assert [r[3] for r in half if r[0].startswith("conv")] == [128] * 3
    assert [r[3] for r in full if r[0].startswith("conv")] == [256] * 3
    fc = decoders.describe(decoders.Decoder(SHAPES["fc8"], 0.5, fc_width=256))
    assert [r[3] for r in fc if r[0].startswith("fc")] == [256] * 3
    assert [r[3] for r in fc if r[0].startswith("uconv")] == [128, 64, 32, 3]


def test_fc_width_sets_the_fc_layers_and_the_reshaped_grid():
    rows = decoders.describe(decoders.Decoder((10,), fc_width=32))
    assert [(r[0], r[3], r[4]) for r in rows[1:5]] == [("fc + lrelu", 32, "1")] * 3 + [("reshape", 2, "4x4")]
    with pytest.raises(ValueError, match="multiple of 16"):
        decoders.Decoder((10,), fc_width=40)


@pytest.mark.parametrize("layer", ["conv5", "fc8"])
def test_features_are_standardised_per_channel(layer):
    model = decoders.Decoder(SHAPES[layer], fc_width=64)
    x = torch.randn(2, *SHAPES[layer])
    reference = model(x)
    stats = model.input_mean.shape
    mean, std = torch.randn(stats), torch.rand(stats) + 0.5
    model.input_mean.copy_(mean)
    model.input_std.copy_(std)
    assert torch.allclose(model(x * std + mean), reference, atol=1e-5)
    assert stats[0] == SHAPES[layer][0] and {"input_mean", "input_std"} <= set(model.state_dict())


def test_a_checkpoint_with_one_scalar_input_scale_loads_as_that_divisor():
    """Checkpoints from before per-channel standardisation divided the features by one scalar."""
    model = decoders.Decoder(SHAPES["conv5"])
    state = model.state_dict()
    del state["input_mean"], state["input_std"]
    state["input_scale"] = torch.tensor(2.0)
    old = decoders.Decoder(SHAPES["conv5"])
    old.load_state_dict(state)
    x = torch.randn(2, *SHAPES["conv5"])
    assert torch.allclose(old(2 * x), model(x), atol=1e-6)
    assert "input_scale" not in old.state_dict()


def test_the_default_decoders_are_unchanged():
    """The four default decoders at the paper's fc width, by parameter count (built on the meta device:
    no memory) and layer list."""
    with torch.device("meta"):
        params = {layer: sum(p.numel() for p in decoders.Decoder(SHAPES[layer]).parameters())
                  for layer in config.LAYERS}
    assert params == {"conv2": 935_811, "conv5": 1_209_603, "fc6": 51_421_763, "fc8": 38_740_547}
    kinds = [r[0] for r in decoders.describe(decoders.Decoder(SHAPES["conv2"]))]
    assert kinds == ["input", *["conv + lrelu"] * 3, "resize", "uconv + lrelu", "uconv"]


def test_the_rule_for_large_small_and_flat_maps():
    big = decoders.describe(decoders.Decoder((64, 224, 224)))
    assert [(r[2], r[4]) for r in big if r[0].startswith("conv")][:3] == [(2, "112x112"), (2, "56x56"), (2, "28x28")]
    assert [r[4] for r in big if r[0] == "resize"] == ["32x32"]
    for shape in ((2048, 1, 1), (512, 2, 2)):
        kinds = [r[0] for r in decoders.describe(decoders.Decoder(shape, fc_width=64))]
        assert kinds[1:5] == ["flatten", "fc + lrelu", "fc + lrelu", "fc + lrelu"]
    no_resize = [r[0] for r in decoders.describe(decoders.Decoder((64, 16, 16)))]
    assert "resize" not in no_resize and no_resize.count("uconv + lrelu") == 1


@pytest.mark.parametrize("out_size, uconvs", [(32, 3), (128, 5), (256, 6)])
def test_larger_outputs_add_up_convolutions(out_size, uconvs):
    model = decoders.Decoder(SHAPES["fc6"], out_size=out_size, fc_width=64)
    assert model(torch.randn(1, 4096)).shape == (1, 3, out_size, out_size)
    assert sum(r[0].startswith("uconv") for r in decoders.describe(model)) == uconvs
    with pytest.raises(ValueError, match="power of two"):
        decoders.Decoder(SHAPES["fc6"], out_size=100)


@pytest.mark.parametrize("out_size", [32, 128, 256])
@pytest.mark.parametrize("layer", ["conv2", "fc8"])
def test_any_power_of_two_output_adds_or_drops_up_convolutions(layer, out_size):
    model = decoders.Decoder(SHAPES[layer], 0.5, out_size=out_size, fc_width=64)
    assert model(torch.randn(1, *SHAPES[layer])).shape == (1, 3, out_size, out_size)
    grid = 16 if layer == "conv2" else 4
    uconvs = [r for r in decoders.describe(model) if r[0].startswith("uconv")]
    assert len(uconvs) == (out_size // grid).bit_length() - 1  # log2(out_size / grid)


def test_the_up_convolution_stack_keeps_halving_past_the_papers_four():
    rows = decoders.describe(decoders.Decoder(SHAPES["fc8"], 0.5, out_size=256, fc_width=64))  # 4 -> 256
    assert [r[3] for r in rows if r[0].startswith("uconv")] == [128, 64, 32, 16, 8, 3]
    assert decoders.describe(decoders.Decoder(SHAPES["conv2"], 1.0, out_size=128))[-3][3] == 256


def test_a_map_larger_than_half_a_small_output_is_halved_first():
    model = decoders.Decoder(SHAPES["conv2"], out_size=16)  # 13x13 -> stride 2 -> 7x7 -> 8x8 -> 16x16
    assert model(torch.randn(1, *SHAPES["conv2"])).shape == (1, 3, 16, 16)
    assert [(r[2], r[4]) for r in decoders.describe(model) if r[0].startswith("conv")][0] == (2, "7x7")


@pytest.mark.parametrize("shape, layout, view", [((6, 6, 32), "hwc", (32, 6, 6)), ((37, 16), "cls_tokens", (16, 6, 6)),
                                                 ((36, 16), "tokens", (16, 6, 6))])
def test_other_layouts_are_standardised_per_channel_in_the_map_view(shape, layout, view):
    """The statistics training takes on `arrange`d features are the channels forward standardises."""
    from inversion.train import training
    torch.manual_seed(0)
    model = decoders.Decoder(shape, layout=layout)
    assert model.map_shape == view
    offsets = torch.randn(view[0]) * 10  # per channel, wherever the layout keeps its channels
    raw = torch.randn(8, *view[1:], view[0]) + offsets  # channels last: hwc as is, tokens once flattened
    raw = raw if layout == "hwc" else raw.flatten(1, 2)
    if layout == "cls_tokens":
        raw = torch.cat([raw[:, :1], raw], 1)
    mean, std = training.standardisation(raw, arrange=model.arrange)
    assert mean.shape == (view[0],) and torch.allclose(mean, offsets, atol=1.0)
    model.input_mean.copy_(mean.view_as(model.input_mean))
    model.input_std.copy_(std.view_as(model.input_std))
    grid = model.to_map(raw)
    assert grid.shape == (8, *view)
    if layout != "cls_tokens":
        assert abs(grid.mean().item()) < 0.1 and abs(grid.std().item() - 1) < 0.1
    assert model(raw).shape == (8, 3, 64, 64)


def test_the_class_token_reaches_the_image_and_the_grid_is_read_in_place():
    model = decoders.Decoder((1 + 36, 16), layout="cls_tokens")
    x = torch.randn(2, 37, 16)
    changed = x.clone()
    changed[:, 0] += 1
    assert not torch.allclose(model(x), model(changed))
    rows = decoders.describe(model)
    assert rows[1][0].startswith("class token") and rows[1][-1] == 16 * 16 + 16
    assert sum(r[-1] for r in rows) == sum(p.numel() for p in model.parameters())
    # patch token 7 (row 1, column 1 of the 6x6 grid) lands at (1, 1), with its 16 values as channels
    tokens = decoders.Decoder((36, 16), layout="tokens")
    x = torch.zeros(1, 36, 16)
    x[0, 7] = torch.arange(16.0)
    assert torch.equal(tokens.to_map(x)[0, :, 1, 1], torch.arange(16.0))
    hwc = decoders.Decoder((6, 6, 16), layout="hwc")
    assert torch.equal(hwc.to_map(x.view(1, 6, 6, 16))[0, :, 1, 1], torch.arange(16.0))
