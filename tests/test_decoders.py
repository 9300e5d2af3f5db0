import pytest
import torch

from inversion import decoders, encoder

SHAPES = encoder.feature_shapes(224, ["conv2", "conv5", "fc6", "fc8"])


@pytest.mark.parametrize("layer", list(SHAPES))
@pytest.mark.parametrize("width", [0.5, 0.25])
def test_each_decoder_maps_its_features_to_64px_rgb(layer, width):
    model = decoders.Decoder(SHAPES[layer], width)
    out = model(torch.randn(2, *SHAPES[layer]))
    assert out.shape == (2, 3, 64, 64)
    rows = decoders.describe(model)
    assert sum(r[-1] for r in rows) == sum(p.numel() for p in model.parameters())
    assert rows[0][3:5] == (SHAPES[layer][0], "x".join(map(str, SHAPES[layer][1:])) or "1")
    assert rows[-1][0] == "uconv" and rows[-1][3:5] == (3, "64x64")  # linear output layer
    assert all(r[0].endswith("+ lrelu") for r in rows if r[0] in ("conv + lrelu", "fc + lrelu"))
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in model) == sum("lrelu" in r[0] for r in rows)


def test_width_halves_conv_channels_but_not_fc():
    half = decoders.describe(decoders.Decoder(SHAPES["conv2"], 0.5))
    full = decoders.describe(decoders.Decoder(SHAPES["conv2"], 1.0))
    assert [r[3] for r in half if r[0].startswith("conv")] == [128] * 3
    assert [r[3] for r in full if r[0].startswith("conv")] == [256] * 3
    fc = decoders.describe(decoders.Decoder(SHAPES["fc8"], 0.5))
    assert [r[3] for r in fc if r[0].startswith("fc")] == [4096] * 3
    assert [r[3] for r in fc if r[0].startswith("uconv")] == [128, 64, 32, 3]


def test_input_scale_divides_the_features():
    model = decoders.Decoder(SHAPES["fc8"])
    x = torch.randn(1, 1000)
    reference = model(x)
    model.input_scale.fill_(2.0)
    assert torch.allclose(model(2 * x), reference, atol=1e-6)
    assert "input_scale" in model.state_dict()


@pytest.mark.parametrize("out_size", [32, 128, 256])
@pytest.mark.parametrize("layer", ["conv2", "fc8"])
def test_any_power_of_two_output_adds_or_drops_up_convolutions(layer, out_size):
    model = decoders.Decoder(SHAPES[layer], 0.5, out_size=out_size)
    assert model(torch.randn(1, *SHAPES[layer])).shape == (1, 3, out_size, out_size)
    grid = 16 if layer == "conv2" else 4
    uconvs = [r for r in decoders.describe(model) if r[0].startswith("uconv")]
    assert len(uconvs) == (out_size // grid).bit_length() - 1  # log2(out_size / grid)


def test_the_up_convolution_stack_keeps_halving_past_the_papers_four():
    rows = decoders.describe(decoders.Decoder(SHAPES["fc8"], 0.5, out_size=256))  # 4 -> 256: 6 steps
    assert [r[3] for r in rows if r[0].startswith("uconv")] == [128, 64, 32, 16, 8, 3]
    assert decoders.describe(decoders.Decoder(SHAPES["conv2"], 1.0, out_size=128))[-3][3] == 256


def test_an_output_no_larger_than_the_feature_grid_is_a_clear_error():
    from inversion.errors import UserError

    with pytest.raises(UserError, match="data.image_size 16 is not above the 16x16 grid"):
        decoders.Decoder(SHAPES["conv2"], out_size=16)
