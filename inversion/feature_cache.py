"""The HDF5 feature cache: its schema, an atomic resumable writer, and readers.

Schema (one file per cache, readable with plain h5py):
  /<split>/images   uint8   (N, S, S, 3)     split in {train, eval}; S = data.image_size (64)
  /<split>/labels   int64   (N,)             0..num_classes-1, index into attrs class_wnids
  /<split>/wnids    str     (N,)
  /<split>/paths    str     (N,)             archive member of each image
  /<split>/<layer>  float16 (N, *shape)      layer in {conv2, conv5, fc6, fc8}, chunked by samples
Root attributes are JSON strings or plain values; see ATTRS.

A file is named by the hash of the settings that shape it and only gets that name when complete;
while it is written it is `<name>.partial`, which a re-run resumes.
"""

import json
import time
from pathlib import Path

import h5py
import numpy as np

from . import config
from .errors import UserError

FORMAT_VERSION = 1
SPLITS = ("train", "eval")
ATTRS = ("format_version", "config_hash", "cache_hash", "config", "sources", "encoder",
         "class_wnids", "class_names", "layers", "versions", "created", "complete")
CHUNK_BYTES = 1 << 21  # ~2 MiB per chunk: large sequential reads, small enough to shuffle blocks


def config_hash(cfg):
    return config.digest({"format": FORMAT_VERSION, **{k: cfg[k] for k in config.CACHE_KEYS}})


def path_for(cfg):
    return Path(cfg["cache.dir"]) / f"features-{config_hash(cfg)}.h5"


def content_hash(cfg, sources):
    """What checkpoints pin: the settings plus the identities of data, encoder and preprocessing."""
    return config.digest({"config": config_hash(cfg), "sources": sources})


class Writer:
    """Writes a cache under `<path>.partial`, resuming one whose sources match, then renames it."""

    def __init__(self, path, attrs, meta, shapes, dtype, image_size=64):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self._resume(attrs["cache_hash"]) or self._create(attrs, meta, shapes, dtype, image_size)

    def done(self, split):
        return int(self.file[split].attrs["done"])

    def write(self, split, start, images, features):
        group = self.file[split]
        stop = start + len(images)
        group["images"][start:stop] = images
        for layer, values in features.items():
            group[layer][start:stop] = values
        group.attrs["done"] = stop
        self.file.flush()

    def finish(self):
        self.file.attrs["complete"] = True
        self.file.close()
        self.partial.replace(self.path)

    def close(self):
        self.file.close()

    def _resume(self, cache_hash):
        if not self.partial.exists():
            return None
        try:
            f = h5py.File(self.partial, "a")
            if f.attrs.get("cache_hash") == cache_hash and all(s in f for s in SPLITS):
                return f
            f.close()
        except (OSError, KeyError):
            pass  # unreadable after a hard kill: start over
        self.partial.unlink()
        return None

    def _create(self, attrs, meta, shapes, dtype, image_size):
        f = h5py.File(self.partial, "w")
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["complete"] = False
        for split in SPLITS:
            labels, wnids, paths = meta[split]
            n = len(labels)
            group = f.create_group(split)
            group.attrs["done"] = 0
            group["labels"] = np.asarray(labels, dtype=np.int64)
            group["wnids"] = np.asarray(wnids, dtype=h5py.string_dtype())
            group["paths"] = np.asarray(paths, dtype=h5py.string_dtype())
            image = (image_size, image_size, 3)
            group.create_dataset("images", (n, *image), np.uint8, chunks=_chunks(n, image, 1))
            for layer, shape in shapes.items():
                size = np.dtype(dtype).itemsize
                group.create_dataset(layer, (n, *shape), dtype, chunks=_chunks(n, shape, size))
        f.flush()
        return f


def layer_bytes(shape, dtype):
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def expected_bytes(shapes, n_images, image_size, dtype):
    """The cache's size before it is written: per image, the uint8 image plus every layer's
    features in `dtype`. The file is larger by HDF5's padding of each dataset's last chunk (up
    to CHUNK_BYTES each, ~20 MiB in all): 18% on 300 images, under 1% on the default 11,000."""
    per_image = image_size * image_size * 3 + sum(layer_bytes(s, dtype) for s in shapes.values())
    return n_images * per_image


