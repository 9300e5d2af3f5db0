"""Sharpness, and runs side by side: render.py's feature error and high-frequency ratio, other runs' decoders
(`render.compare_with`) on this cache or on another encoder's cache of the same images, and the two figures
that compare them.

- Feature error: the reconstructions re-encoded by the cache's own encoder, their normalised distance to the
  originals' features (metrics.feature_error), at the inverted layer and at `loss.comparator`. With perceptual
  losses the comparator is that very network, so the error there is partly what those decoders were trained
  to lower: a low value says the encoder cannot tell, not that a person could not.
- High-frequency ratio (metrics.high_frequency_ratio): needs no network at all.
"""

from pathlib import Path

import numpy as np
import torch

from inversion.core import (checkpoints, encoder, encoder_graph, feature_cache, figures, inference, metrics,
                            optimisation_results)
from inversion.core.console import warn
from inversion.core.errors import UserError
from inversion.core.images import to_hwc


def sharpness(cfg, cache, originals, recon, device, batch=64):
    """{layer: {"high_frequency_ratio": ..., "feature_error": {node: ...}}}; the feature error is left out
    (with a warning) when the cache's encoder cannot be loaded again identically."""
    scores = {layer: {"high_frequency_ratio": metrics.high_frequency_ratio(originals, r)} for layer, r in recon.items()}
    errors = feature_errors(cfg, cache, originals, recon, device, batch)
    for layer, values in errors.items():
        scores[layer]["feature_error"] = values
    return scores


def feature_errors(cfg, cache, originals, recon, device, batch=64):
    """{layer: {layer: error, comparator: error}} for the reconstructions of each layer."""
    identity = cache.attrs["encoder"]
    model = encoder.reload(identity)
    if model is None:
        warn("feature error skipped: the encoder this cache was built with cannot be loaded again identically")
        return {}
    arch, size, comparator = identity.get("arch", "alexnet"), cfg["encoder.input_size"], cfg["loss.comparator"]
    nodes = list(dict.fromkeys([*recon, comparator]))
    try:
        taps = encoder_graph.extractor(model.to(device), arch, nodes)
    except UserError:  # the default comparator (AlexNet's conv5) is no node of another arch
        warn(f"feature error at the comparator skipped: loss.comparator={comparator} is not a node of {arch}")
        comparator, nodes = None, list(recon)
        taps = encoder_graph.extractor(model.to(device), arch, nodes)

    @torch.inference_mode()
    def encode(images):
        parts = [taps(encoder.preprocess_float(images[s:s + batch].to(device), size, arch))
                 for s in range(0, len(images), batch)]
        return {node: torch.cat([p[node].float().cpu() for p in parts]) for node in nodes}

    reference = {node: torch.from_numpy(cache.load("eval", node)).float() if node in cache.attrs["layers"] else None
                 for node in nodes}
    if any(v is None for v in reference.values()):
        encoded = encode(originals)
        reference = {node: encoded[node] if value is None else value for node, value in reference.items()}
    errors = {}
    for layer, r in recon.items():
        features = encode(r)
        errors[layer] = {node: metrics.feature_error(reference[node], features[node], cfg["seed"])
                         for node in dict.fromkeys([layer, comparator or layer])}
    return errors


# What makes two caches hold the same images in the same order, whatever encoder read them.
SAME_IMAGES = ("seed", "data.format", "data.image_size", "split.num_classes", "split.eval_per_class",
               "split.train_per_class")


def other_runs(cfg, cache, layers, device):
    """{output.dir: {"cache": ..., "recon": {layer: reconstructions of the eval split}}} of
    `render.compare_with`: each run's decoders for these layers, on the cache they were trained on (this
    one, or another encoder's cache of the same images: `run_cache`). The caller closes the caches that are
    not `cache`."""
    runs = {}
    for folder in cfg["render.compare_with"]:
        run_cfg = dict(cfg, **{"output.dir": folder})
        source = run_cache(run_cfg, cache, layers)
        decoders = inference.load_decoders(run_cfg, source, layers)
        runs[folder] = {"cache": source, "recon": {layer: inference.decode(model, source["eval"][layer], 256, device)
                                                   for layer, (model, _) in decoders.items()}}
    return runs


def run_cache(cfg, cache, layers):
    """The cache the decoders under `cfg['output.dir']` were trained on: `cache`, or a cache under cache.dir
    made by another encoder from the same images; else a one-line UserError saying what differs."""
    folder, wanted = cfg["output.dir"], _trained_on(cfg, layers)
    if wanted in (None, cache.attrs["cache_hash"]):
        return cache  # load_decoders says what is wrong with missing or damaged checkpoints
    for path in sorted(Path(cfg["cache.dir"]).glob("features-*.h5")):
        attrs = None if ".part-" in path.name else feature_cache.read_attrs(path)
        if attrs and attrs["cache_hash"] == wanted:
            _check_same_images(cache, attrs, folder, path)
            feature_cache.check_readable(path, attrs)
            return feature_cache.Cache(path, attrs)
    raise UserError(f"render.compare_with: the decoders in {folder} were trained on a cache (hash {wanted[:12]}) "
                    f"that is not under cache.dir {cfg['cache.dir']}; extract it there again or drop {folder}")


