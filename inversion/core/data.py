"""The datasets, read in place (zip or folder); splits.py draws classes and images from them.

Two layouts with one interface: Tiny ImageNet (the default) and an image folder
(`train/<class>/*`, optional `val/<class>/*`). Images come out as RGB squares of `data.image_size`.
"""

import ctypes
import functools
import io
import os
import signal
import zipfile
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from inversion.core.errors import UserError

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the repository
IMAGE_SIZE = 64  # data.image_size's default: Tiny ImageNet's native size


def locate(path=None, format="auto"):
    """Where the data is: the configured path, else (Tiny ImageNet only) the usual places, else a
    fresh download."""
    if path is not None:
        if not Path(path).exists():
            raise UserError(f"data.path: no such file or folder: {path}")
        return Path(path)
    if format == "imagefolder":
        raise UserError("data.path: set it to the zip or folder of your images (data.format is imagefolder)")
    candidates = [os.environ.get("TINY_IMAGENET"), PROJECT_ROOT / "data/tiny-imagenet-200.zip",
                  PROJECT_ROOT / "data/tiny-imagenet-200", PROJECT_ROOT.parent / "shared/data/tiny-imagenet-200.zip"]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return download(PROJECT_ROOT / "data/tiny-imagenet-200.zip")


def download(dest, url=URL, md5=MD5):
    """Fetch the official archive with torchvision's `download_url` (progress, MD5 check) under a temporary
    name: only a verified file gets the final one."""
    from torchvision.datasets.utils import calculate_md5, download_url

    from inversion.core.console import console

    dest = Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    console.print(f"Tiny ImageNet not found locally; downloading {url}")
    try:
        download_url(url, dest.parent, partial.name, md5)
    except RuntimeError:  # downloaded, but not the file the MD5 names
        got = calculate_md5(partial) if partial.exists() else "unknown"
        partial.unlink(missing_ok=True)
        raise UserError(f"downloaded {url} has MD5 {got}, expected {md5}; "
                        f"download it yourself and set data.path or TINY_IMAGENET to the zip") from None
    except (OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({e}); download it yourself and set data.path "
                        f"or TINY_IMAGENET to the zip") from None
    partial.rename(dest)
    return dest


# Bump when `to_square_rgb` changes: it is part of every cache's sources, so old caches rebuild.
PREPROCESS_VERSION = 1


def open_dataset(path, format="auto"):
    """The dataset at `path` in the given layout; `auto` tries Tiny ImageNet, then an image folder."""
    if format == "tiny-imagenet":
        return TinyImageNet(path)
    if format == "imagefolder":
        return ImageFolder(path)
    files = _Files(path)
    for kind in (TinyImageNet, ImageFolder):
        if kind.find_root(files.names) is not None:
            dataset = kind(path, files)
            dataset.detected = True
            return dataset
    raise UserError(f"{path}: no Tiny ImageNet layout (no wnids.txt) and no image folder "
                    f"(no train/<class>/<image>) found; see docs/configuration.md, Data")


class _Files:
    """A zip or a folder: its file names (relative, '/'-separated), their bytes and checksums."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            self._zip = None
            self.names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        else:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise UserError(f"{self.path}: not a readable zip archive ({e})") from None
            self.names = [n for n in self._zip.namelist() if not n.endswith("/")]

    def read(self, name):
        return self._zip.read(name) if self._zip is not None else (self.path / name).read_bytes()

    def crc32(self, name):
        """Content checksum; free for zip members (stored in the index), computed for files."""
        return self._zip.getinfo(name).CRC if self._zip is not None else zlib.crc32(self.read(name))


class _Dataset:
    """What both layouts share. Members are names below `root`, the folder that holds the layout
    inside the zip or folder; `load_image` gives every image as the same RGB square."""

    format = ""
    detected = False  # True when `open_dataset` chose the layout (data.format: auto)

    def __init__(self, path, files=None):
        self.path = Path(path)
        self.files = files or _Files(self.path)
        self.root = self.find_root(self.files.names)
        if self.root is None:
            raise UserError(f"{self.path}: {self.missing}")
        self.names = {n[len(self.root):] for n in self.files.names if n.startswith(self.root)}

    def describe(self):
        return f"{self.path} ({self.format} layout{', detected' if self.detected else ''})"

    def read(self, name):
        if name not in self.names:
            raise UserError(f"{self.path}: missing {self.root}{name}")
        return self.files.read(self.root + name)

    def crc32(self, name):
        return self.files.crc32(self.root + name)

    def load_image(self, name, size=IMAGE_SIZE):
        """RGB uint8 array (size, size, 3), made by `to_square_rgb`."""
        return decode_image(self.read(name), size, self.path, self.root + name)


def decode_image(blob, size, path, member):
    """Encoded image bytes -> RGB uint8 (size, size, 3); `path` and `member` name it in errors."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return to_square_rgb(im, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot decode image {member} ({e})") from None


def _decode_batch(blobs, size, path, members):
    return np.stack([decode_image(blob, size, path, member) for blob, member in zip(blobs, members)])


