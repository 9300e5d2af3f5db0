"""Generated datasets for tests and benchmarks (no real data needed): a Tiny-ImageNet-shaped zip,
and an image folder (zip or folder) of odd sizes, file types and colour modes."""

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = "tiny-imagenet-200/"


def _pixels(rng, label, height=64, width=64):
    """A smooth class-coloured gradient with noise, so decoders have something learnable."""
    yy, xx = np.mgrid[0:height, 0:width] / np.array([max(height - 1, 1), max(width - 1, 1)])[:, None, None]
    base = np.stack([xx, yy, 1 - xx], -1) * 120 + 40 * np.array([label % 3, (label // 3) % 3, 1])
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _jpeg(rng, label, gray=False):
    pixels = _pixels(rng, label)
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


# (extension, PIL mode, PIL format): the mix an image folder of other people's files holds.
KINDS = (("jpg", "RGB", "JPEG"), ("JPG", "RGB", "JPEG"), ("png", "L", "PNG"), ("jpeg", "CMYK", "JPEG"),
         ("png", "RGBA", "PNG"), ("gif", "P", "GIF"), ("bmp", "RGB", "BMP"), ("PNG", "LA", "PNG"))
SIZES = ((97, 61), (64, 64), (50, 130), (200, 150), (33, 40), (128, 128))  # (width, height)


def write_imagefolder(path, classes=5, train_per_class=30, val_per_class=0, names_file="words.txt", root="data/"):
    """train/<class>/*[, val/<class>/*] under `root`, as a zip (path ends in .zip) or a folder.

    Image i of a class has size SIZES[i % 6] and kind KINDS[i % 8]; every folder also holds a
    non-image file and a macOS `._` file, which readers must skip. `names_file` (words.txt,
    LOC_synset_mapping.txt or None) names class c "thing c".
    """
    rng = np.random.default_rng(0)
    classes_ = wnids_for(classes)
    files = {}
    if names_file:
        sep = "\t" if names_file == "words.txt" else " "
        files[names_file] = "".join(f"{c}{sep}thing {i}, other name\n" for i, c in enumerate(classes_)).encode()
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, cls in enumerate(classes_):
            for i in range(count):
                ext, mode, fmt = KINDS[i % len(KINDS)]
                width, height = SIZES[i % len(SIZES)]
                image = Image.fromarray(_pixels(rng, label, height, width)).convert(mode)
                buf = io.BytesIO()
                image.save(buf, format=fmt)
                files[f"{root}{split}/{cls}/{split}_{cls}_{i}.{ext}"] = buf.getvalue()
            if count:
                files[f"{root}{split}/{cls}/notes.txt"] = b"not an image"
                files[f"{root}{split}/{cls}/._{split}_{cls}_0.jpg"] = b"macOS metadata, not an image"
    path = Path(path)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as z:
            for name, content in files.items():
                z.writestr(name, content)
    else:
        for name, content in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(content)
    return path
