"""Stage one: images -> frozen encoder -> feature cache. Runs once per config."""

import json
import os
from types import SimpleNamespace

import torch
from rich.table import Table

from inversion.core import data, distributed, encoder, encoder_graph, encoder_weights, feature_cache, host, runtime, splits, storage
from inversion.core.console import (Interrupted, Timer, console, deferred_interrupts, interrupt_requested, progress,
                                    rate_text, summary, warn)
from inversion.core.errors import UserError
from inversion.core.layouts import default_layout
from inversion.extract import cache_writer


def extract(cfg):
    """Build (or find) the cache for this config; returns its path."""
    job = prepare(cfg)
    if job.hit:
        return job.path
    # A second process writing the same file refuses; under torchrun each rank guards its own part.
    target = job.path if not distributed.launched() else feature_cache.part_path(
        job.path, distributed.rank(), distributed.world_size())
    with storage.lock(target.with_name(target.name + ".lock"), target):
        existing = feature_cache.read_attrs(job.path)
        if existing and existing["cache_hash"] == job.attrs["cache_hash"] and \
                existing.get("layouts") == job.attrs.get("layouts"):
            console.print(f"cache hit: {job.path} (finished by another process meanwhile)")
            return job.path
        return build(cfg, job)


def prepare(cfg):
    """Everything before the forward passes: split, encoder, cache identity, and whether it exists."""
    with Timer() as timer:
        # The encoder and its layers first: a typo in a node name should not wait for the data.
        found = encoder_graph.feature_layouts(cfg["encoder.arch"], cfg["encoder.input_size"], cfg["layers"])
        shapes = {layer: shape for layer, (shape, _) in found.items()}
        located = data.locate(cfg["data.path"], cfg["data.format"])
        dataset = data.open_dataset(located, cfg["data.format"])
        console.print(f"data: {dataset.describe()}")
        split = splits.make_split(dataset, cfg["seed"], cfg["split.num_classes"],
                                  cfg["split.eval_per_class"], cfg["split.train_per_class"])
        _show_classes(split, cfg["seed"])
        model, identity = encoder.load(cfg["encoder.arch"], cfg["encoder.weights"], cfg["seed"],
                                       trained=encoder_weights.default_path(cfg, located))
        if identity.get("num_classes"):  # trained here: its own number of classes, so fc8 has that many units
            found = encoder_graph.feature_layouts(cfg["encoder.arch"], cfg["encoder.input_size"], cfg["layers"],
                                                  identity["num_classes"])
            shapes = {layer: shape for layer, (shape, _) in found.items()}
        console.print(f"encoder: {encoder.describe(identity)}")
        sources = {"data": split.fingerprint(dataset), "encoder": identity,
                   "preprocess": encoder.PREPROCESS_VERSION, "image_preprocess": data.PREPROCESS_VERSION}
        layers = encoder_graph.network_order(cfg["encoder.arch"], cfg["layers"])
        attrs = feature_cache.make_attrs(cfg, sources, identity, split.wnids, split.names, host.versions(), layers,
                                         {layer: layout for layer, (_, layout) in found.items()})
        path = feature_cache.path_for(cfg)
        existing = feature_cache.read_attrs(path) if path.exists() else None
        # A cache from before layouts were recorded is read as channels-first maps and vectors.
        unrecorded = bool(existing) and "layouts" not in existing and any(
            layout != default_layout(shape) for shape, layout in found.values())
        hit = bool(existing) and existing["cache_hash"] == attrs["cache_hash"] and not unrecorded
    if hit:
        kept = feature_cache.compression_of(existing)
        other = "" if kept == cfg["cache.compression"] else f"; cache.compression={cfg['cache.compression']} applies to new caches"
        console.print(f"cache hit: {path} ({path.stat().st_size / 2**20:,.1f} MiB, compression {kept}{other}, "
                      f"checked in {timer.seconds:.1f} s)")
    elif unrecorded:
        warn(f"{path} does not record how its layers are laid out; rebuilding it")
    elif existing:
        warn(f"{path} was built from other data, encoder or preprocessing; rebuilding it")
    return SimpleNamespace(dataset=dataset, split=split, model=model, shapes=shapes, attrs=attrs, path=path, hit=hit)


