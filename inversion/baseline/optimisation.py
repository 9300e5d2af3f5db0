"""Inversion by optimisation (Mahendran & Vedaldi, CVPR 2015), the baseline a trained decoder beats: the run
over the layers, beside the decoders on the same images (the objective and its descent: `objective`).

Every setting may differ per layer (`optimisation.layers`), as M&V tune their regularisers per layer; each
layer's stored results say which values it used. Results are stored per layer as they finish
(`optimisation.json` plus the images in `optimisation/<layer>.npz`, `<layer>.from-decoder.npz` for
`init: decoder`), and a re-run with the same settings skips finished layers; the two starts are two methods
of one results file, so a run with `init: decoder` after one with `init: mean` keeps both. The objective is
stored per iteration and drawn (`optimisation_objective.png`), so whether the baseline has stopped falling
can be seen, not assumed.
"""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from rich.table import Table

from inversion.core import (config, encoder, encoder_graph, feature_cache, figures, host, inference, metrics, runtime,
                            seeds, storage)
from inversion.core.console import Interrupted, Timer, console, progress, summary, warn
from inversion.core.errors import UserError
from inversion.core.images import to_hwc, to_target
from inversion.baseline import objective
from inversion.core.optimisation_results import (OPTIMISATIONS, RESULTS, budget, feature_distance_text, iterations_text,
                                                 per_layer)

FIGURE = "optimisation_vs_decoder"
# each optimisation's images file: optimisation/<layer><suffix>.npz
SUFFIXES = {OPTIMISATIONS["mean"]: "", OPTIMISATIONS["decoder"]: ".from-decoder"}
OBJECTIVE_FIGURE = "optimisation_objective"
SPLITS = ("eval", "train")


def settings(cfg):
    """The optimisation.* keys without their prefix: what results are pinned to."""
    return {key.split(".", 1)[1]: cfg[key] for key in cfg if key.startswith("optimisation.")}


def pinned(s):
    """What stored results must share to be kept: the settings without `init`, which names a method of its
    own rather than changing one (a run from the decoder keeps the results from the mean)."""
    layers = {layer: {k: v for k, v in entry.items() if k != "init"} for layer, entry in s.get("layers", {}).items()}
    return {**{k: v for k, v in s.items() if k != "init"}, "layers": {k: v for k, v in layers.items() if v}}


def layer_settings(s, layer):
    """What `layer` is optimised with: the global settings `s` with its optimisation.layers entry on top."""
    return {**{key: value for key, value in s.items() if key != "layers"}, **s.get("layers", {}).get(layer, {})}


def with_iterations(cfg, iterations):
    """`--iterations N`: N steps for every layer, the layers' own `iterations` entries included (a quick
    run asked for on the command line must not spend conv5's and fc6's 800)."""
    per_layer = {layer: {k: v for k, v in entry.items() if k != "iterations"}
                 for layer, entry in cfg["optimisation.layers"].items()}
    return {**cfg, "optimisation.iterations": iterations, "optimisation.layers": per_layer}


def run(cfg, layers=None, num_images=None, fresh=False, split="eval"):
    """invert_by_optimisation.py: every chosen layer with a decoder, on the seeded grid images of `split`."""
    if split not in SPLITS:
        raise UserError(f"--split: expected eval or train, got {split!r}")
    with Timer() as timer:
        cache = feature_cache.open_for(cfg)
        with cache:
            result, computed = _run(cfg, cache, cache.ordered(layers or cfg["layers"]),
                                    num_images or cfg["render.num_images"], fresh, split)
    summary("optimised", computed * len(result["images"]), timer.seconds, "images",
            f"{computed} of {len(result['layers'])} layers computed, into {cfg['output.dir']}")
    return result