def _die_with_parent():
    """Linux: end this worker when its parent dies. A `kill -9`ed extraction otherwise left its
    decoding processes waiting on their queue for good (seen in the tests). Ctrl-C and SIGTERM, which a
    terminal or a scheduler sends to the whole process group, are the parent's to handle: it finishes the
    batch in hand and shuts the pool down (a worker that raised instead would fail that batch)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class BatchDecoder:
    """Decodes batches of images in `workers` processes (one: a thread), yielding them in order.

    The calling thread reads the encoded bytes (cheap: a zip member or a file) and the workers
    only decode, so no zip handle is shared between threads or processes. Processes, not threads:
    a 64 px JPEG decodes in ~0.5 ms, mostly Python holding the GIL, so threads did not scale
    (1,560 vs 1,330-1,670 img/s for 1 vs 2 threads on 2 cores) where processes did. `workers`
    batches are in flight while the caller runs the encoder on the last one.
    """

    def __init__(self, dataset, size, workers=1):
        self.dataset, self.size, self.workers = dataset, size, workers
        self.pool = ThreadPoolExecutor(1) if workers == 1 else ProcessPoolExecutor(workers, initializer=_die_with_parent)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(cancel_futures=True)

    def map(self, batches):
        """Member lists -> uint8 arrays (B, size, size, 3), in the order given."""
        pending = deque()
        for members in batches:
            blobs = [self.dataset.read(m) for m in members]
            named = [self.dataset.root + m for m in members]
            pending.append(self.pool.submit(_decode_batch, blobs, self.size, self.dataset.path, named))
            if len(pending) > self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def to_square_rgb(im, size):
    """Any PIL image -> RGB uint8 (size, size, 3), as torchvision's Resize(size) + CenterCrop(size).

    Exactly: the shorter side becomes `size` and the longer int(size * longer / shorter) (rounded
    down), with PIL's BILINEAR filter (which widens its support when shrinking, so it antialiases);
    then the centred size x size square is cut, offset round((longer' - size) / 2). An image
    already size x size is not resampled, so Tiny ImageNet at 64 is decoded unchanged. Every mode
    goes through PIL's convert("RGB"): grayscale is replicated, CMYK is converted naively, palette
    is looked up. Before that, an EXIF orientation is applied (phone pictures) and transparency is
    composited on white (a transparent pixel's colour is arbitrary); neither touches an opaque image
    without EXIF rotation, such as every Tiny ImageNet JPEG.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or im.has_transparency_data:
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)
    im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (size, size):
        if w <= h:
            w, h = size, int(size * h / w)
        else:
            w, h = int(size * w / h), size
        im = im.resize((w, h), Image.Resampling.BILINEAR)
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im)


class TinyImageNet(_Dataset):
    """The official layout (wnids.txt, words.txt, train/<wnid>/images/, val/ with its annotations)."""

    format = "tiny-imagenet"
    missing = "no wnids.txt found; expected the Tiny ImageNet layout"

    @staticmethod
    def find_root(names):
        roots = sorted((n[: -len("wnids.txt")] for n in names if n.rsplit("/", 1)[-1] == "wnids.txt"), key=len)
        return roots[0] if roots else None

    def wnids(self):
        return self.read("wnids.txt").decode().split()

    def words(self):
        return _class_names(self.read("words.txt").decode())

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


class ImageFolder(_Dataset):
    """train/<class>/<image> and, optionally, val/<class>/<image> (ImageNet after the usual
    validation re-sort, or anyone's own photos). Images are the files directly in a class folder
    with an extension Pillow reads (any case); hidden files (macOS `._x.jpg`) are skipped. Class
    names come from a words.txt or LOC_synset_mapping.txt (`<class> <name>` per line) in the root
    or a folder above it, else they are the folder names. Without val/, `val_images` is None and
    the split holds eval images out of train/.
    """

    format = "imagefolder"
    missing = "no train/<class>/<image> found; expected the image folder layout"

    def __init__(self, path, files=None):
        super().__init__(path, files)
        self._members = {"train": {}, "val": {}}
        for name in sorted(self.names):
            parts = name.split("/")
            if len(parts) == 3 and parts[0] in self._members and _is_image(parts[2]):
                self._members[parts[0]].setdefault(parts[1], []).append(name)

    @staticmethod
    def find_root(names):
        roots = sorted({"/".join(p[:-3] + [""]) for p in (n.split("/") for n in names)
                        if len(p) >= 3 and p[-3] == "train" and _is_image(p[-1])}, key=lambda r: (len(r), r))
        return roots[0] if roots else None

    def wnids(self):
        return sorted(self._members["train"])

    def words(self):
        """Names from the deepest words.txt / LOC_synset_mapping.txt at or above the root."""
        files = [n for n in self.files.names if n.rsplit("/", 1)[-1] in ("words.txt", "LOC_synset_mapping.txt")
                 and self.root.startswith(n[: n.rfind("/") + 1])]
        if not files:
            return {}
        return _class_names(self.files.read(max(files, key=lambda n: n.count("/"))).decode())

    def train_images(self, wnid):
        return self._members["train"].get(wnid, [])

    def val_images(self):
        """{class: [member, ...]} from val/<class>/, or None without a val/ folder of classes."""
        return dict(self._members["val"]) if self._members["val"] else None


def _is_image(filename):
    return not filename.startswith(".") and Path(filename).suffix.lower() in _image_extensions()


@functools.cache
def _image_extensions():
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _class_names(text):
    """`<id><whitespace><name>` lines (words.txt uses a tab, LOC_synset_mapping.txt a space)."""
    pairs = (line.split(None, 1) for line in text.splitlines())
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}
