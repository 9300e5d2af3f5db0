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

Compression (`cache.compression`, see COMPRESSIONS) is a property of the file, not of its name: the
values are the same, so a cache written with any setting is a hit for every setting. Its root
attribute `compression` says which HDF5 filter a reader needs (absent in older files: none).
"""

import json
import time
from pathlib import Path

import h5py
import numpy as np

try:  # registers the Blosc2 filter with HDF5 for this process; only blosc2-zstd caches need it
    import hdf5plugin
except ImportError:
    hdf5plugin = None

from . import config, storage
from .errors import UserError

FORMAT_VERSION = 1
SPLITS = ("train", "eval")
ATTRS = ("format_version", "config_hash", "cache_hash", "config", "sources", "encoder",
         "class_wnids", "class_names", "layers", "layouts", "versions", "created", "complete")
CHUNK_BYTES = 1 << 21  # ~2 MiB per chunk: large sequential reads, small enough to shuffle blocks

# cache.compression -> what a reader needs: the HDF5 filter and the package that provides it.
# lzf and shuffle are built into h5py; Blosc2 comes from hdf5plugin (pip install hdf5plugin).
COMPRESSIONS = {
    "none": None,
    "lzf": {"filter": "lzf with byte shuffle", "hdf5_filter_id": 32000, "package": "h5py"},
    "blosc2-zstd": {"filter": "Blosc2 (zstd level 1, byte shuffle)", "hdf5_filter_id": 32026, "package": "hdf5plugin"},
}


def config_hash(cfg):
    return config.digest({"format": FORMAT_VERSION, **{k: cfg[k] for k in config.CACHE_KEYS}})


def path_for(cfg):
    return Path(cfg["cache.dir"]) / f"features-{config_hash(cfg)}.h5"


def content_hash(cfg, sources):
    """What checkpoints pin: the settings plus the identities of data, encoder and preprocessing."""
    return config.digest({"config": config_hash(cfg), "sources": sources})


def compression_of(attrs):
    """The cache.compression a cache (its root attributes) was written with; older caches: none."""
    return (attrs.get("compression") or {}).get("setting", "none")


def _file_compression(f):
    return compression_of({"compression": _decode(f.attrs.get("compression", "{}"))})


def check_readable(path, attrs):
    """A one-line UserError, naming the filter and its package, if this process cannot decompress the cache."""
    setting = compression_of(attrs)
    if setting == "blosc2-zstd" and hdf5plugin is None:
        raise UserError(f"cache {path} is compressed with {COMPRESSIONS[setting]['filter']}, HDF5 filter "
                        f"{COMPRESSIONS[setting]['hdf5_filter_id']}, which h5py reads only with the hdf5plugin "
                        f"package: pip install hdf5plugin")


class Writer:
    """Writes a cache under `<path>.partial`, resuming one whose sources match, then renames it.

    Uncompressed (`none`), every chunk has its place from the start and a batch is written in place.
    Compressed, a chunk's size is known only once it is compressed, so chunks get their place when
    written; to write each chunk exactly once (never re-compressed, never moved), all datasets of a
    split share one number of rows per chunk and rows are held in memory until a chunk is whole
    (`done` then counts whole chunks; the split's last chunk goes when its last row comes). The file
    never reuses freed space (fs_strategy none), so data written after the last flush cannot
    overwrite anything that flush's metadata points to; see `_resume` for the check on resuming.
    """

    def __init__(self, path, attrs, meta, shapes, dtype, image_size=64, compression="none"):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.datasets, self.chunking, self.pending = {}, [], {}
        self.file = self._resume(attrs["cache_hash"])
        created = self.file is None
        try:
            if created:
                if compression != "none":
                    _filter_options(compression)  # a missing package is a UserError before any file exists
                self.file = h5py.File(self.partial, "w", **({} if compression == "none" else {"fs_strategy": "none"}))
                attrs = {**attrs, "compression": json.dumps({"setting": compression, **(COMPRESSIONS[compression] or {})},
                                                            sort_keys=True)}
                self._create(self.file, attrs, meta, shapes, dtype, image_size, compression)
            self.compression = _file_compression(self.file)
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
        """Rows of `split` on disk, plus those held for a compressed chunk not yet whole."""
        held = self.pending.get(split)
        return int(self.file[split].attrs["done"]) + (len(held["images"]) if held else 0)

    def on_disk(self):
        """Rows of every split on disk: what a re-run resumes after (held rows are not kept)."""
        return sum(int(self.file[split].attrs["done"]) for split in SPLITS)

    def write(self, split, start, images, features):
        """Rows [start, start + len(images)) of every dataset; `done` moves only once they are on disk.

        A disk about to fill is refused before HDF5 sees it; one that fills anyway is a DiskError
        with the `.partial` file kept for the next run to resume (see `_abandon`).
        """
        if self.compression != "none":
            start, stop, rows = self._whole_chunks(split, start, {"images": images, **features})
            if stop == start:
                return
        else:
            stop, rows = start + len(images), {"images": images, **features}
        storage.check_free_space(self.path.parent, self._space({split: (start, stop)}),
                                 f"the next batch of {self.path.name}", f"{self.partial} is kept: free some "
                                 f"space and re-run to resume")
        try:
            for name, values in rows.items():
                self._dataset(split, name)[start:stop] = values
            self.file.flush()
            self.file[split].attrs["done"] = stop
            self.file.flush()
        except (OSError, RuntimeError) as e:
            self._abandon(e)

    def _whole_chunks(self, split, start, rows):
        """Hold rows until they fill whole chunks: returns (start, stop, rows) of what may be written
        now (stop == start: nothing yet). The split's last rows complete its last chunk."""
        on_disk = int(self.file[split].attrs["done"])
        held = self.pending.pop(split, None)
        if held is not None:
            rows = {name: np.concatenate([held[name], values]) for name, values in rows.items()}
        if start != on_disk + (0 if held is None else len(held["images"])):
            raise ValueError(f"rows of {split} must come in order: got {start}, expected {self.done(split)}")
        n, per_chunk = len(self.file[split]["images"]), self.file[split]["images"].chunks[0]
        count = len(rows["images"])
        whole = count if on_disk + count == n else count - count % per_chunk
        if whole < count:
            self.pending[split] = {name: values[whole:] for name, values in rows.items()}
        return on_disk, on_disk + whole, {name: values[:whole] for name, values in rows.items()}

    def finish(self):
        if self.pending:  # rows still held: the file must not be marked complete without them
            raise ValueError(f"{self.partial}: rows of {', '.join(self.pending)} were never written")
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
        chunk those rows touch, whole (the file is sparse until written), plus 1 MiB of headroom.
        A compressed chunk is at most its raw size plus the filter's header (Blosc2: 32 bytes; lzf
        stores a chunk raw where it does not shrink) and the chunk index's growth: 4 KiB covers both."""
        if not self.chunking:  # (split, rows, rows per chunk, bytes per chunk) of each chunked dataset
            extra = 0 if self.compression == "none" else 4096
            self.chunking = [(split, len(ds), ds.chunks[0], ds.dtype.itemsize * int(np.prod(ds.chunks)) + extra)
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
        """The partial file to continue, or None (removed) if it is another cache's or unreadable.
        A compressed one must also decompress its last written chunk of every dataset: a kill
        during a flush can leave a chunk index that points past what reached the disk."""
        if not self.partial.exists():
            return None
        f = None
        try:
            f = h5py.File(self.partial, "a")
            if f.attrs.get("cache_hash") == cache_hash and all(s in f for s in SPLITS):
                if _file_compression(f) != "none":
                    check_readable(self.partial, {"compression": {"setting": _file_compression(f)}})
                    for split in SPLITS:
                        done = int(f[split].attrs["done"])
                        for ds in f[split].values():
                            if done and ds.chunks:
                                ds[max(0, done - ds.chunks[0]):done]
                return f
            f.close()
        except UserError:  # kept for a run that has the filter's package
            f.close()
            raise
        except (OSError, RuntimeError, KeyError, ValueError):  # unreadable after a hard kill or a full disk
            if f is not None:
                try:
                    f.close()
                except (OSError, RuntimeError):
                    pass
        self.partial.unlink()
        return None

    def _create(self, f, attrs, meta, shapes, dtype, image_size, compression="none"):
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["complete"] = False
        sizes = {"images": ((image_size, image_size, 3), np.dtype(np.uint8)),
                 **{layer: (tuple(shape), np.dtype(dtype)) for layer, shape in shapes.items()}}
        for split in SPLITS:
            labels, wnids, paths = meta[split]
            n = len(labels)
            group = f.create_group(split)
            group.attrs["done"] = 0
            group["labels"] = np.asarray(labels, dtype=np.int64)
            group["wnids"] = np.asarray(wnids, dtype=h5py.string_dtype())
            group["paths"] = np.asarray(paths, dtype=h5py.string_dtype())
            if compression == "none":
                for name, (shape, kind) in sizes.items():
                    group.create_dataset(name, (n, *shape), kind, chunks=_chunks(n, shape, kind.itemsize),
                                         dcpl=_allocated_up_front())
                continue
            # One number of rows per chunk for every dataset, that of the largest sample (conv2:
            # 32 rows in float16), so that whole chunks of all datasets fill at the same row.
            rows = min(_chunks(n, shape, kind.itemsize)[0] for shape, kind in sizes.values())
            for name, (shape, kind) in sizes.items():
                group.create_dataset(name, (n, *shape), kind, chunks=(rows, *shape),
                                     **_filter_options(compression))
        f.flush()


def _filter_options(compression):
    """create_dataset's filter arguments for a cache.compression setting (byte shuffle: per dtype)."""
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "blosc2-zstd":
        if hdf5plugin is None:
            raise UserError("cache.compression: blosc2-zstd needs the hdf5plugin package (pip install "
                            "hdf5plugin), or set cache.compression to lzf or none")
        return dict(hdf5plugin.Blosc2(cname="zstd", clevel=1, filters=hdf5plugin.Blosc2.SHUFFLE))
    raise ValueError(f"unknown compression {compression!r}")


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
            attrs = {k: _decode(f.attrs[k]) for k in (*ATTRS, "parts", "compression") if k in f.attrs}
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
            if "compression" in sources[0].attrs:  # the parts' own (a resumed run may have had another setting)
                f.attrs["compression"] = sources[0].attrs["compression"]
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


def catalogue(cache_dir):
    """What `extract_features.py --list-caches` shows: one dict per cache file under `cache_dir`
    (complete, or `.partial` while written or after an interruption), newest first. Part files of
    a sharded cache count towards its size; parts without an assembled cache are listed as theirs."""
    folder = Path(cache_dir)
    files = sorted(folder.glob("features-*.h5")) + sorted(folder.glob("features-*.h5.partial")) if folder.is_dir() else []
    mains = [p for p in files if ".part-" not in p.name]
    orphans = {p.name.split(".part-")[0] for p in files if ".part-" in p.name} - {p.name for p in mains}
    entries = [_describe(p, files) for p in mains]
    entries += [_describe(folder / name, files) for name in sorted(orphans)]
    return sorted(entries, key=lambda e: e["created"], reverse=True)


def _describe(path, files):
    base = path.name.removesuffix(".partial")
    parts = [p for p in files if p.name.startswith(base + ".part-")]
    source = path if path.exists() else parts[0]
    entry = {"path": path, "name": base, "bytes": sum(p.stat().st_size for p in {*parts, path} if p.exists()),
             "created": "", "status": "unreadable"}
    try:
        with h5py.File(source, "r", locking=False) as f:  # a writer may hold it: read the attributes only
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
            cfg = attrs["config"]
            splits = {split: (int(f[split].attrs["done"]), len(f[split]["labels"])) for split in SPLITS}
            root = f["train/paths"][0].decode().split("/")[0] if len(f["train/paths"]) else "?"
    except (OSError, RuntimeError, KeyError, ValueError, IndexError) as e:
        entry["status"] = f"unreadable ({storage.reason(e)})"
        return entry
    done, total = sum(d for d, _ in splits.values()), sum(n for _, n in splits.values())
    if source is path and path.name.endswith(".h5") and attrs.get("complete") and read_attrs(path) is not None:
        status = "complete" + (f" ({len(parts)} part files)" if parts else "")
    elif source is path:
        status = f"partial: {done:,} of {total:,} images"
    else:
        status = f"partial: {sum(read_attrs(p) is not None for p in parts)} of {len(parts)} part files complete"
    return {**entry, "status": status, "created": attrs.get("created", ""),
            "data": f"{root} ({cfg['data.format']}, content {attrs['sources']['data'][:8]})",
            "image_size": cfg["data.image_size"], "classes": len(attrs["class_wnids"]),
            "splits": {split: n for split, (_, n) in splits.items()},
            "encoder": attrs["encoder"], "input_size": cfg["encoder.input_size"], "layers": attrs["layers"],
            "dtype": cfg["cache.dtype"], "compression": compression_of(attrs), "seed": cfg["seed"]}


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
    check_readable(path, attrs)
    return Cache(path, attrs)


class Cache:
    """A complete cache opened read-only. Arrays are read lazily from `file`."""

    def __init__(self, path, attrs):
        self.path = Path(path)
        self.attrs = attrs
        # Compressed: room for a few decompressed chunks per dataset, so reading rows one at a time
        # (render, optimisation) decompresses each chunk once, not once per row.
        cache = {} if compression_of(attrs) == "none" else {"rdcc_nbytes": 4 * CHUNK_BYTES}
        self.file = h5py.File(path, "r", **cache)

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

    Reads blocks of an uncompressed cache's chunk (~2 MiB) in sequence, so memory is bounded by the
    buffer, not the split. The blocks do not follow the file's own chunks (compressed caches and
    virtual datasets chunk otherwise), so a split streams in the same order from every cache of it.
    Under torchrun, rank r reads only every world-th block of the same seeded block order.
    """
    n = len(x)
    block = _chunks(n, x.shape[1:], x.dtype.itemsize)[0]
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
