"""Shared fixtures: a small Tiny-ImageNet-shaped zip and a cache built from it by the real code."""

import os

# One compute thread per test process and per process a test starts (they inherit it), set before torch
# is imported: the suite's tensors are tiny, pytest-xdist already runs one worker per core, and a second
# OpenMP thread per process on a busy core spins more than it computes (4x the CPU time, measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402 (after the thread setting, as torch below)

import pytest  # noqa: E402

from inversion import config, extraction, synthetic, training  # noqa: E402

WNIDS = synthetic.wnids_for(5)
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 3
GRAY_MEMBER = f"train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG"


def write_tiny_imagenet(path, corrupt=None, with_wnids=True):
    return synthetic.write_zip(path, len(WNIDS), TRAIN_PER_CLASS, VAL_PER_CLASS, gray=[GRAY_MEMBER],
                               corrupt=[corrupt] if corrupt else [], with_wnids=with_wnids)


@pytest.fixture(scope="session")
def tiny_zip(tmp_path_factory):
    return write_tiny_imagenet(tmp_path_factory.mktemp("data") / "tiny-imagenet-200.zip")


def make_cfg(tmp, data_path, *overrides):
    """A small, fast config rooted in `tmp`."""
    base = [f"data.path={data_path}", f"cache.dir={tmp}/cache", f"output.dir={tmp}/out",
            "encoder.weights=random", "split.num_classes=3", "split.eval_per_class=2",
            "split.train_per_class=6", "train.batch_size=4", "train.epochs=2", "device=cpu",
            "extract.batch_size=5", "render.num_images=4", "render.grid_size=2", "decoder.fc_width=64"]
    path = tmp / "config.yaml"
    if not path.exists():
        path.write_text("{}\n")
    return config.load(path, [*base, *overrides])


@pytest.fixture(scope="session")
def built(tmp_path_factory, tiny_zip):
    """(config, cache path) of a cache built once from the tiny zip; tests must not modify it."""
    tmp = tmp_path_factory.mktemp("built")
    cfg = make_cfg(tmp, tiny_zip, "cache.dtype=float32")
    return cfg, extraction.extract(cfg)


@pytest.fixture(scope="session")
def trained_once(built, tmp_path_factory):
    """conv5 and fc8 decoders trained one epoch on the built cache, once for the whole suite."""
    cfg, _ = built
    cfg = dict(cfg, **{"output.dir": str(tmp_path_factory.mktemp("trained")), "train.epochs": 1})
    training.train(cfg, ["conv5", "fc8"])
    return cfg


@pytest.fixture(scope="module")
def trained(trained_once, tmp_path_factory):
    """A private output.dir per test module whose `decoders` is a link to the session's: read, never
    written (a test that damages a checkpoint copies the folder first)."""
    out = tmp_path_factory.mktemp("out")
    (out / "decoders").symlink_to(Path(trained_once["output.dir"]) / "decoders", target_is_directory=True)
    return dict(trained_once, **{"output.dir": str(out)})
