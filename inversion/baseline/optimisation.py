"""Inversion by optimisation (Mahendran & Vedaldi, CVPR 2015): the baseline a trained decoder beats.

For target features phi0 (cached), gradient descent over the image x minimises, per image,

    ||phi(x) - phi0||^2 / ||phi0||^2  +  lambda_alpha * R_alpha(x)  +  lambda_tv * TV_beta(x)

Choices, so the two methods answer the same question (docs/optimisation-baseline.md lists which constants are M&V's):
- x is an RGB image in [0, 1] at the cache's image size S, the space the decoders predict in, and
  phi is the extraction itself: `encoder.preprocess_float` (bilinear resize to input_size,
  normalisation) then the layer's tap. The cached image therefore maps onto phi0 exactly (up to
  cache.dtype), and a reconstruction is compared with its original at the same S.
- The regularisers see u = (x - mean) / std, the mean-subtracted image scaled by the encoder's own
  normalisation (M&V regularise the mean-subtracted image brought to a unit-like range), and are
  means over pixels and channels rather than sums, so a lambda does not depend on S:
      R_alpha = mean_{c,i,j} |u_cij|^alpha
      TV_beta = mean_{c,i<H-1,j<W-1} ((u_c,i,j+1 - u_cij)^2 + (u_c,i+1,j - u_cij)^2)^(beta/2)
- Adam (or SGD with momentum) whose step decays to zero on a cosine; jitter: each step the image
  is rolled by a seeded random shift of up to `jitter` pixels before the encoder sees it
  (Mahendran & Vedaldi's IJCV 2016 follow-up), so no single pixel grid is over-fitted.
- The start is the encoder's mean colour plus small seeded Gaussian noise; the result is clamped
  to [0, 1] only for metrics and figures, as decoder outputs are.
- Every setting may differ per layer (`optimisation.layers`), as M&V tune their regularisers per
  layer; each layer's stored results say which values it used.

All images of a layer form one batch; the objective is the sum of the per-image objectives, so
an image's gradient does not depend on the batch. Results are stored per layer as they finish
(`optimisation.json` plus the images in `optimisation/<layer>.npz`), and a re-run with the same
settings skips finished layers. The objective is stored per iteration and drawn
(`optimisation_objective.png`), so whether the baseline has stopped falling can be seen, not assumed.
"""

import json
import math
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
from inversion.core.optimisation_results import RESULTS, budget, iterations_text, per_layer

FIGURE = "optimisation_vs_decoder"
OBJECTIVE_FIGURE = "optimisation_objective"
SPLITS = ("eval", "train")


def settings(cfg):
    """The optimisation.* keys without their prefix: what results are pinned to."""
    return {key.split(".", 1)[1]: cfg[key] for key in cfg if key.startswith("optimisation.")}


def layer_settings(s, layer):
    """What `layer` is optimised with: the global settings `s` with its optimisation.layers entry on top."""
    return {**{key: value for key, value in s.items() if key != "layers"}, **s.get("layers", {}).get(layer, {})}


def with_iterations(cfg, iterations):
    """`--iterations N`: N steps for every layer, the layers' own `iterations` entries included (a quick
    run asked for on the command line must not spend conv5's and fc6's 800)."""
    per_layer = {layer: {k: v for k, v in entry.items() if k != "iterations"}
                 for layer, entry in cfg["optimisation.layers"].items()}
    return {**cfg, "optimisation.iterations": iterations, "optimisation.layers": per_layer}