def _chunks(n, shape, itemsize):
    per_sample = int(np.prod(shape)) * itemsize
    return (max(1, min(n, CHUNK_BYTES // per_sample)), *shape)


def make_attrs(cfg, sources, encoder_identity, wnids, names, versions, layers):
    """`layers` in network order: figures and reports put their columns in this order."""
    return {
        "format_version": FORMAT_VERSION,
        "config_hash": config_hash(cfg),
        "cache_hash": content_hash(cfg, sources),
        "config": json.dumps({k: cfg[k] for k in config.CACHE_KEYS}, sort_keys=True),
        "sources": json.dumps(sources, sort_keys=True),
        "encoder": json.dumps(encoder_identity, sort_keys=True),
        "class_wnids": json.dumps(wnids),
        "class_names": json.dumps(names),
        "layers": json.dumps(layers),
        "versions": json.dumps(versions, sort_keys=True),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_attrs(path):
    """The root attributes with JSON decoded, or None if the file is not a complete cache (for a
    sharded cache: if any of its part files is missing or incomplete, since a virtual dataset would
    silently read zeros where a part is missing)."""
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                return None
            attrs = {k: _decode(f.attrs[k]) for k in (*ATTRS, "parts") if k in f.attrs}
    except OSError:
        return None
    for part in attrs.get("parts", []):
        part_attrs = read_attrs(Path(path).parent / part)
        if part_attrs is None or part_attrs["cache_hash"] != attrs["cache_hash"]:
            return None
    return attrs


# Sharded extraction (torchrun): rank r of N writes `<cache>.part-<r>-of-<N>.h5` with the same
# schema over its contiguous slice of each split; the cache itself is then a file of virtual
# datasets over the parts (relative names: the folder can move as a whole).

def part_path(path, rank, world):
    return Path(path).with_name(f"{Path(path).name}.part-{rank}-of-{world}.h5")


def complete_parts(path, cache_hash):
    """Paths of a complete set of part files for this cache (any world size), in rank order, or []."""
    for world in sorted({int(p.name.rsplit("-of-", 1)[1][:-3]) for p in _part_files(path)}):
        parts = [part_path(path, r, world) for r in range(world)]
        attrs = [read_attrs(p) if p.exists() else None for p in parts]
        if all(a is not None and a["cache_hash"] == cache_hash for a in attrs):
            return parts
    return []


def clear_parts(path, keep):
    """Remove part files (finished or partial) other than `keep` and their partials; returns them."""
    keep = {Path(p).name for p in keep} | {Path(p).name + ".partial" for p in keep}
    stale = [p for p in _part_files(path, partial=True) if p.name not in keep]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def assemble(path, attrs, meta, parts):
    """Write the cache at `path` as virtual datasets over `parts` (written as .partial, renamed)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    sources = [h5py.File(p, "r") for p in parts]
    try:
        with h5py.File(partial, "w") as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["parts"] = json.dumps([Path(p).name for p in parts])
            for split in SPLITS:
                labels, wnids, paths = meta[split]
                group = f.create_group(split)
                group.attrs["done"] = len(labels)
                group["labels"] = np.asarray(labels, dtype=np.int64)
                group["wnids"] = np.asarray(wnids, dtype=h5py.string_dtype())
                group["paths"] = np.asarray(paths, dtype=h5py.string_dtype())
                for name in sources[0][split]:
                    if name in ("labels", "wnids", "paths"):
                        continue
                    pieces = [src[split][name] for src in sources]
                    layout = h5py.VirtualLayout((len(labels), *pieces[0].shape[1:]), pieces[0].dtype)
                    start = 0
                    for part, piece in zip(parts, pieces):
                        layout[start:start + len(piece)] = h5py.VirtualSource(Path(part).name, piece.name,
                                                                              piece.shape, piece.dtype)
                        start += len(piece)
                    group.create_virtual_dataset(name, layout)
            f.attrs["complete"] = True
    finally:
        for src in sources:
            src.close()
    partial.replace(path)


def _part_files(path, partial=False):
    path = Path(path)
    pattern = f"{path.name}.part-*-of-*.h5" + ("*" if partial else "")
    return sorted(path.parent.glob(pattern)) if path.parent.exists() else []


def open_for(cfg, layers=()):
    """The complete cache for this config, read-only, with the requested layers; else a UserError."""
    path = path_for(cfg)
    attrs = read_attrs(path) if path.exists() else None
    if attrs is None:
        raise UserError(f"no complete feature cache for this config at {path}; run "
                        f"`python extract_features.py` with the same --config/--set options first")
    missing = [layer for layer in layers if layer not in attrs["layers"]]
    if missing:
        raise UserError(f"cache {path} has no layer {missing[0]!r} (it has {', '.join(attrs['layers'])}); "
                        f"add it to `layers` and re-run extract_features.py")
    return Cache(path, attrs)


class Cache:
    """A complete cache opened read-only. Arrays are read lazily from `file`."""

    def __init__(self, path, attrs):
        self.path = Path(path)
        self.attrs = attrs
        self.file = h5py.File(path, "r")

    def __getitem__(self, key):
        return self.file[key]

    def load(self, split, name):
        return self.file[split][name][()]

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stream(x, y, batch_size, buffer_size, rng, rank=0, world=1):
    """Batches (x, y) from HDF5 in shuffled contiguous blocks, mixed in a shuffle buffer.

    Reads whole chunks in sequence, so memory is bounded by the buffer, not the split. Under
    torchrun, rank r reads only every world-th block of the same seeded block order.
    """
    n = len(x)
    block = (x.chunks or _chunks(n, x.shape[1:], x.dtype.itemsize))[0]  # virtual datasets have no chunks
    starts = rng.permutation(np.arange(0, n, block))[rank::world]
    buf_x, buf_y = [], []
    held = 0
    for i, start in enumerate(starts):
        stop = min(start + block, n)
        buf_x.append(x[start:stop])
        buf_y.append(y[start:stop])
        held += stop - start
        last = i == len(starts) - 1
        if held >= buffer_size or last:
            bx, by = np.concatenate(buf_x), np.concatenate(buf_y)
            order = rng.permutation(len(bx))
            bx, by = bx[order], by[order]
            keep = len(bx) if last else len(bx) - len(bx) % batch_size
            for s in range(0, keep, batch_size):
                yield bx[s:s + batch_size], by[s:s + batch_size]
            buf_x, buf_y = [bx[keep:]], [by[keep:]]
            held = len(bx) - keep


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
