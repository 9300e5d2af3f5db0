"""The optimisation baseline's results file (`optimisation.json` in output.dir, the images beside it in
`optimisation/<layer>.npz`): its name, which stored results describe a cache, and how their budgets read.
invert_by_optimisation.py writes it; render's report, comparison and webpage read it from here."""

import json
from pathlib import Path

RESULTS = "optimisation.json"
# optimisation.init -> the name its optimisation has among a layer's methods, beside "decoder"
OPTIMISATIONS = {"mean": "optimisation", "decoder": "decoder+optimisation"}


def stored(path, cache_hash):
    """The results file at `path` (an `optimisation.json`) when it was made on this very cache's eval images,
    else None: numbers from another cache or split would not describe that cache's decoders."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if result.get("cache_hash") != cache_hash or result.get("split") != "eval" or not result.get("layers"):
        return None
    return result


def iterations_text(result):
    """'100 iterations', or 'iterations conv2 100, conv5 300' when layers differ: a caption must not claim
    one count for layers optimised with several. Reads results stored before per-layer settings too."""
    return per_layer({layer: _used(result, layer)["iterations"] for layer in result["layers"]}, "iterations")


def methods(result, layer):
    """The layer's methods in table order: the decoder, optimisation from the mean, from the decoder."""
    return [m for m in ("decoder", *OPTIMISATIONS.values()) if m in result["layers"][layer]]


def feature_distance_text(m):
    """A method's relative feature distance ||phi(x) - phi0|| / ||phi0|| at the inverted layer, formatted:
    the decoder's reconstructions, or where an optimisation ended ("-" in results stored before it was kept)."""
    value = m.get("feature_distance")
    value = value.get("end") if isinstance(value, dict) else value
    return "-" if value is None else f"{value:.3f}"


def budget(result, layer, method, short=False):
    """(budget, final relative drop) cells of a results table: each method's cost beside the other's, the
    decoder's training once for every image, the optimisation's iterations for each image. `short`: for
    the console, beside a seconds-per-image column."""
    m = result["layers"][layer][method]
    if method == "decoder":
        if "training_seconds" not in m:
            return "-", "-"
        if short:
            return f"train {m['training_seconds']:.0f} s", "-"
        return f"{m.get('epochs', '?')} epochs, {m['training_seconds']:.0f} s training (once)", "-"
    drop, iterations = m.get("final_relative_drop"), _used(result, layer, method)["iterations"]
    return (f"{iterations} it." if short else f"{iterations} iterations, {m['seconds_per_image']:.3g} s/image",
            "-" if drop is None else f"{drop:.2%}")


def _used(result, layer, method=None):
    """The settings `layer` was optimised with by `method` (by default its first optimisation); results stored
    before per-layer settings: the global ones."""
    method = method or next(m for m in methods(result, layer) if m != "decoder")
    return result["layers"][layer][method].get("settings", result["settings"])


def per_layer(values, name):
    """'100 iterations' when every layer has the same value, else 'iterations conv2 100, conv5 300'."""
    if len(set(map(str, values.values()))) <= 1:
        return f"{next(iter(values.values()), '-')} {name}"
    return f"{name} " + ", ".join(f"{layer} {value}" for layer, value in values.items())
