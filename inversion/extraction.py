"""Stage one: images -> frozen encoder -> feature cache. Runs once per config."""

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
from rich.table import Table

from . import data, encoder, feature_cache, runtime, storage
from .errors import UserError
from .console import Timer, console, progress, rate_text, summary, warn


def extract(cfg):
    """Build (or find) the cache for this config; returns its path."""
    job = prepare(cfg)
    if job.hit:
        return job.path
    with storage.lock(job.path.with_name(job.path.name + ".lock"), job.path):  # a second process refuses
        existing = feature_cache.read_attrs(job.path)
        if existing and existing["cache_hash"] == job.attrs["cache_hash"]:
            console.print(f"cache hit: {job.path} (finished by another process meanwhile)")
            return job.path
        return build(cfg, job)


def prepare(cfg):
    """Everything before the forward passes: split, encoder, cache identity, and whether it exists."""
    with Timer() as timer:
        # The encoder and its layers first: a typo in a node name should not wait for the data.
        shapes = encoder.feature_shapes(cfg["encoder.arch"], cfg["encoder.input_size"], cfg["layers"])
        dataset = data.open_dataset(data.locate(cfg["data.path"], cfg["data.format"]), cfg["data.format"])
        console.print(f"data: {dataset.describe()}")
        split = data.make_split(dataset, cfg["seed"], cfg["split.num_classes"],
                                cfg["split.eval_per_class"], cfg["split.train_per_class"])
        _show_classes(split, cfg["seed"])
        model, identity = encoder.load(cfg["encoder.arch"], cfg["encoder.weights"], cfg["seed"])
        console.print(f"encoder: {encoder.describe(identity)}")
        sources = {"data": split.fingerprint(dataset), "encoder": identity,
                   "preprocess": encoder.PREPROCESS_VERSION, "image_preprocess": data.PREPROCESS_VERSION}
        layers = encoder.network_order(cfg["encoder.arch"], cfg["layers"])
        attrs = feature_cache.make_attrs(cfg, sources, identity, split.wnids, split.names, runtime.versions(), layers)
        path = feature_cache.path_for(cfg)
        existing = feature_cache.read_attrs(path) if path.exists() else None
        hit = bool(existing) and existing["cache_hash"] == attrs["cache_hash"]
    if hit:
        console.print(f"cache hit: {path} ({path.stat().st_size / 2**20:,.1f} MiB, checked in {timer.seconds:.1f} s)")
    elif existing:
        warn(f"{path} was built from other data, encoder or preprocessing; rebuilding it")
    return SimpleNamespace(dataset=dataset, split=split, model=model, shapes=shapes, attrs=attrs, path=path, hit=hit)


def build(cfg, job):
    """Run the encoder over the split and write the cache (resuming a `.partial` one)."""
    dataset, split, model, shapes, attrs, path = job.dataset, job.split, job.model, job.shapes, job.attrs, job.path
    device = runtime.pick_device(cfg["device"])
    arch, layers = cfg["encoder.arch"], cfg["layers"]
    taps = encoder.extractor(model, arch, layers).to(device)
    meta = {name: ([label for _, label in items], [split.wnids[label] for _, label in items],
                   [dataset.root + member for member, _ in items])
            for name, items in (("train", split.train), ("eval", split.eval))}
    image_size = cfg["data.image_size"]
    total = len(split.train) + len(split.eval)
    _show_size(shapes, total, image_size, cfg["cache.dtype"])
    writer = feature_cache.Writer(path, attrs, meta, shapes, cfg["cache.dtype"], image_size)
    dtype = getattr(torch, cfg["cache.dtype"])
    done_before = writer.done("train") + writer.done("eval")
    if done_before:
        console.print(f"resuming {writer.partial}: {done_before:,} of {total:,} images already extracted")
    batch_size = cfg["extract.batch_size"]
    console.print(f"extracting {', '.join(layers)} on {runtime.describe_device(device)}, batch {batch_size}")
    finished = False
    try:
        with Timer() as timer, progress() as bar, ThreadPoolExecutor(1) as pool:
            task = bar.add_task("extract", total=total, completed=done_before, rate="")
            for name, items in (("train", split.train), ("eval", split.eval)):
                starts = range(writer.done(name), len(items), batch_size)
                decode = lambda s: np.stack([dataset.load_image(m, image_size) for m, _ in items[s:s + batch_size]])
                pending = pool.submit(decode, starts[0]) if starts else None
                for i, start in enumerate(starts):
                    images = pending.result()
                    if i + 1 < len(starts):  # decode the next batch while AlexNet runs on this one
                        pending = pool.submit(decode, starts[i + 1])
                    features = forward(taps, images, cfg["encoder.input_size"], arch, device, dtype)
                    writer.write(name, start, images, features)
                    bar.update(task, advance=len(images),
                               rate=rate_text(bar.tasks[0].completed - done_before, timer.seconds, "img"))
            writer.finish()
            finished = True
    except storage.DiskError:  # the disk is full: keep the partial file for a re-run with room
        raise
    except UserError:  # bad input (a corrupt image): resuming would only meet it again
        writer.close()
        writer.partial.unlink()
        raise
    finally:
        if not finished:
            writer.close()
    size = path.stat().st_size / 2**20
    summary("extracted", total - done_before, timer.seconds, "images", f"cache {path} ({size:,.1f} MiB)")
    return path


@torch.inference_mode()
def forward(taps, images, input_size, arch, device, dtype=torch.float32):
    """uint8 images (B, S, S, 3) -> {layer: numpy features}, cast on the device before the copy."""
    x = encoder.preprocess(torch.from_numpy(images).to(device, non_blocking=True), input_size, arch)
    return {k: v.to(dtype).cpu().numpy() for k, v in taps(x).items()}


def _show_size(shapes, images, image_size, dtype):
    """Say what the cache will cost before spending it: `layers=all` is eight times the features."""
    per_image = {layer: feature_cache.layer_bytes(shape, dtype) for layer, shape in shapes.items()}
    total = feature_cache.expected_bytes(shapes, images, image_size, dtype)
    console.print(f"expected cache size: {total / 2**20:,.1f} MiB for {images:,} images; per image: "
                  f"{image_size}x{image_size} image {image_size * image_size * 3 / 1024:,.1f} KiB, "
                  + ", ".join(f"{layer} {b / 1024:,.1f} KiB" for layer, b in per_image.items()), soft_wrap=True)


def _show_classes(split, seed):
    table = Table(title=f"{len(split.wnids)} classes drawn with seed {seed}")
    table.add_column("label", justify="right")
    table.add_column("wnid")
    table.add_column("name")
    for label, (wnid, name) in enumerate(zip(split.wnids, split.names)):
        table.add_row(str(label), wnid, name)
    console.print(table)
    console.print(f"split: {len(split.train):,} train + {len(split.eval):,} eval images")
