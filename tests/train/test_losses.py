"""The perceptual objective: each loss term, the discriminator and its balancing rule, fine-tuning, resume."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import cfg_in
from inversion.core import checkpoints, config, encoder, encoder_graph, feature_cache
from inversion.core.errors import UserError
from inversion.core.images import to_target
from inversion.train import losses, training


def one_batch(cache, n=4):
    return torch.from_numpy(cache["train"]["conv5"][:n]).float(), torch.from_numpy(cache["train"]["images"][:n])


def test_pixel_only_with_weight_one_is_the_plain_loop():
    assert not losses.active(config.defaults())
    assert losses.active(dict(config.defaults(), **{"loss.feature": 0.01}))
    assert losses.active(dict(config.defaults(), **{"loss.pixel": 2.0}))


def test_discriminator_has_the_papers_layers_and_two_logits():
    d = losses.Discriminator()
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (32, 7, 4), (64, 5, 1), (128, 3, 2), (256, 3, 1), (256, 3, 2)]
    assert [m.p for m in d.modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    assert d(torch.rand(3, 3, 64, 64)).shape == (3, 2)


def test_balance_pauses_d_below_a_tenth_resumes_above_a_half_and_pauses_g_above_ten():
    b = losses.Balance()
    assert b.update(1.0, 1.0) == (True, True)
    assert b.update(0.05, 1.0) == (False, True)   # r = 0.05: D too far ahead
    assert b.update(0.3, 1.0) == (False, True)    # 0.1 < r < 0.5: stays paused
    assert b.update(0.6, 1.0) == (True, True)     # r > 0.5: D resumes
    assert b.update(11.0, 1.0) == (True, False)   # r > 10: G paused


def test_feature_term_is_the_mse_at_the_comparator_against_the_cached_features(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"loss.pixel": 0.0, "loss.feature": 1.0})
    with feature_cache.open_for(cfg, ["conv5"]) as cache:
        objective = losses.Objective(cfg, cache, "conv5", torch.device("cpu"))
        x, y = one_batch(cache)
        cached = torch.from_numpy(cache["train"]["conv5"][:4]).float()
    model = checkpoints.build(checkpoints.make_spec("conv5", x.shape[1:], "chw", 0.25, 64, 64))
    before = copy.deepcopy(model)
    loss = objective.step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, cached, 1.0)
    encoded, _ = encoder.load("alexnet", "random", 0)
    taps = encoder_graph.extractor(encoded, "alexnet", ["conv5"])
    expected = F.mse_loss(taps(encoder.preprocess_float(before(x), 224))["conv5"], cached)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the cached targets are the encoder's features of the images: encoding them again agrees
    assert torch.allclose(objective.comparator(to_target(y)), cached, atol=1e-4)


def test_pixel_term_is_weighted_pixel_mse(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"loss.pixel": 3.0})
    with feature_cache.open_for(cfg, ["conv5"]) as cache:
        objective = losses.Objective(cfg, cache, "conv5", torch.device("cpu"))
        x, y = one_batch(cache)
    assert objective.comparator is None and objective.d is None  # no encoder, no discriminator needed
    model = checkpoints.build(checkpoints.make_spec("conv5", x.shape[1:], "chw", 0.25, 64, 64))
    expected = 3.0 * F.mse_loss(model(x), to_target(y))
    loss = objective.step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, None, 1.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_adversarial_term_trains_d_to_tell_and_g_to_fool(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"loss.pixel": 0.0, "loss.adversarial": 1.0})
    with feature_cache.open_for(cfg, ["conv5"]) as cache:
        objective = losses.Objective(cfg, cache, "conv5", torch.device("cpu"))
        x, y = one_batch(cache)
    model = checkpoints.build(checkpoints.make_spec("conv5", x.shape[1:], "chw", 0.25, 64, 64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g0, d0 = copy.deepcopy(model.state_dict()), copy.deepcopy(objective.d.state_dict())
    loss = objective.step(model, optimizer, x, y, None, 1.0)
    assert loss.item() > 0 and objective.last[0] > 0 and objective.last[1] == pytest.approx(loss.item(), rel=1e-5)
    assert any(not torch.equal(v, objective.d.state_dict()[k]) for k, v in d0.items())   # D stepped
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in g0.items())         # G stepped
    objective.d.eval()  # D's loss on real vs fake falls as D trains on these images
    real, fake = to_target(y), model(x).detach()
    before = F.cross_entropy(objective.d(torch.cat([real, fake])), torch.tensor([1] * 4 + [0] * 4))
    for _ in range(15):
        objective.step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, None, 1.0)
    objective.d.eval()
    after = F.cross_entropy(objective.d(torch.cat([real, fake])), torch.tensor([1] * 4 + [0] * 4))
    assert after < before


def test_generator_and_discriminator_resume_exactly(built, tmp_path):
    settings = {"loss.feature": 0.05, "loss.adversarial": 0.1}
    straight = training.train(cfg_in(built, tmp_path / "straight", **settings), ["conv5"])["conv5"]
    cfg = cfg_in(built, tmp_path / "cut", **settings, **{"train.epochs": 1})
    training.train(cfg, ["conv5"])
    folder = tmp_path / "cut/decoders/conv5"
    assert "discriminator_optimizer" in torch.load(folder / "optimizer.pt", weights_only=True)
    resumed = training.train(dict(cfg, **{"train.epochs": 2}), ["conv5"])["conv5"]
    assert [(h["train_loss"], h["eval_loss"]) for h in resumed] == [(h["train_loss"], h["eval_loss"]) for h in straight]
    a = torch.load(tmp_path / "straight/decoders/conv5/last.pt", weights_only=True)
    b = torch.load(folder / "last.pt", weights_only=True)
    for key in ("model", "discriminator"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["balance"] == b["balance"] and a["losses"] == {**settings, "loss.pixel": 1.0, "loss.comparator": "conv5"}
    model, _ = checkpoints.load_decoder(folder / "best.pt")  # render and reconstruct read it like any other
    assert model(torch.zeros(1, 256, 6, 6)).shape == (1, 3, 64, 64)


def test_pixel_checkpoints_refuse_to_resume_under_other_losses(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 1})
    training.train(cfg, ["conv5"])
    with pytest.raises(UserError, match="losses"):
        training.train(dict(cfg, **{"train.epochs": 2, "loss.feature": 0.1}), ["conv5"])


def test_fine_tuning_starts_from_the_pixel_decoder_and_checks_it_fits(built, tmp_path):
    width = {"decoder.width": 0.5}  # the default: a decoder that learns something in two epochs on the tiny data
    pixel = training.train(cfg_in(built, tmp_path / "pixel", **width, **{"train.epochs": 2}), ["conv5"])["conv5"]
    tuned = training.train(cfg_in(built, tmp_path / "tuned", **width, **{
        "train.epochs": 1, "loss.adversarial": 0.01, "train.init_from": str(tmp_path / "pixel/decoders")}), ["conv5"])["conv5"]
    fresh = training.train(cfg_in(built, tmp_path / "fresh", **width, **{"train.epochs": 1, "loss.adversarial": 0.01}),
                           ["conv5"])["conv5"]
    assert tuned[0]["eval_loss"] < 0.8 * fresh[0]["eval_loss"]  # it started where the pixel decoder ended
    assert abs(tuned[0]["eval_loss"] - pixel[-1]["eval_loss"]) < abs(fresh[0]["eval_loss"] - pixel[-1]["eval_loss"])
    with pytest.raises(UserError, match="train.init_from: .* another decoder architecture"):
        training.train(cfg_in(built, tmp_path / "wide", **{"decoder.width": 1.0,
                                                           "train.init_from": str(tmp_path / "pixel/decoders")}),
                       ["conv5"])
    with pytest.raises(UserError, match="train.init_from: no .*fc8"):
        training.train(cfg_in(built, tmp_path / "none", **{"train.init_from": str(tmp_path / "pixel/decoders")}),
                       ["fc8"])


def test_perceptual_losses_refuse_streamed_input_and_holdout(built, tmp_path):
    with pytest.raises(UserError, match="train.in_memory=true"):
        training.train(cfg_in(built, tmp_path / "a", **{"loss.feature": 0.1, "train.in_memory": False}), ["conv5"])
    with pytest.raises(UserError, match="train.holdout"):
        training.train(cfg_in(built, tmp_path / "b", **{"loss.feature": 0.1, "train.holdout": 0.2}), ["conv5"])


def test_an_unknown_comparator_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_text("{}\n")
    with pytest.raises(UserError, match="loss.comparator: unknown layer 'conv9'"):
        config.load(tmp_path / "c.yaml", ["loss.comparator=conv9"])


def test_the_perceptual_step_runs_in_bf16_with_a_fused_discriminator_optimiser(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"loss.feature": 0.05, "loss.adversarial": 1.0})
    with feature_cache.open_for(cfg, ["conv5"]) as cache:
        objective = losses.Objective(cfg, cache, "conv5", torch.device("cpu"), "bf16")
        x, y = one_batch(cache)
    assert objective.d_optimizer.defaults["fused"]
    model = checkpoints.build(checkpoints.make_spec("conv5", x.shape[1:], "chw", 0.25, 64, 64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    loss = objective.step(model, optimizer, x, y, None, 1.0)
    hook.remove()
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in [*model.parameters(), *objective.d.parameters()])
