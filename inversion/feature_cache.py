"""The HDF5 feature cache: its schema, an atomic resumable writer, and readers.

Schema (one file per cache, readable with plain h5py):
  /<split>/images   uint8   (N, S, S, 3)     split in {train, eval}; S = data.image_size (64)
  /<split>/labels   int64   (N,)             0..num_classes-1, index into attrs class_wnids
  /<split>/wnids    str     (N,)
  /<split>/paths    str     (N,)             archive member of each image
  /<split>/<layer>  float16 (N, *shape)      layer in {conv2, conv5, fc6, fc8}, chunked by samples
Root attributes are JSON strings or plain values; see ATTRS. `layouts` ({layer: layout}, see
decoders.LAYOUTS) says how each layer's features are laid out; caches without it hold channels-first
maps and vectors only.

A file is named by the hash of the settings that shape it and only gets that name when complete;
while it is written it is `<name>.partial`, which a re-run resumes.
"""

import json
import time
from pathlib import Path

import h5py
import numpy as np

from . import config, storage
from .errors import UserError

FORMAT_VERSION = 1
SPLITS = ("train", "eval")
ATTRS = ("format_version", "config_hash", "cache_hash", "config", "sources", "encoder",
         "class_wnids", "class_names", "layers", "layouts", "versions", "created", "complete")
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
        self.datasets, self.chunking = {}, []
        self.file = self._resume(attrs["cache_hash"])
        created = self.file is None
        try:
            if created:
                self.file = h5py.File(self.partial, "w")
                self._create(self.file, attrs, meta, shapes, dtype, image_size)
            storage.check_free_space(self.path.parent, self._space({s: (self.done(s), None) for s in SPLITS}),
                                     f"the cache {self.path}", "free some space or set cache.dir to a larger disk")
        except storage.DiskError:  # refused before writing any data: leave the disk as it was
            self.close()
            if created:
                self.partial.unlink()
            raise
        except (OSError, RuntimeError) as e:
            self._abandon(e)

    def done(self, split):
        return int(self.file[split].attrs["done"])

    def write(self, split, start, images, features):
        """Rows [start, start + len(images)) of every dataset; `done` moves only once they are on disk.

        A disk about to fill is refused before HDF5 sees it; one that fills anyway is a DiskError
        with the `.partial` file kept for the next run to resume (see `_abandon`).
        """
        stop = start + len(images)
        storage.check_free_space(self.path.parent, self._space({split: (start, stop)}),
                                 f"the next batch of {self.path.name}", f"{self.partial} is kept: free some "
                                 f"space and re-run to resume")
        try:
            self._dataset(split, "images")[start:stop] = images
            for layer, values in features.items():
                self._dataset(split, layer)[start:stop] = values
            self.file.flush()
            self.file[split].attrs["done"] = stop
            self.file.flush()
        except (OSError, RuntimeError) as e:
            self._abandon(e)

    def finish(self):
        try:
            self.file.attrs["complete"] = True
            self.file.flush()
        except (OSError, RuntimeError) as e:
            self._abandon(e)
        self.close()
        self.partial.replace(self.path)

    def _dataset(self, split, name):
        """Datasets stay open while the file is: HDF5 writes out a dataset's buffered chunks when its
        last handle closes, and a failure there is only printed, never raised (then crashes at exit),
        whereas one in `flush` is raised and handled."""
        if (split, name) not in self.datasets:
            self.datasets[split, name] = self.file[split][name]
        return self.datasets[split, name]

    def close(self):
        """Close the file; if HDF5 can no longer write what it holds, give that up (see `_abandon`)."""
        if self.file is None:
            return
        try:
            self.file.flush()
        except (OSError, RuntimeError):
            storage.discard_writes(self.file.id.get_vfd_handle())
        try:
            self.file.close()
        except (OSError, RuntimeError):
            pass
        self.file, self.datasets = None, {}

    def _abandon(self, error):
        """After a failed write HDF5 retries its buffered data on every flush and close, and the
        interpreter crashed at exit (h5py 3.16, HDF5 2.0). So the file is closed onto /dev/null: on
        disk it keeps what the last successful flush wrote, with `done` saying how much that was,
        which a re-run resumes (or, if the file is unreadable after all, starts over)."""
        if self.file is not None:
            storage.discard_writes(self.file.id.get_vfd_handle())
            self.close()
        raise storage.DiskError(f"could not write {self.partial} ({storage.reason(error)}; "
                                f"{storage.size_text(storage.free_bytes(self.path.parent))} free); it is kept: "
                                f"free some space and re-run to resume") from error

    def _space(self, rows):
        """Disk space that writing rows {split: (start, stop or None = to the end)} may take: every
        chunk those rows touch, whole (the file is sparse until written), plus 1 MiB of headroom."""
        if not self.chunking:  # (split, rows, rows per chunk, bytes per chunk) of each chunked dataset
            self.chunking = [(split, len(ds), ds.chunks[0], ds.dtype.itemsize * int(np.prod(ds.chunks)))
                             for split in SPLITS for ds in self.file[split].values() if ds.chunks]
        total = 1 << 20
        for split, n, rows_per_chunk, chunk_bytes in self.chunking:
            if split in rows:
                start, stop = rows[split]
                stop = n if stop is None else stop
                if stop > start:
                    total += ((stop - 1) // rows_per_chunk - start // rows_per_chunk + 1) * chunk_bytes
        return total

    def _resume(self, cache_hash):
        if not self.partial.exists():
            return None
        try:
            f = h5py.File(self.partial, "a")
            if f.attrs.get("cache_hash") == cache_hash and all(s in f for s in SPLITS):
                return f
            f.close()
        except (OSError, RuntimeError, KeyError):
            pass  # unreadable after a hard kill or a full disk: start over
        self.partial.unlink()
        return None

    def _create(self, f, attrs, meta, shapes, dtype, image_size):
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
            group.create_dataset("images", (n, *image), np.uint8, chunks=_chunks(n, image, 1),
                                 dcpl=_allocated_up_front())
            for layer, shape in shapes.items():
                size = np.dtype(dtype).itemsize
                group.create_dataset(layer, (n, *shape), dtype, chunks=_chunks(n, shape, size),
                                     dcpl=_allocated_up_front())
        f.flush()


def _allocated_up_front():
    """Every chunk gets its place in the file when the dataset is created (sparse: no data, no fill
    values written), so later writes only fill chunks in place and never change HDF5's metadata. A
    write the disk refuses then cannot leave the file's structure half-updated: it still resumes."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


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


def make_attrs(cfg, sources, encoder_identity, wnids, names, versions, layers, layouts=None):
    """`layers` in network order: figures and reports put their columns in this order. `layouts`
    ({layer: layout}) is derived from the arch and its nodes, so it is not part of the cache hash."""
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
        **({"layouts": json.dumps(layouts, sort_keys=True)} if layouts else {}),
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
    if not path.parent.exists():
        return []
    files = path.parent.glob(f"{path.name}.part-*-of-*.h5*")  # not the .lock files: their owners hold them
    return sorted(p for p in files if p.name.endswith(".h5") or (partial and p.name.endswith(".h5.partial")))


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

    def ordered(self, layers):
        """`layers` in network order (the cache's): figures read left to right, shallow to deep. Layers the
        cache lacks go last, for the caller to name."""
        order = self.attrs["layers"]
        return sorted(layers, key=lambda layer: order.index(layer) if layer in order else len(order))

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
