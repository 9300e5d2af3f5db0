"""Decoders at work for render, reconstruct.py and the baseline: loaded for a cache, decoded in the set precision."""

import pytest
import torch

from inversion.core import feature_cache, inference
from inversion.core.errors import UserError


def test_loaded_decoders_decode_in_the_configured_precision(trained):
    with feature_cache.open_for(trained) as cache:
        features = cache["eval"]["conv5"][()]
        out = {}
        for precision in ("fp32", "bf16"):
            decoders = inference.load_decoders(dict(trained, precision=precision), cache, ["conv5"])
            model = decoders["conv5"][0]
            assert model.precision == precision
            out[precision] = inference.decode(model, features, 3, torch.device("cpu"))
    assert out["fp32"].dtype == out["bf16"].dtype == torch.float32 and out["fp32"].shape[1:] == (3, 64, 64)
    assert not torch.equal(out["fp32"], out["bf16"])  # bf16 really ran
    assert (out["fp32"] - out["bf16"]).abs().max() < 0.05
    assert 0 <= out["fp32"].min() and out["fp32"].max() <= 1


def test_no_checkpoint_for_any_layer_is_one_error(built, tmp_path):
    cfg = dict(built[0], **{"output.dir": str(tmp_path)})
    with feature_cache.open_for(cfg) as cache, pytest.raises(UserError, match="no decoder checkpoints"):
        inference.load_decoders(cfg, cache, ["conv5"])
