"""A Tiny-ImageNet-shaped zip of generated images, for tests and benchmarks (no real data needed)."""

import io
import zipfile

import numpy as np
from PIL import Image

ROOT = "tiny-imagenet-200/"


def _jpeg(rng, label, gray=False):
    """A smooth class-coloured gradient with noise, so decoders have something learnable."""
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    base = np.stack([xx, yy, 1 - xx], -1) * 120 + 40 * np.array([label % 3, (label // 3) % 3, 1])
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert("L") if gray else Image.fromarray(pixels)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def wnids_for(classes):
    return [f"n{i + 1:08d}" for i in range(classes)]


def write_zip(path, classes=5, train_per_class=8, val_per_class=3, gray=(), corrupt=(), with_wnids=True):
    """The official layout in miniature. `gray` and `corrupt` name train members (below the root)
    to store as grayscale or as bytes that are not a JPEG."""
    rng = np.random.default_rng(0)
    wnids = wnids_for(classes)
    with zipfile.ZipFile(path, "w") as z:
        if with_wnids:
            z.writestr(ROOT + "wnids.txt", "\n".join(wnids) + "\n")
        z.writestr(ROOT + "words.txt", "".join(f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids)))
        annotations = []
        for label, wnid in enumerate(wnids):
            for i in range(train_per_class):
                member = f"train/{wnid}/images/{wnid}_{i}.JPEG"
                image = _jpeg(rng, label, gray=member in gray)
                z.writestr(ROOT + member, b"\xff\xd8\xff\xe0 not a jpeg" if member in corrupt else image)
            z.writestr(f"{ROOT}train/{wnid}/{wnid}_boxes.txt", "")
            for i in range(val_per_class):
                name = f"val_{label * val_per_class + i}.JPEG"
                z.writestr(f"{ROOT}val/images/{name}", _jpeg(rng, label))
                annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
        z.writestr(ROOT + "val/val_annotations.txt", "".join(annotations))
    return path