def _run(cfg, cache, layers, num_images, fresh, split):
    out = Path(cfg["output.dir"])
    identity = cache.attrs["encoder"]
    model = encoder.reload_exactly(identity, cache.path, "inversion by optimisation must run through the "
                                   "encoder that built the cache")
    decoders = inference.load_decoders(cfg, cache, layers)
    device = runtime.pick_device(cfg["device"])
    precision = runtime.resolve_precision(cfg["precision"], device)
    host.keep_freed_memory()
    job = SimpleNamespace(cfg=cfg, cache=cache, split=split, out=out, device=device, model=model.to(device),
                          precision=precision,
                          arch=identity.get("arch", "alexnet"), input_size=cfg["encoder.input_size"])
    labels, rows, originals, normaliser = _images(cfg, cache, split, num_images)
    job.rows, job.originals, job.normaliser = rows, originals, normaliser
    s = settings(cfg)
    guard = {"cache_hash": cache.attrs["cache_hash"], "split": split, "rows": rows.tolist(), "settings": pinned(s),
             "seed": cfg["seed"]}
    job.previous = _previous(out, guard, fresh)
    _warn_unused(s, cache.attrs["layers"])
    job.used = {layer: layer_settings(s, layer) for layer in decoders}
    names = cache.attrs["class_names"]
    job.result = result = {
        "config_hash": config.digest(cfg), "cache": str(cache.path), "cache_hash": cache.attrs["cache_hash"],
        "encoder": identity, "encoder_description": encoder.describe(identity),
        "device": runtime.describe_device(device), "precision": precision, "versions": host.versions(),
        "split": split,
        "images": [{"index": int(i), "label": int(labels[i]), "name": names[labels[i]]} for i in rows],
        "settings": s, "guard": guard, "normaliser_mean_pair_distance": normaliser,
        "figure": f"{FIGURE}.png", "objective_figure": f"{OBJECTIVE_FIGURE}.png", "layers": {},
    }
    console.print(f"inverting {len(rows)} {split} images from {', '.join(decoders)} by optimisation "
                  f"({per_layer({l: u['iterations'] for l, u in job.used.items()}, 'iterations')}, "
                  f"{per_layer({l: 'from ' + u['init'] for l, u in job.used.items()}, 'start')}, "
                  f"{per_layer({l: u['optimizer'] for l, u in job.used.items()}, 'optimizer')}) "
                  f"on {runtime.describe_device(device, precision)}")
    computed, pictures = 0, {}
    for layer, (decoder, checkpoint) in decoders.items():
        try:
            pictures[layer], new = _layer(job, layer, decoder, checkpoint)
        except KeyboardInterrupt as e:  # the layer in hand is dropped; finished ones are in optimisation.json
            raise Interrupted(_kept(job, layer)) from e
        computed += new
    _figure(result, originals, pictures, [names[labels[i]].split(",")[0] for i in rows], out)
    _objective_figure(result, out)
    _show(result)
    return result, computed


def _images(cfg, cache, split, num_images):
    """(labels, the seeded grid rows, their images as targets, the split's mean pair distance)."""
    labels = cache.load(split, "labels")
    rows = figures.choose_rows(labels, num_images, cfg["seed"])
    all_images = cache.load(split, "images")
    originals = to_target(torch.from_numpy(all_images[rows]))
    return labels, rows, originals, metrics.pair_distance(to_target(torch.from_numpy(all_images)), cfg["seed"])


def _warn_unused(s, cached_layers):
    default = config.defaults()["optimisation.layers"]  # the shipped per-layer values: no warning for those
    unused = [layer for layer in s["layers"] if layer not in cached_layers and s["layers"][layer] != default.get(layer)]
    if unused:
        warn(f"optimisation.layers names {', '.join(unused)}, which this cache does not hold; ignored")