def _trained_on(cfg, layers):
    """The cache hash the first readable decoder checkpoint of `layers` was trained on, or None."""
    for layer in layers:
        path = checkpoints.folder(cfg, layer) / checkpoints.BEST
        if path.exists():
            try:
                return checkpoints.load(path, mmap=True)["cache_hash"]
            except checkpoints.DamagedCheckpoint:
                continue
    return None


def _check_same_images(cache, attrs, folder, path):
    here, there = cache.attrs["config"], attrs["config"]
    for key in SAME_IMAGES:
        if here[key] != there[key]:
            raise UserError(f"render.compare_with: {folder} was made on other images than this run ({path}: "
                            f"{key} {there[key]!r} there, {here[key]!r} here)")
    if cache.attrs["sources"]["data"] != attrs["sources"]["data"]:
        raise UserError(f"render.compare_with: {folder} was made on another dataset than this run ({path}: "
                        f"data fingerprint {attrs['sources']['data'][:12]} there, "
                        f"{cache.attrs['sources']['data'][:12]} here)")


def labels(identities):
    """{run: its label in figures}: the run's folder, with its encoder's name where the runs' encoders differ,
    the encoder's name alone where every run has its own."""
    names = {run: encoder.short_name(identity) for run, identity in identities.items()}
    if len(set(names.values())) == 1:
        return {run: _short(run) for run in identities}
    if len(set(names.values())) == len(names):
        return names
    return {run: f"{_short(run)}, {name}" for run, name in names.items()}


def optimisation_images(out, cache_hash):
    """{layer: (eval rows, images)} stored by invert_by_optimisation.py on this cache, else {}."""
    result = optimisation_results.stored(Path(out) / optimisation_results.RESULTS, cache_hash)
    if result is None:
        return {}
    rows = np.array([image["index"] for image in result["images"]])
    found = {}
    for layer in result.get("layers", {}):
        path = Path(out) / "optimisation" / f"{layer}.npz"
        if path.exists():
            found[layer] = (rows, torch.from_numpy(np.load(path)["images"]))
    return found


def compared_grid(images, rows, row_labels, runs, path, note, provenance=""):
    """The paper-style grid: the originals, then per layer each run's reconstructions side by side; `runs`
    is {label: {layer: reconstructions}}."""
    columns = {"original": images[rows]}
    layers = list(dict.fromkeys(layer for recon in runs.values() for layer in recon))
    for layer in layers:
        for name, recon in runs.items():
            if layer in recon:
                columns[f"{layer}\n{name}"] = to_hwc(recon[layer][rows])
    return figures.image_table(columns, row_labels, path, "Reconstructions of each run, side by side per layer",
                               note, provenance)


def spectrum_figure(originals, runs, optimised, path, note, provenance=""):
    """One log-log panel per layer: the radially averaged power spectrum of the originals, of each run's
    reconstructions (`runs`: {label: {layer: images}}) and, where stored, of inversion by optimisation (on its
    own subset of images)."""
    import matplotlib.pyplot as plt  # figures has chosen the Agg backend
    from matplotlib.ticker import NullFormatter

    layers = list(dict.fromkeys(layer for recon in runs.values() for layer in recon))
    width = max(3.4 * len(layers) + 0.6, 6.0)  # one panel still has room for the title
    fig, axes = plt.subplots(1, len(layers), figsize=(width, 3.6), squeeze=False, sharey=True)
    freqs, reference = metrics.radial_spectrum(originals)
    for ax, layer in zip(axes[0], layers):
        figures.plain_log(ax, "xy")
        ax.plot(freqs, reference, "k-", lw=2, label="originals")
        for name, recon in runs.items():
            if layer in recon:
                ax.plot(freqs, metrics.radial_spectrum(recon[layer])[1], "-", label=name)
        if layer in optimised:
            ax.plot(freqs, metrics.radial_spectrum(optimised[layer][1])[1], "--", label="optimisation")
        ax.axvspan(0.25, 0.5, color="0.9", zorder=0)  # the band the high-frequency ratio sums
        ax.set(title=layer, xlabel="cycles per pixel")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap at this width
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("power (radial mean)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Power spectra of eval reconstructions (shaded: the high-frequency band)\n{note}", fontsize=9)
    fig.subplots_adjust(top=0.78, bottom=0.16, left=0.1, right=0.98)
    return figures.save(fig, path, ("png",), note, provenance)


def _short(name):
    """A run's label: its output.dir's last two parts (outputs-perceptual, runs/pixel)."""
    return "/".join(Path(name).parts[-2:]) or str(name)
