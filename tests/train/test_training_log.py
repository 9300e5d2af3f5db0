import io
import json
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import cfg_in
from inversion.core import checkpoints
from inversion.train import training, training_log

SIZE_GUIDANCE = {"scalars": 0, "images": 0, "tensors": 0}  # 0: keep every event


def events(cfg, layer):
    acc = EventAccumulator(str(training_log.folder(cfg, layer)), size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    return acc


def history(cfg, layer):
    path = checkpoints.folder(cfg, layer) / checkpoints.HISTORY
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_scalars_equal_history(cfg, layer):
    acc, lines = events(cfg, layer), history(cfg, layer)
    for tag, key in training_log.SCALARS.items():
        logged = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert logged == [(h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in lines], tag
    return acc


def test_event_files_hold_the_history_a_fixed_image_strip_and_the_settings(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 2})
    training.train(cfg, ["conv5"])
    acc = assert_scalars_equal_history(cfg, "conv5")
    strips = acc.Images("reconstructions")
    assert [s.step for s in strips] == [1, 2]
    size = cfg["data.image_size"]
    with Image.open(io.BytesIO(strips[0].encoded_image_string)) as first:
        shown = min(training_log.NUM_IMAGES, cfg["split.num_classes"] * cfg["split.eval_per_class"])
        assert first.size == (shown * size, 2 * size)
        top = np.asarray(first)[:size]
    with Image.open(io.BytesIO(strips[1].encoded_image_string)) as second:
        assert np.array_equal(np.asarray(second)[:size], top)  # the same originals every epoch
    assert {"config/text_summary", "provenance/text_summary"} <= set(acc.Tags()["tensors"])
    text = acc.Tensors("provenance/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"kind": "random"' in text and "cache_hash" in text


def test_resume_appends_without_repeating_a_step_even_after_a_kill_between_log_and_save(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 1})
    training.train(cfg, ["conv5"])
    # A run killed after logging epoch 2 but before saving it leaves a step the checkpoint never had.
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(training_log.folder(cfg, "conv5"))) as stray:
        stray.add_scalar("loss/train", 123.0, 2)
    training.train(dict(cfg, **{"train.epochs": 2}), ["conv5"])
    acc = assert_scalars_equal_history(cfg, "conv5")
    assert [s.step for s in acc.Images("reconstructions")] == [1, 2]


def test_the_setting_turns_logging_off(built, tmp_path):
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 1, "train.tensorboard": False})
    training.train(cfg, ["conv5"])
    assert history(cfg, "conv5") and not training_log.folder(cfg).exists()


def test_a_missing_tensorboard_package_is_one_warning_not_a_failure(built, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    monkeypatch.setattr(training_log, "_warned", [])
    cfg = cfg_in(built, tmp_path, **{"train.epochs": 1})
    training.train(cfg, ["conv5", "fc8"])
    assert capsys.readouterr().err.count("no TensorBoard logs") == 1
    assert history(cfg, "fc8") and not training_log.folder(cfg).exists()


def test_only_rank_0_writes(built, tmp_path, monkeypatch):
    monkeypatch.setattr(training_log.distributed, "is_main", lambda: False)
    cfg = cfg_in(built, tmp_path)
    x, y = np.zeros((4, 3)), np.zeros((4, 8, 8, 3), np.uint8)
    assert training_log.open_log(cfg, "conv5", 0, {}, x, y) is None
    assert not training_log.folder(cfg).exists()


def test_png_encoder_round_trips():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(training_log.png(image))) as decoded:
        assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), image)