def _layer(job, layer, decoder, checkpoint):
    """One layer: decoded, then optimised from the start `init` names (or read back when a previous run
    finished it), its results stored at once beside the other start's; returns ({column: images} of the
    decoder and each optimisation stored for the layer, whether it was optimised now)."""
    features = _read_rows(job.cache[job.split][layer], job.rows)
    phi0 = torch.from_numpy(features).to(job.device).float()
    taps = encoder_graph.extractor(job.model, job.arch, [layer]).eval()
    with Timer() as t:
        decoded = inference.decode(decoder, features, 256, job.device)
    s = job.used[layer]
    method = OPTIMISATIONS[s["init"]]
    stored = job.out / "optimisation" / f"{layer}{SUFFIXES[method]}.npz"
    kept = job.previous.get("layers", {}).get(layer, {})
    done = method in kept and stored.exists()
    if done:
        console.print(f"{layer}: already optimised from the {s['init']} ({stored}); --fresh to recompute")
        entry = kept[method]
    else:
        start = decoded if s["init"] == "decoder" else None
        optimised, entry = _optimise_layer(job, taps, layer, phi0, s, start)
        entry.update(metrics.summarize(job.originals, optimised, job.normaliser))
        _save_images(stored, optimised)
    history = checkpoint["history"]
    with torch.no_grad():
        distance = objective.distance(taps, layer, decoded.to(job.device), phi0, job.input_size, job.arch)
    job.result["layers"][layer] = {
        **kept,
        "decoder": {**metrics.summarize(job.originals, decoded, job.normaliser),
                    "seconds_per_image": t.seconds / len(job.rows), "feature_distance": distance,
                    "epochs": len(history), "training_seconds": sum(h["seconds"] for h in history)},
        method: entry}
    _write_json(job.out / RESULTS, _merged(job.result, job.previous, job.cache.attrs["layers"]))
    pictures = {"decoder": decoded}
    for name in job.result["layers"][layer]:
        path = job.out / "optimisation" / f"{layer}{SUFFIXES.get(name, '')}.npz"
        if name in SUFFIXES and path.exists():
            pictures[name] = torch.from_numpy(np.load(path)["images"])
    return pictures, not done


def _kept(job, layer):
    """What an interrupted run keeps: every finished layer (this run's and a previous one's)."""
    finished = list(_merged(job.result, job.previous, job.cache.attrs["layers"])["layers"])
    kept = f"kept {', '.join(finished)} in {job.out / RESULTS}" if finished else "no layer was finished"
    return f"{kept}; {layer}'s optimisation was dropped"


def _figure(result, originals, pictures, row_labels, out):
    """Each layer's decoder and optimisation side by side, per image."""
    # column titles short enough to fit a column
    short = {"decoder": "decoder", OPTIMISATIONS["mean"]: "optim.", OPTIMISATIONS["decoder"]: "dec.+optim."}
    columns = {f"{layer} {short[method]}": to_hwc(images)
               for layer, methods in pictures.items() for method, images in methods.items()}
    figures.comparison_grid(to_hwc(originals), columns, row_labels, out / FIGURE, result["encoder_description"],
                            _provenance(result), caption=f"Decoder vs optimisation ({result['split']} images, "
                                                         f"{iterations_text(result)})")


def _objective_figure(result, out):
    """The objective per iteration of each layer this run shows (resumed layers from their stored trace):
    the evidence that the baseline was run until it stopped falling, or that it was not."""
    curves = {}
    for layer, methods in result["layers"].items():
        for method, entry in methods.items():
            if method in SUFFIXES and entry.get("objective"):
                drop = entry.get("final_relative_drop")
                label = layer if method == "optimisation" else f"{layer} from decoder"
                label += f" (final drop {drop:.2%})" if drop is not None else ""
                curves[label] = {"objective": entry["objective"], "feature_term": entry.get("feature_term")}
    if curves:
        figures.objective_curves(curves, out / OBJECTIVE_FIGURE,
                                 f"Optimisation objective per iteration ({result['split']} images, "
                                 f"{iterations_text(result)})",
                                 result["encoder_description"], _provenance(result))


def _provenance(result):
    return json.dumps({"config_hash": result["config_hash"], "cache_hash": result["cache_hash"],
                       "versions": result["versions"]}, sort_keys=True)