def build(cfg, job):
    """Run the encoder over the split and write the cache (resuming a `.partial` one). Under
    torchrun each rank writes its share into a part file and rank 0 joins them (see _build_sharded)."""
    if distributed.launched():
        return _build_sharded(cfg, job)
    items = {"train": job.split.train, "eval": job.split.eval}
    seconds, done = _extract_into(cfg, job, job.path, items, job.attrs)
    size = job.path.stat().st_size / 2**20
    summary("extracted", done, seconds, "images", f"cache {job.path} ({size:,.1f} MiB)")
    return job.path


def _build_sharded(cfg, job):
    """Rank r extracts the r-th contiguous slice of each split into `<cache>.part-<r>-of-<N>.h5`;
    once every part is complete, rank 0 writes the cache as HDF5 virtual datasets over them."""
    rank, world = distributed.rank(), distributed.world_size()
    device = runtime.pick_device(cfg["device"])
    distributed.setup(device)
    if device.type == "cpu":
        # torchrun gives each process one thread; oneDNN's convolutions sum in another order with
        # another thread count, which moves a float16 feature by one unit in the last place. With
        # the single process's thread count the parts hold exactly the single-process features.
        torch.set_num_threads(host.cores())
    reuse = cache_writer.complete_parts(job.path, job.attrs["cache_hash"])
    distributed.barrier()  # every rank has looked before rank 0 clears anything
    if reuse:
        console.print(f"reusing {len(reuse)} complete part files (a {len(reuse)}-rank extraction); nothing to redo")
    parts = reuse or [feature_cache.part_path(job.path, r, world) for r in range(world)]
    if not reuse:
        stale = cache_writer.clear_parts(job.path, keep=parts) if distributed.is_main() else []
        if stale:
            console.print(f"removed {len(stale)} part files of an unfinished run with another number of ranks; "
                          f"their images are extracted again by these {world} ranks")
        sizes = {name: len(items) for name, items in (("train", job.split.train), ("eval", job.split.eval))}
        # Shares in whole batches: every batch is the one a single process would run.
        ranges = {name: distributed.share(n, rank, world, cfg["extract.batch_size"]) for name, n in sizes.items()}
        items = {"train": job.split.train[slice(*ranges["train"])], "eval": job.split.eval[slice(*ranges["eval"])]}
        attrs = {**job.attrs, "part": json.dumps({"rank": rank, "world": world, "ranges": ranges})}
        if (feature_cache.read_attrs(parts[rank]) or {}).get("cache_hash") != job.attrs["cache_hash"]:
            seconds, done = _extract_into(cfg, job, parts[rank], items, attrs, world)
            summary("extracted", done, seconds, "images", f"part {parts[rank]}", every_rank=True)
    distributed.barrier()
    if distributed.is_main():
        cache_writer.assemble(job.path, job.attrs, _meta(job, {"train": job.split.train, "eval": job.split.eval}),
                               parts)
        console.print(f"cache {job.path}: virtual datasets over {len(parts)} part files")
    distributed.barrier()
    distributed.teardown()
    return job.path


