"""Tiny ImageNet, read in place (zip or folder), and the seeded class choice and split."""

import hashlib
import io
import os
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 64


def locate(path=None):
    """Where the data is: the configured path, else the usual places, else a fresh download."""
    if path is not None:
        if not Path(path).exists():
            raise UserError(f"data.path: no such file or folder: {path}")
        return Path(path)
    candidates = [os.environ.get("TINY_IMAGENET"), PROJECT_ROOT / "data/tiny-imagenet-200.zip",
                  PROJECT_ROOT / "data/tiny-imagenet-200", PROJECT_ROOT.parent / "shared/data/tiny-imagenet-200.zip"]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return download(PROJECT_ROOT / "data/tiny-imagenet-200.zip")


def download(dest, url=URL, md5=MD5):
    """Fetch the official archive with a progress bar; only a verified file gets the final name."""
    from .console import console, progress

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    console.print(f"Tiny ImageNet not found locally; downloading {url}")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out, progress() as bar:
            task = bar.add_task("download", total=int(response.headers.get("Content-Length") or 0) or None, rate="")
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.advance(task, len(chunk))
    except (OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({e}); download it yourself and set data.path "
                        f"or TINY_IMAGENET to the zip") from None
    if digest.hexdigest() != md5:
        partial.unlink(missing_ok=True)
        raise UserError(f"downloaded {url} has MD5 {digest.hexdigest()}, expected {md5}; "
                        f"download it yourself and set data.path or TINY_IMAGENET to the zip")
    partial.rename(dest)
    return dest


class TinyImageNet:
    """The official layout (wnids.txt, words.txt, train/, val/) inside a zip or a folder."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            self._zip = None
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        else:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise UserError(f"{self.path}: not a readable zip archive ({e})") from None
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
        roots = sorted((n[: -len("wnids.txt")] for n in names if n.rsplit("/", 1)[-1] == "wnids.txt"), key=len)
        if not roots:
            raise UserError(f"{self.path}: no wnids.txt found; expected the Tiny ImageNet layout")
        self.root = roots[0]
        self.names = {n[len(self.root):] for n in names if n.startswith(self.root)}

    def read(self, name):
        if name not in self.names:
            raise UserError(f"{self.path}: missing {self.root}{name}")
        if self._zip is not None:
            return self._zip.read(self.root + name)
        return (self.path / self.root / name).read_bytes()

    def crc32(self, name):
        """Content checksum; free for zip members (stored in the index), computed for files."""
        if self._zip is not None:
            return self._zip.getinfo(self.root + name).CRC
        return zlib.crc32(self.read(name))

    def wnids(self):
        return self.read("wnids.txt").decode().split()

    def words(self):
        pairs = (line.split("\t", 1) for line in self.read("words.txt").decode().splitlines() if "\t" in line)
        return {wnid: name.strip() for wnid, name in pairs}

    def train_images(self, wnid):
        prefix = f"train/{wnid}/images/"
        return sorted(n for n in self.names if n.startswith(prefix) and n.lower().endswith(".jpeg"))

    def val_images(self):
        """{wnid: [member, ...]} from val/val_annotations.txt."""
        by_class = {}
        for line in self.read("val/val_annotations.txt").decode().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2:
                by_class.setdefault(fields[1], []).append(f"val/images/{fields[0]}")
        return {wnid: sorted(members) for wnid, members in by_class.items()}

    def load_image(self, name):
        """RGB uint8 array (64, 64, 3); grayscale and CMYK images are converted."""
        try:
            with Image.open(io.BytesIO(self.read(name))) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"{self.path}: cannot decode image {self.root}{name} ({e})") from None
        if rgb.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise UserError(f"{self.path}: image {self.root}{name} is {rgb.shape[1]}x{rgb.shape[0]}, "
                            f"expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        return rgb


def square_rgb(image, size):
    """Any Pillow image -> RGB uint8 (size, size, 3), the way a dataset image would look:
    EXIF rotation applied; transparency composited on white (a transparent pixel's colour is
    arbitrary); grayscale, CMYK, palette and other modes through Pillow's RGB conversion; the
    shorter side resized to `size` (bicubic), then the centre square cropped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    if image.size != (w, h):
        image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


@dataclass
class Split:
    wnids: list      # chosen classes, sorted; label i is wnids[i]
    names: list      # their words.txt names
    train: list      # [(member, label)]
    eval: list

    def fingerprint(self, dataset):
        """Content identity of exactly the images in the split, independent of where they live."""
        h = hashlib.sha256()
        for part in (self.train, self.eval):
            for member, label in part:
                h.update(f"{member}\t{label}\t{dataset.crc32(member):08x}\n".encode())
        return h.hexdigest()[:16]


def make_split(dataset, seed, num_classes, eval_per_class, train_per_class=None):
    """Seeded class choice, then per class: official val images for eval, train images for training.

    Each draw has its own stream, so changing one setting (say train_per_class) never changes
    which classes are chosen.
    """
    all_wnids = dataset.wnids()
    if not 1 <= num_classes <= len(all_wnids):
        raise UserError(f"split.num_classes: {num_classes} is outside 1..{len(all_wnids)}")
    chosen = np.random.default_rng([seed, 0]).choice(len(all_wnids), num_classes, replace=False)
    wnids = sorted(all_wnids[i] for i in chosen)
    words = dataset.words()
    val = dataset.val_images()
    train, evaluation = [], []
    for label, wnid in enumerate(wnids):
        pool_eval = val.get(wnid, [])
        pool_train = dataset.train_images(wnid)
        if len(pool_eval) < eval_per_class:
            raise UserError(f"split.eval_per_class: class {wnid} has {len(pool_eval)} val images, "
                            f"{eval_per_class} requested")
        n_train = len(pool_train) if train_per_class is None else train_per_class
        if len(pool_train) < n_train or n_train == 0:
            raise UserError(f"split.train_per_class: class {wnid} has {len(pool_train)} train images, "
                            f"{n_train} requested")
        evaluation += [(m, label) for m in _subset(pool_eval, eval_per_class, [seed, 1, label])]
        train += [(m, label) for m in _subset(pool_train, n_train, [seed, 2, label])]
    return Split(wnids, [words.get(w, w) for w in wnids], train, evaluation)


def _subset(members, n, seed):
    if n >= len(members):
        return members
    keep = np.random.default_rng(seed).choice(len(members), n, replace=False)
    return [members[i] for i in sorted(keep)]
