"""Shared fixtures: a small Tiny-ImageNet-shaped zip and a cache built from it by the real code."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from inversion import config, extraction

WNIDS = ["n00000001", "n00000002", "n00000003", "n00000004", "n00000005"]
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 3
GRAY_MEMBER = "tiny-imagenet-200/train/n00000001/images/n00000001_0.JPEG"


def _jpeg(rng, label, gray=False):
    """A smooth class-coloured image with noise, so decoders have something learnable."""
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    base = np.stack([xx, yy, 1 - xx], -1) * 120 + 40 * np.array([label % 3, (label // 3) % 3, 1])
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert("L") if gray else Image.fromarray(pixels)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tiny_imagenet(path, wnids=WNIDS, corrupt=None, with_wnids=True):
    """The official layout in miniature; `corrupt` names a train member whose bytes are garbage."""
    rng = np.random.default_rng(0)
    root = "tiny-imagenet-200/"
    with zipfile.ZipFile(path, "w") as z:
        if with_wnids:
            z.writestr(root + "wnids.txt", "\n".join(wnids) + "\n")
        z.writestr(root + "words.txt", "".join(f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids)))
        annotations = []
        for label, wnid in enumerate(wnids):
            for i in range(TRAIN_PER_CLASS):
                member = f"{root}train/{wnid}/images/{wnid}_{i}.JPEG"
                image = _jpeg(rng, label, gray=member == GRAY_MEMBER)
                z.writestr(member, b"\xff\xd8\xff\xe0 not a jpeg" if member == f"{root}{corrupt}" else image)
            z.writestr(f"{root}train/{wnid}/{wnid}_boxes.txt", "")
            for i in range(VAL_PER_CLASS):
                name = f"val_{label * VAL_PER_CLASS + i}.JPEG"
                z.writestr(f"{root}val/images/{name}", _jpeg(rng, label))
                annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
        z.writestr(root + "val/val_annotations.txt", "".join(annotations))
    return path


@pytest.fixture(scope="session")
def tiny_zip(tmp_path_factory):
    return write_tiny_imagenet(tmp_path_factory.mktemp("data") / "tiny-imagenet-200.zip")


def make_cfg(tmp, data_path, *overrides):
    """A small, fast config rooted in `tmp`."""
    base = [f"data.path={data_path}", f"cache.dir={tmp}/cache", f"output.dir={tmp}/out",
            "encoder.weights=random", "split.num_classes=3", "split.eval_per_class=2",
            "split.train_per_class=6", "train.batch_size=4", "train.epochs=2", "device=cpu",
            "extract.batch_size=5", "render.num_images=4", "render.grid_size=2"]
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