def final_relative_drop(history):
    """(mean of the second-to-last tenth of the trace - mean of the last tenth) / mean of the last tenth:
    how much the objective still fell at the end (small = it has stopped falling); None under 2 steps.
    Under the cosine schedule the last tenth's steps are under 2.5% of lr, so a small value says the
    run has settled, not that more iterations would not help: compare runs of different lengths for that."""
    if len(history) < 2:
        return None
    n = max(1, len(history) // 10)
    last, before = float(np.mean(history[-n:])), float(np.mean(history[-2 * n:-n]))
    return (before - last) / last if last else None


def alpha_norm(u, alpha):
    """Per-image mean of |u|^alpha."""
    return u.abs().pow(alpha).flatten(1).mean(1)


def total_variation(u, beta):
    """Per-image mean of (dx^2 + dy^2)^(beta/2) over pixels with both a right and a lower neighbour.
    The clamp keeps the gradient finite at zero differences for beta < 2 (it changes no value above 1e-12)."""
    dx = u[:, :, :-1, 1:] - u[:, :, :-1, :-1]
    dy = u[:, :, 1:, :-1] - u[:, :, :-1, :-1]
    return (dx * dx + dy * dy).clamp_min(1e-12).pow(beta / 2).flatten(1).mean(1)


def feature_loss(taps, layer, x, phi0, input_size, arch):
    """Per-image ||phi(x) - phi0||^2 / ||phi0||^2, through the cache's own preprocessing."""
    phi = taps(encoder.preprocess_float(x, input_size, arch))[layer].float()
    return (phi - phi0).pow(2).flatten(1).sum(1) / phi0.pow(2).flatten(1).sum(1).clamp_min(1e-12)


def objective(taps, layer, x, phi0, s, input_size, arch, shift=(0, 0), precision="fp32"):
    """Per-image objective (B,) and its feature term; `shift` rolls x (jitter) before the encoder, which runs
    in `precision` (the regularisers and the fit's sums stay fp32)."""
    mean, std = encoder.normalisation_tensors(arch, x.device)
    u = (x - mean) / std
    with runtime.autocast(x.device, precision):
        fit = feature_loss(taps, layer, torch.roll(x, shift, (2, 3)) if any(shift) else x, phi0, input_size, arch)
    return fit + s["lambda_alpha"] * alpha_norm(u, s["alpha"]) + s["lambda_tv"] * total_variation(u, s["beta"]), fit


def invert(taps, layer, phi0, image_size, s, input_size, arch, seed, on_step=None, precision="fp32"):
    """Optimise a batch of images towards `phi0` (B, *shape) on phi0's device.

    Returns (images (B, 3, S, S) clamped to [0, 1] on the CPU, {objective: [mean per step],
    feature_term: [its feature term's mean per step], feature_distance: {start, end}}), the feature
    distance being the mean relative ||phi(x) - phi0|| / ||phi0|| without jitter.
    """
    device = phi0.device
    generator = torch.Generator().manual_seed(seed)
    mean, _ = encoder.normalisation_tensors(arch, device)
    start = mean + s["init_std"] * torch.randn(len(phi0), 3, image_size, image_size, generator=generator).to(device)
    x = start.clone().requires_grad_(True)
    if s["optimizer"] == "adam":
        optimizer = runtime.adam([x], device, lr=s["lr"])
    else:
        optimizer = torch.optim.SGD([x], lr=s["lr"], momentum=s["momentum"], fused=device.type in ("cpu", "cuda"))
    history, fits = [], []
    for step in range(s["iterations"]):
        for group in optimizer.param_groups:
            group["lr"] = s["lr"] * 0.5 * (1 + math.cos(math.pi * step / s["iterations"]))
        shift = tuple(torch.randint(-s["jitter"], s["jitter"] + 1, (2,), generator=generator).tolist())
        value, fit = objective(taps, layer, x, phi0, s, input_size, arch, shift, precision)
        optimizer.zero_grad(set_to_none=True)
        value.sum().backward()
        optimizer.step()
        history.append(value.mean().item())
        fits.append(fit.mean().item())
        if not math.isfinite(history[-1]):
            raise UserError(f"{layer}: the objective became {history[-1]} at step {step + 1}; "
                            f"try a lower optimisation.lr")
        if on_step:
            on_step(step, history[-1])
    with torch.no_grad():
        distance = {"start": _distance(taps, layer, start, phi0, input_size, arch),
                    "end": _distance(taps, layer, x, phi0, input_size, arch)}
    return x.detach().clamp(0, 1).cpu(), {"objective": history, "feature_term": fits, "feature_distance": distance}


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
    guard = {"cache_hash": cache.attrs["cache_hash"], "split": split, "rows": rows.tolist(), "settings": s,
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
    """One layer: optimised (or read back when a previous run finished it) and decoded, its results stored at
    once; returns ((decoded, optimised) images, whether it was optimised now)."""
    features = _read_rows(job.cache[job.split][layer], job.rows)
    stored = job.out / "optimisation" / f"{layer}.npz"
    done = layer in job.previous.get("layers", {}) and stored.exists()
    if done:
        console.print(f"{layer}: already optimised ({stored}); --fresh to recompute")
        optimised = torch.from_numpy(np.load(stored)["images"])
        entry = job.previous["layers"][layer]["optimisation"]
    else:
        phi0 = torch.from_numpy(features).to(job.device).float()
        optimised, entry = _optimise_layer(job.cfg, job.model, job.arch, layer, phi0, job.originals.shape[-1],
                                           job.used[layer], job.input_size, job.precision)
        entry.update(metrics.summarize(job.originals, optimised, job.normaliser))
        _save_images(stored, optimised)
    with Timer() as t:
        decoded = inference.decode(decoder, features, 256, job.device)
    history = checkpoint["history"]
    job.result["layers"][layer] = {
        "decoder": {**metrics.summarize(job.originals, decoded, job.normaliser),
                    "seconds_per_image": t.seconds / len(job.rows), "epochs": len(history),
                    "training_seconds": sum(h["seconds"] for h in history)},
        "optimisation": entry}
    _write_json(job.out / RESULTS, _merged(job.result, job.previous, job.cache.attrs["layers"]))
    return (decoded, optimised), not done


def _kept(job, layer):
    """What an interrupted run keeps: every finished layer (this run's and a previous one's)."""
    finished = list(_merged(job.result, job.previous, job.cache.attrs["layers"])["layers"])
    kept = f"kept {', '.join(finished)} in {job.out / RESULTS}" if finished else "no layer was finished"
    return f"{kept}; {layer}'s optimisation was dropped"


def _figure(result, originals, pictures, row_labels, out):
    """Each layer's decoder and optimisation side by side, per image."""
    columns = {}
    for layer, (decoded, optimised) in pictures.items():
        columns[f"{layer} decoder"] = to_hwc(decoded)
        columns[f"{layer} optim."] = to_hwc(optimised)
    figures.comparison_grid(to_hwc(originals), columns, row_labels, out / FIGURE, result["encoder_description"],
                            _provenance(result), caption=f"Decoder vs optimisation ({result['split']} images, "
                                                         f"{iterations_text(result)})")


def _objective_figure(result, out):
    """The objective per iteration of each layer this run shows (resumed layers from their stored trace):
    the evidence that the baseline was run until it stopped falling, or that it was not."""
    curves = {}
    for layer, methods in result["layers"].items():
        entry = methods["optimisation"]
        if entry.get("objective"):
            drop = entry.get("final_relative_drop")
            label = f"{layer} (final drop {drop:.2%})" if drop is not None else layer
            curves[label] = {"objective": entry["objective"], "feature_term": entry.get("feature_term")}
    if curves:
        figures.objective_curves(curves, out / OBJECTIVE_FIGURE,
                                 f"Optimisation objective per iteration ({result['split']} images, "
                                 f"{iterations_text(result)})",
                                 result["encoder_description"], _provenance(result))


def _provenance(result):
    return json.dumps({"config_hash": result["config_hash"], "cache_hash": result["cache_hash"],
                       "versions": result["versions"]}, sort_keys=True)


def _optimise_layer(cfg, model, arch, layer, phi0, image_size, s, input_size, precision="fp32"):
    """`s`: this layer's own settings (`layer_settings`), stored with its results."""
    taps = encoder_graph.extractor(model, arch, [layer]).eval()
    seed = seeds.derive_seed(cfg["seed"], layer)
    with progress() as bar:
        task = bar.add_task(f"{layer}", total=s["iterations"], rate="")
        t0 = time.perf_counter()

        def on_step(step, value):
            bar.update(task, advance=1, description=f"{layer} objective {value:.4g}",
                       rate=f"{(step + 1) / (time.perf_counter() - t0):.2f} it/s")

        with Timer() as t:
            optimised, trace = invert(taps, layer, phi0, image_size, s, input_size, arch, seed, on_step, precision)
    history = trace["objective"]
    drop = final_relative_drop(history)
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


def _distance(taps, layer, x, phi0, input_size, arch):
    return feature_loss(taps, layer, x, phi0, input_size, arch).sqrt().mean().item()


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
    for column in ("layer", "method", "norm. error", "MSE", "PSNR (dB)", "SSIM", "s/image", "budget", "final drop"):
        table.add_column(column, justify="left" if column in ("layer", "method", "budget") else "right")
    for layer, methods in result["layers"].items():
        for method, m in methods.items():
            table.add_row(layer, method, f"{m['normalized_error']:.3f}", f"{m['mse']:.5f}", f"{m['psnr_db']:.2f}",
                          f"{m['ssim']:.3f}", f"{m['seconds_per_image']:.4g}",
                          *budget(result, layer, method, short=True))
    console.print(table)