def _extract_into(cfg, job, target, items, attrs, world=1):
    """Decode, encode and write `items` ({split: [(member, label)]}) into the file `target`;
    returns (seconds, images extracted now)."""
    device = runtime.pick_device(cfg["device"])
    arch, layers = cfg["encoder.arch"], cfg["layers"]
    taps = encoder_graph.extractor(job.model, arch, layers).to(device)
    image_size = cfg["data.image_size"]
    _show_size(job.shapes, len(job.split.train) + len(job.split.eval), image_size, cfg["cache.dtype"])
    writer = cache_writer.Writer(target, attrs, _meta(job, items), job.shapes, cfg["cache.dtype"], image_size,
                                  cfg["cache.compression"])
    total = sum(len(part) for part in items.values())
    done_before = writer.done("train") + writer.done("eval")
    if done_before:
        console.print(f"resuming {writer.partial}: {done_before:,} of {total:,} images already extracted")
    batch_size, workers = cfg["extract.batch_size"], decode_workers(cfg["extract.workers"], device)
    console.print(f"extracting {', '.join(layers)} on {runtime.describe_device(device)}, batch {batch_size}, "
                  f"compression {writer.compression}, "
                  f"decoding in {workers} {'thread' if workers == 1 else 'processes'}"
                  + (f", {world} ranks (rate shown: this rank's x {world})" if world > 1 else ""))
    finished = False
    try:
        with Timer() as timer, progress() as bar, data.BatchDecoder(job.dataset, image_size, workers) as decoder, \
                deferred_interrupts():
            task = bar.add_task("extract", total=total, completed=done_before, rate="")
            for name, part in items.items():
                for done in _encode_and_write(cfg, taps, device, decoder, writer, name, part):
                    bar.update(task, advance=done,
                               rate=rate_text(world * (bar.tasks[0].completed - done_before), timer.seconds, "img"))
                    if interrupt_requested():  # the batch is written: stop here, the rest resumes
                        raise Interrupted(f"kept {writer.on_disk():,} of {total:,} images in {writer.partial}")
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
    return timer.seconds, total - done_before


def _encode_and_write(cfg, taps, device, decoder, writer, name, part):
    """Encode and write the split `name`'s rows not yet in the file, a batch at a time; yields each batch's
    size once it is written."""
    arch, batch_size, dtype = cfg["encoder.arch"], cfg["extract.batch_size"], getattr(torch, cfg["cache.dtype"])
    starts = range(writer.done(name), len(part), batch_size)
    # Decoded ahead, in order, while the encoder runs on the current batch.
    batches = decoder.map([m for m, _ in part[s:s + batch_size]] for s in starts)
    for start, images in zip(starts, batches):
        features = encoder.encode(taps, images, cfg["encoder.input_size"], arch, device, dtype)
        writer.write(name, start, images, features)
        yield len(images)


def decode_workers(setting, device):
    """`extract.workers`: auto = the cores this process may use, shared among torchrun's local ranks,
    when the encoder runs on an accelerator; 1 on the CPU, where the forward needs every core and
    one thread's decoding already hides behind it (2 processes measured slower there)."""
    if setting != "auto":
        return setting
    if device.type == "cpu":
        return 1
    return max(1, host.cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _meta(job, items):
    """Labels, wnids and archive paths of `items`, per split: what the cache stores beside the features."""
    return {name: ([label for _, label in part], [job.split.wnids[label] for _, label in part],
                   [job.dataset.root + member for member, _ in part]) for name, part in items.items()}


def _show_size(shapes, images, image_size, dtype):
    """Say what the cache will cost before spending it: `layers=all` is eight times the features."""
    per_image = {layer: feature_cache.layer_bytes(shape, dtype) for layer, shape in shapes.items()}
    total = feature_cache.expected_bytes(shapes, images, image_size, dtype)
    console.print(f"expected cache size: {total / 2**20:,.1f} MiB for {images:,} images; per image: "
                  f"{image_size}x{image_size} image {image_size * image_size * 3 / 1024:,.1f} KiB, "
                  + ", ".join(f"{layer} {b / 1024:,.1f} KiB" for layer, b in per_image.items()))


def _show_classes(split, seed):
    table = Table(title=f"{len(split.wnids)} classes drawn with seed {seed}")
    table.add_column("label", justify="right")
    table.add_column("wnid")
    table.add_column("name")
    for label, (wnid, name) in enumerate(zip(split.wnids, split.names)):
        table.add_row(str(label), wnid, name)
    console.print(table)
    console.print(f"split: {len(split.train):,} train + {len(split.eval):,} eval images")
