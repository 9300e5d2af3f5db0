"""Sharpness, and runs side by side: render.py's feature error and high-frequency ratio, other runs' decoders
on the same cache (`render.compare_with`), and the two figures that compare them.

- Feature error: the reconstructions re-encoded by the cache's own encoder, their normalised distance to the
  originals' features (metrics.feature_error), at the inverted layer and at `loss.comparator`. With perceptual
  losses the comparator is that very network, so the error there is partly what those decoders were trained
  to lower: a low value says the encoder cannot tell, not that a person could not.
- High-frequency ratio (metrics.high_frequency_ratio): needs no network at all.
"""

from pathlib import Path

import numpy as np
import torch

from inversion.core import encoder, encoder_graph, figures, inference, metrics, optimisation_results
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


def other_runs(cfg, cache, layers, device):
    """{output.dir: {layer: reconstructions of the eval split}} of `render.compare_with`, each run's decoders
    for these layers trained on this very cache (inference.load_decoders refuses others)."""
    runs = {}
    for folder in cfg["render.compare_with"]:
        decoders = inference.load_decoders(dict(cfg, **{"output.dir": folder}), cache, layers)
        runs[folder] = {layer: inference.decode(model, cache["eval"][layer], 256, device)
                        for layer, (model, _) in decoders.items()}
    return runs


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
    """The paper-style grid: the originals, then per layer each run's reconstructions side by side."""
    columns = {"original": images[rows]}
    layers = list(dict.fromkeys(layer for recon in runs.values() for layer in recon))
    for layer in layers:
        for name, recon in runs.items():
            if layer in recon:
                columns[f"{layer}\n{_short(name)}"] = to_hwc(recon[layer][rows])
    return figures.image_table(columns, row_labels, path, "Reconstructions of each run, side by side per layer",
                               note, provenance)


def spectrum_figure(originals, runs, optimised, path, note, provenance=""):
    """One log-log panel per layer: the radially averaged power spectrum of the originals, of each run's
    reconstructions and, where stored, of inversion by optimisation (on its own subset of images)."""
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
                ax.plot(freqs, metrics.radial_spectrum(recon[layer])[1], "-", label=_short(name))
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
