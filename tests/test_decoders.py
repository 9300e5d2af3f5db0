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