def _optimise_layer(job, taps, layer, phi0, s, start=None):
    """`s`: this layer's own settings (`layer_settings`), stored with its results; `start`: the decoder's
    reconstructions for `init: decoder`."""
    seed, image_size = seeds.derive_seed(job.cfg["seed"], layer), job.originals.shape[-1]
    with progress() as bar:
        task = bar.add_task(f"{layer}", total=s["iterations"], rate="")
        t0 = time.perf_counter()

        def on_step(step, value):
            bar.update(task, advance=1, description=f"{layer} objective {value:.4g}",
                       rate=f"{(step + 1) / (time.perf_counter() - t0):.2f} it/s")

        with Timer() as t:
            optimised, trace = objective.invert(taps, layer, phi0, image_size, s, job.input_size, job.arch, seed,
                                                on_step, job.precision, start)
    history = trace["objective"]
    drop = objective.final_relative_drop(history)
    console.print(f"{layer}: objective {history[0]:.4g} -> {history[-1]:.4g} (final relative drop "
                  f"{'-' if drop is None else f'{drop:.2%}'}), relative feature distance "
                  f"{trace['feature_distance']['start']:.3f} -> {trace['feature_distance']['end']:.3f} "
                  f"({s['iterations']} iterations, {t.seconds:.1f} s, {t.seconds / len(phi0):.2f} s/image)")
    return optimised, {"seconds_per_image": t.seconds / len(phi0), "objective_start": history[0],
                       "objective_end": history[-1], "final_relative_drop": drop,
                       "feature_distance": trace["feature_distance"], "settings": s,
                       "objective": _rounded(history), "feature_term": _rounded(trace["feature_term"])}


def _rounded(values):
    """6 significant digits: a trace of thousands of steps stays a readable size in the JSON."""
    return [float(f"{v:.6g}") for v in values]


def _merged(result, previous, order):
    """This run's layers plus the finished ones of a previous run with the same settings that this
    run did not ask for (`--layers fc8` after a full run keeps conv2's results), in network order."""
    layers = {**previous.get("layers", {}), **result["layers"]}
    return {**result, "layers": {layer: layers[layer] for layer in sorted(layers, key=order.index)}}


def _previous(out, guard, fresh):
    """The stored results to resume from: only those made with exactly these settings and images."""
    path = out / RESULTS
    if fresh or not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text())
    except ValueError:
        return {}
    if previous.get("guard") != guard:
        warn(f"{path} was made with another cache, images or optimisation settings; recomputing every layer")
        return {}
    return previous


def _read_rows(dataset, rows):
    """dataset[rows] for unsorted rows (h5py reads increasing indices only)."""
    order = np.argsort(rows)
    out = np.empty((len(rows), *dataset.shape[1:]), dataset.dtype)
    out[order] = dataset[rows[order]]
    return out


def _save_images(path, images):
    path.parent.mkdir(parents=True, exist_ok=True)
    with storage.replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images.numpy())


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text(path, json.dumps(data, indent=2) + "\n")


def _show(result):
    table = Table(title=f"decoder vs optimisation ({len(result['images'])} {result['split']} images) - "
                        f"{result['encoder_description']}")
    for column in ("layer", "method", "norm. error", "MSE", "PSNR (dB)", "SSIM", "feat. dist.", "s/image", "budget",
                   "final drop"):
        table.add_column(column, justify="left" if column in ("layer", "method", "budget") else "right")
    for layer, methods in result["layers"].items():
        for method, m in methods.items():
            table.add_row(layer, method, f"{m['normalized_error']:.3f}", f"{m['mse']:.5f}", f"{m['psnr_db']:.2f}",
                          f"{m['ssim']:.3f}", feature_distance_text(m), f"{m['seconds_per_image']:.4g}",
                          *budget(result, layer, method, short=True))
    console.print(table)
