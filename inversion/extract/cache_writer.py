"""Writing the feature cache (schema and names: core/feature_cache.py): an atomic, resumable writer of
one file, and the assembly of a sharded cache from the part files torchrun's ranks write."""

import json
from pathlib import Path

import h5py
import numpy as np

try:  # registers the Blosc2 filter with HDF5 for this process; only blosc2-zstd caches need it
    import hdf5plugin
except ImportError:
    hdf5plugin = None

from inversion.core import storage
from inversion.core.errors import UserError
from inversion.core.feature_cache import (COMPRESSIONS, SPLITS, check_readable, chunks, file_compression, part_files,
                                          part_path, read_attrs)


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
            self.compression = file_compression(self.file)
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
                if file_compression(f) != "none":
                    check_readable(self.partial, {"compression": {"setting": file_compression(f)}})
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
                    group.create_dataset(name, (n, *shape), kind, chunks=chunks(n, shape, kind.itemsize),
                                         dcpl=_allocated_up_front())
                continue
            # One number of rows per chunk for every dataset, that of the largest sample (conv2:
            # 32 rows in float16), so that whole chunks of all datasets fill at the same row.
            rows = min(chunks(n, shape, kind.itemsize)[0] for shape, kind in sizes.values())
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


def complete_parts(path, cache_hash):
    """Paths of a complete set of part files for this cache (any world size), in rank order, or []."""
    for world in sorted({int(p.name.rsplit("-of-", 1)[1][:-3]) for p in part_files(path)}):
        parts = [part_path(path, r, world) for r in range(world)]
        attrs = [read_attrs(p) if p.exists() else None for p in parts]
        if all(a is not None and a["cache_hash"] == cache_hash for a in attrs):
            return parts
    return []


def clear_parts(path, keep):
    """Remove part files (finished or partial) other than `keep` and their partials; returns them."""
    keep = {Path(p).name for p in keep} | {Path(p).name + ".partial" for p in keep}
    stale = [p for p in part_files(path, partial=True) if p.name not in keep]
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
