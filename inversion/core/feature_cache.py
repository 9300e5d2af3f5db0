"""The HDF5 feature cache: its schema, names and attributes, and its readers (extract/cache_writer.py writes it).

Schema (one file per cache, readable with plain h5py):
  /<split>/images   uint8   (N, S, S, 3)     split in {train, eval}; S = data.image_size (64)
  /<split>/labels   int64   (N,)             0..num_classes-1, index into attrs class_wnids
  /<split>/wnids    str     (N,)
  /<split>/paths    str     (N,)             archive member of each image
  /<split>/<layer>  float16 (N, *shape)      layer in {conv2, conv5, fc6, fc8}, chunked by samples
Root attributes are JSON strings or plain values; see ATTRS. `layouts` ({layer: layout}, see
layouts.LAYOUTS) says how each layer's features are laid out; caches without it hold channels-first
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

from inversion.core import config, storage
from inversion.core.errors import UserError

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


def file_compression(f):
    return compression_of({"compression": _decode(f.attrs.get("compression", "{}"))})


def check_readable(path, attrs):
    """A one-line UserError, naming the filter and its package, if this process cannot decompress the cache."""
    setting = compression_of(attrs)
    if setting == "blosc2-zstd" and hdf5plugin is None:
        raise UserError(f"cache {path} is compressed with {COMPRESSIONS[setting]['filter']}, HDF5 filter "
                        f"{COMPRESSIONS[setting]['hdf5_filter_id']}, which h5py reads only with the hdf5plugin "
                        f"package: pip install hdf5plugin")


def layer_bytes(shape, dtype):
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def expected_bytes(shapes, n_images, image_size, dtype):
    """The cache's size before it is written: per image, the uint8 image plus every layer's
    features in `dtype`. The file is larger by HDF5's padding of each dataset's last chunk (up
    to CHUNK_BYTES each, ~20 MiB in all): 18% on 300 images, under 1% on the default 11,000."""
    per_image = image_size * image_size * 3 + sum(layer_bytes(s, dtype) for s in shapes.values())
    return n_images * per_image


def chunks(n, shape, itemsize):
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


def part_files(path, partial=False):
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


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
