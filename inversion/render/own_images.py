"""Reconstructions of any picture: the encoder that built the cache, then every trained decoder.

A picture is made to look like a cached one (`data.to_square_rgb`: RGB, centre square, the cache's
image size) and goes through exactly the encoder and preprocessing the cache was built with, its
features rounded to the cache's dtype, as the decoders saw them in training. An encoder that
cannot be had again identically (a weights file changed or gone) is refused: its features are
not the ones the decoders learned to invert.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from inversion.core import data, encoder, encoder_graph, feature_cache, figures, host, inference, runtime
from inversion.core.console import Timer, progress, rate_text, summary, warn
from inversion.core.errors import UserError
from inversion.core.images import to_uint8

BATCH = 16
CONTACT_SHEET = "contact_sheet"
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def reconstruct(cfg, paths, layers=None):
    """Figures for every image under `paths` into output.dir/reconstruct; returns the files written.
    Unreadable files are reported and skipped; a UserError at the end names them."""
    with Timer() as timer:
        with feature_cache.open_for(cfg) as cache:
            identity, built = cache.attrs["encoder"], cache.attrs["config"]
            model = encoder.reload_exactly(identity, cache.path, "the decoders invert that encoder only: re-run "
                                           "extract_features.py and train_decoders.py --fresh")
            device = runtime.pick_device(cfg["device"])
            job = SimpleNamespace(
                identity=identity, built=built, size=cache["eval"]["images"].shape[1], device=device,
                decoders=inference.load_decoders(cfg, cache, cache.ordered(layers or cfg["layers"])),
                dtype=getattr(torch, built["cache.dtype"]), note=encoder.describe(identity),
                provenance={"cache_hash": cache.attrs["cache_hash"], "versions": host.versions()},
                out=Path(cfg["output.dir"]) / "reconstruct")
        files, failed = collect(paths)
        inputs = len(files) + len(failed)
        if not inputs:
            raise UserError(f"no image files under {', '.join(map(str, paths))}")
        job.taps = encoder_graph.extractor(model, identity["arch"], list(job.decoders)).to(device)
        job.out.mkdir(parents=True, exist_ok=True)
        written = _reconstruct_all(job, files, failed, timer)
    done = inputs - len(failed)
    summary("reconstructed", done, timer.seconds, "images", f"{len(failed)} unreadable, figures in {job.out}")
    if failed:
        raise UserError(f"{len(failed)} of {inputs} inputs could not be read: {', '.join(str(f) for f in failed)} "
                        f"(the others are in {job.out})")
    return written


def _reconstruct_all(job, files, failed, timer):
    """A figure per readable picture, BATCH at a time, then the contact sheet of them all."""
    names = _output_names(files)
    written, sheet = [], {"original": [], **{layer: [] for layer in job.decoders}}
    with progress() as bar:
        task = bar.add_task("reconstruct", total=len(files), rate="")
        for start in range(0, len(files), BATCH):
            batch, images = _read(files[start:start + BATCH], job.size, failed)
            bar.advance(task, len(files[start:start + BATCH]))
            if not batch:
                continue
            features = encoder.encode(job.taps, images, job.built["encoder.input_size"], job.identity["arch"],
                                      job.device, job.dtype)
            recon = {layer: to_uint8(inference.decode(m, features[layer], BATCH, job.device))
                     for layer, (m, _) in job.decoders.items()}
            for i, path in enumerate(batch):
                columns = {"original": images[i:i + 1], **{layer: r[i:i + 1] for layer, r in recon.items()}}
                meta = json.dumps({**job.provenance, "source": str(path)}, sort_keys=True)
                written += figures.image_table(columns, [_short(path.name)], job.out / names[path],
                                               f"Reconstructions of {path.name} ({job.size}x{job.size}) from each "
                                               f"layer", job.note, meta)
            for title, part in {"original": images, **recon}.items():
                sheet[title].append(part)
            bar.update(task, rate=rate_text(bar.tasks[0].completed, timer.seconds, "img"))
    if written:
        panels = {title: np.concatenate(parts) for title, parts in sheet.items()}
        written += figures.mosaic_panels(panels, job.out / CONTACT_SHEET,
                                         f"{len(panels['original'])} images and their reconstructions",
                                         job.note, json.dumps(job.provenance, sort_keys=True))
    return written


def _read(paths, size, failed):
    """(readable paths, their images as one uint8 array); an unreadable one is warned about and added to
    `failed`."""
    batch, images = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(data.to_square_rgb(im, size))
            batch.append(path)
        except UNREADABLE as e:
            warn(f"{path}: cannot read as an image ({type(e).__name__}: {e}); skipped")
            failed.append(path)
    return batch, np.stack(images) if images else None


def collect(paths):
    """(image files, paths that do not exist). A named file is always tried; folders are searched
    recursively for files whose extension Pillow can open (hidden files skipped), in sorted order."""
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files, missing = [], []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in extensions
                            and not any(part.startswith(".") for part in f.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            warn(f"{path}: no such file or folder; skipped")
            missing.append(path)
    return list(dict.fromkeys(files)), missing


def _output_names(files):
    """{path: figure name}: the file's stem, made unique (and never the contact sheet's name)."""
    used, names = {CONTACT_SHEET}, {}
    for path in files:
        name, n = path.stem, 1
        while name in used:
            n += 1
            name = f"{path.stem}-{n}"
        used.add(name)
        names[path] = name
    return names


def _short(name, width=18):
    return name if len(name) <= width else name[:width - 1] + "…"
