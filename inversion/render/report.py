"""render.py's work: figures, metrics.json and results.md from the cache and checkpoints alone."""

import json
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from inversion.core import (config, encoder, feature_cache, figures, host, inference, metrics, optimisation_results,
                            runtime, storage)
from inversion.core.console import Timer, console, summary, warn
from inversion.core.images import to_hwc, to_target, to_uint8
from inversion.render import analyses, comparison, webpage


def render(cfg, layers=None, num_images=None):
    with Timer() as timer:
        cache = feature_cache.open_for(cfg)
        with cache:
            result = _render(cfg, cache, cache.ordered(layers or cfg["layers"]), num_images or cfg["render.num_images"])
    summary("rendered", len(result["files"]), timer.seconds, "files", f"into {cfg['output.dir']}")
    return result


def _render(cfg, cache, layers, num_images):
    out = Path(cfg["output.dir"])
    out.mkdir(parents=True, exist_ok=True)
    identity = cache.attrs["encoder"]
    note = encoder.describe(identity)
    decoders = inference.load_decoders(cfg, cache, layers)

    device = runtime.pick_device(cfg["device"])
    host.keep_freed_memory()
    images = cache.load("eval", "images")
    labels = cache.load("eval", "labels")
    originals = to_target(torch.from_numpy(images))
    recon = {layer: inference.decode(model, cache["eval"][layer], 256, device) for layer, (model, _) in decoders.items()}

    normaliser = metrics.pair_distance(originals, cfg["seed"])
    scores, top1, true_class = _scores(cfg, cache, images, labels, originals, recon, normaliser, device)
    baselines = _baselines(cache, originals, labels, normaliser)
    compared = _compared(cfg, cache, images, labels, originals, list(recon), normaliser, device)

    provenance = json.dumps({"config_hash": config.digest(cfg), "cache_hash": cache.attrs["cache_hash"],
                             "versions": host.versions()}, sort_keys=True)
    files = _figures(cfg, cache, decoders, recon, num_images, note, provenance, out)
    files += _comparison_figures(cfg, cache, originals, recon, compared, num_images, note, provenance, out)
    table, analysis_files = _analyses(cfg, cache, decoders, originals, recon, scores, normaliser, labels, device,
                                      note, provenance, out)
    files += analysis_files

    report = {
        "config_hash": config.digest(cfg),
        "cache": str(cache.path),
        "cache_hash": cache.attrs["cache_hash"],
        "encoder": identity,
        "encoder_description": note,
        "classes": [{"label": i, "wnid": w, "name": n}
                    for i, (w, n) in enumerate(zip(cache.attrs["class_wnids"], cache.attrs["class_names"]))],
        "eval_images": len(images),
        "precision": runtime.resolve_precision(cfg["precision"], device),  # what the decoders decoded in
        "normaliser_mean_pair_distance": normaliser,
        "layers": {layer: {**scores[layer], "epochs": len(ckpt["history"])} for layer, (_, ckpt) in decoders.items()},
        "baselines": baselines,
        "comparator": cfg["loss.comparator"],
        "compared_runs": {folder: run["scores"] for folder, run in compared.items()},
        "compared_encoders": {folder: encoder.describe(run["encoder"]) for folder, run in compared.items()},
        "top1_agreement": top1 or f"skipped: {_top1_reason(cfg, identity)}",
        "top1_true_class": true_class or "skipped: " + (_top1_reason(cfg, identity)
                                                        or "the encoder's classes are not the dataset's"),
        "analyses": table or "skipped: render.analyses is false",
        "analysis_claims": analyses.claims(table, baselines["mean_train_image"]["normalized_error"],
                                           encoder.is_pretrained(identity)) if table else [],
        "versions": host.versions(),
        "figures": [str(f.relative_to(out)) for f in files],
    }
    written = _write(cfg, report, originals, recon, labels, num_images, normaliser, out)
    _show(report)
    return {"report": report, "files": files + written}


def _analyses(cfg, cache, decoders, originals, recon, scores, normaliser, labels, device, note, provenance, out):
    """({analysis: table}, files) of the paper's analyses, or ({}, []) where render.analyses is off."""
    if not cfg["render.analyses"]:
        return {}, []
    errors = {layer: values["normalized_error"] for layer, values in scores.items()}
    return analyses.run(cache, decoders, originals, recon, errors, normaliser,
                        figures.choose_rows(labels, analyses.FIGURE_ROWS, cfg["seed"]), device, cfg["seed"], note,
                        provenance, out)


def _write(cfg, report, originals, recon, labels, num_images, normaliser, out):
    """metrics.json, results.md and report.html; returns their paths."""
    storage.write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    storage.write_text(out / "results.md",
                       _markdown(report) + _compared_section(report, cfg["output.dir"])
                       + _optimisation_section(out / optimisation_results.RESULTS, report["cache_hash"]))
    rows = figures.choose_rows(labels, num_images, cfg["seed"])  # the comparison grid's images
    tables = {"results": ([title for _, title, _ in _columns(report)], list(_metric_rows(report))),
              "compared": _compared_table(report, cfg["output.dir"]) if report["compared_runs"] else None}
    page = webpage.write(out, report, tables, originals[rows], {layer: r[rows] for layer, r in recon.items()},
                         labels[rows], normaliser)
    return [out / "metrics.json", out / "results.md", page]


def _scores(cfg, cache, images, labels, originals, recon, normaliser, device):
    """({layer: metrics}, {layer: top-1 agreement}, {"original" and layer: top-1 on the true class}; the last
    two empty where skipped) of the reconstructions."""
    scores = {layer: metrics.summarize(originals, r, normaliser) for layer, r in recon.items()}
    top1, true_class = _top1(cfg, cache.attrs["encoder"], images, recon, device, labels,
                             cache.attrs["class_wnids"])
    for layer, value in top1.items():
        scores[layer]["top1_agreement"] = value
    for layer, value in true_class.items():
        if layer in scores:
            scores[layer]["top1_true_class"] = value
    for layer, values in comparison.sharpness(cfg, cache, originals, recon, device).items():
        scores[layer].update(values)
    return scores, top1, true_class


def _figures(cfg, cache, decoders, recon, num_images, note, provenance, out):
    """Loss curves, the comparison grid and a grid per layer; returns the files written."""
    images, labels, names = cache.load("eval", "images"), cache.load("eval", "labels"), cache.attrs["class_names"]
    rows = figures.choose_rows(labels, num_images, cfg["seed"])
    files = figures.loss_curves({layer: ckpt["history"] for layer, (_, ckpt) in decoders.items()}, out, note,
                                provenance)
    files += figures.comparison_grid(images[rows], {layer: to_hwc(r[rows]) for layer, r in recon.items()},
                                     [_short(names[labels[i]]) for i in rows], out / "reconstructions", note,
                                     provenance)
    grid = figures.choose_rows(labels, cfg["render.grid_size"] ** 2, cfg["seed"] + 1)
    for layer, r in recon.items():
        files += figures.layer_grid(images[grid], to_hwc(r[grid]), layer, out / f"grid_{layer}", note, provenance)
    return files


def _baselines(cache, originals, labels, normaliser, chunk=2048):
    """Reconstruct every eval image as the mean training image, or its class's mean training image."""
    train_images, train_labels = cache["train"]["images"], cache.load("train", "labels")
    classes = len(cache.attrs["class_wnids"])
    sums = np.zeros((classes, *train_images.shape[1:]))
    for start in range(0, len(train_images), chunk):
        block, block_labels = train_images[start:start + chunk], train_labels[start:start + chunk]
        for c in np.unique(block_labels):
            sums[c] += block[block_labels == c].sum(0, dtype=np.float64)
    counts = np.bincount(train_labels, minlength=classes)
    class_mean = to_target(torch.from_numpy(sums / np.maximum(counts, 1)[:, None, None, None]))
    overall = to_target(torch.from_numpy(sums.sum(0, keepdims=True) / counts.sum()))
    return {
        "mean_train_image": metrics.summarize(originals, overall.expand_as(originals), normaliser),
        "class_mean_train_image": metrics.summarize(originals, class_mean[torch.from_numpy(labels)], normaliser),
    }


def _top1(cfg, identity, images, recon, device, labels, wnids, batch=128):
    """{layer: share of reconstructions the encoder puts in the class it puts their original in}, and for an
    encoder trained here (whose classes are the dataset's), {"original" and each layer: share put in the
    image's true class}; empty where skipped."""
    if _top1_reason(cfg, identity):
        return {}, {}
    model = encoder.reload(identity)
    if model is None:
        warn("top-1 agreement skipped: the encoder this cache was built with cannot be loaded again")
        return {}, {}
    model = model.to(device)

    def classes(uint8_images):
        with torch.inference_mode():
            return torch.cat([
                model(encoder.preprocess(torch.from_numpy(uint8_images[s:s + batch]).to(device),
                                         cfg["encoder.input_size"], identity["arch"])).argmax(1).cpu()
                for s in range(0, len(uint8_images), batch)])

    reference = classes(images)
    predicted = {layer: classes(to_uint8(r)) for layer, r in recon.items()}
    agreement = {layer: (p == reference).float().mean().item() for layer, p in predicted.items()}
    known = identity.get("classes")
    if not known or not all(w in known for w in wnids):
        return agreement, {}
    truth = torch.tensor([known.index(wnids[label]) for label in labels])
    true_class = {name: (p == truth).float().mean().item() for name, p in {"original": reference, **predicted}.items()}
    return agreement, true_class


def _top1_reason(cfg, identity):
    if cfg["render.top1"] is False:
        return "render.top1 is false"
    if cfg["render.top1"] == "auto" and not encoder.is_pretrained(identity):
        return "random-init encoder: its classes mean nothing (set render.top1=true to compute anyway)"
    return ""


def _short(name):
    return name.split(",")[0]


COLUMNS = (("mse", "MSE", "{:.5f}"), ("psnr_db", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
           ("normalized_error", "norm. error", "{:.3f}"), ("top1_agreement", "top-1 agree", "{:.1%}"),
           ("top1_true_class", "top-1 true class", "{:.1%}"),
           ("high_frequency_ratio", "HF ratio", "{:.3f}"), ("feature_error@layer", "feat. err (layer)", "{:.3f}"),
           ("feature_error@comparator", "feat. err (comparator)", "{:.3f}"))


def _columns(report):
    """The metric columns: top-1 on the true class only where an encoder's classes are the dataset's."""
    runs = [report["layers"], *report.get("compared_runs", {}).values()]
    known = any("top1_true_class" in values for layers in runs for values in layers.values())
    return [c for c in COLUMNS if c[0] != "top1_true_class" or known]


def _metric_rows(report):
    rows = [(layer, layer, values) for layer, values in report["layers"].items()]
    rows += [(f"baseline: {name.replace('_', ' ')}", None, values) for name, values in report["baselines"].items()]
    for name, layer, values in rows:
        yield name, _cells(values, layer, report["comparator"], _columns(report))


def _cells(values, layer, comparator, columns):
    """A row's formatted metrics; the feature errors at the row's own layer and at the comparator."""
    flat = {**values, **{f"feature_error@{where}": values.get("feature_error", {}).get(node)
                         for where, node in (("layer", layer), ("comparator", comparator))}}
    return [fmt.format(flat[key]) if flat.get(key) is not None else "-" for key, _, fmt in columns]


def _compared(cfg, cache, images, labels, originals, layers, normaliser, device):
    """`render.compare_with`: {output.dir: {"recon": {layer: images}, "scores": {layer: metrics}, "encoder":
    identity}}. A run on another encoder's cache is scored by that encoder (top-1, feature error)."""
    compared = {}
    for folder, run in comparison.other_runs(cfg, cache, layers, device).items():
        source = run["cache"]
        scores, _, _ = _scores(cfg, source, images, labels, originals, run["recon"], normaliser, device)
        compared[folder] = {"recon": run["recon"], "scores": scores, "encoder": source.attrs["encoder"]}
        if source is not cache:
            source.close()
    return compared


def _comparison_figures(cfg, cache, originals, recon, compared, num_images, note, provenance, out):
    """spectrum.png always; reconstructions_compared.png with `render.compare_with`."""
    label = comparison.labels({cfg["output.dir"]: cache.attrs["encoder"],
                               **{folder: run["encoder"] for folder, run in compared.items()}})
    runs = {label[cfg["output.dir"]]: recon, **{label[folder]: run["recon"] for folder, run in compared.items()}}
    optimised = comparison.optimisation_images(out, cache.attrs["cache_hash"])
    files = comparison.spectrum_figure(originals, runs, optimised, out / "spectrum", note, provenance)
    if compared:
        labels, names = cache.load("eval", "labels"), cache.attrs["class_names"]
        rows = figures.choose_rows(labels, num_images, cfg["seed"])
        files += comparison.compared_grid(cache.load("eval", "images"), rows, [_short(names[labels[i]]) for i in rows],
                                          runs, out / "reconstructions_compared", note, provenance)
    return files


def _compared_section(report, this_run):
    """Every run's metrics in one table, layer by layer, with the baselines."""
    if not report["compared_runs"]:
        return ""
    titles, rows = _compared_table(report, this_run)
    lines = ["", "## Runs compared (render.compare_with)", "", _markdown_row(titles),
             _markdown_row(["---"] * 3 + ["---:"] * (len(titles) - 3))]
    lines += [_markdown_row([layer, f"`{run}`" if run else "-", name, *cells]) for layer, run, name, cells in rows]
    return "\n".join(lines) + "\n"


def _compared_table(report, this_run):
    """(column titles, [(layer, run, encoder, formatted cells)]): each layer's row for every run, then the
    mean-image and class-mean baselines (they need no encoder)."""
    runs = {this_run: report["layers"], **report["compared_runs"]}
    encoders = {this_run: report["encoder_description"], **report.get("compared_encoders", {})}
    columns = _columns(report)
    rows = [(layer, run, encoders.get(run, ""), _cells(layers[layer], layer, report["comparator"], columns))
            for layer in report["layers"] for run, layers in runs.items() if layer in layers]
    rows += [(f"baseline: {name.replace('_', ' ')}", "", "", _cells(values, None, report["comparator"], columns))
             for name, values in report["baselines"].items()]
    return ["layer", "run", "encoder", *[title for _, title, _ in columns]], rows


def _markdown(report):
    lines = ["# Reconstruction results", "",
             f"- Encoder: **{report['encoder_description']}**",
             f"- Cache: `{report['cache']}` (cache hash `{report['cache_hash']}`)",
             f"- Config hash: `{report['config_hash']}`",
             f"- Evaluation images: {report['eval_images']:,}; normaliser (mean distance between random "
             f"pairs of eval images): {report['normaliser_mean_pair_distance']:.3f}",
             "- Epochs: " + ", ".join(f"{k} {v['epochs']}" for k, v in report["layers"].items()), "",
             "| reconstruction from | " + " | ".join(title for _, title, _ in _columns(report)) + " |",
             "|---|" + "---:|" * len(_columns(report))]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in _metric_rows(report)]
    if isinstance(report["top1_agreement"], str):
        lines += ["", f"Top-1 agreement {report['top1_agreement']}."]
    if report["analysis_claims"]:
        lines += ["", "## What each layer keeps: normalised error under each analysis", ""]
        lines += [_markdown_row(row) for row in _analysis_rows(report)]
        lines += [""] + [f"- {sentence}" for sentence in report["analysis_claims"]]
    lines += ["", "## Classes", "", "| label | wnid | name |", "|---:|---|---|"]
    lines += [f"| {c['label']} | {c['wnid']} | {c['name']} |" for c in report["classes"]]
    lines += ["", "## Figures", ""] + [f"- [{f}]({f})" for f in report["figures"]]
    return "\n".join(lines) + "\n"


def _analysis_rows(report):
    """Header, alignment, then a row per analysis with a column per layer ("-" where it does not apply)."""
    table = report["analyses"]
    layers = list(table["unperturbed"])
    yield ["analysis", *layers]
    yield ["---", *["---:"] * len(layers)]
    for name, values in table.items():
        yield [name, *[f"{values[l]['normalized_error']:.3f}" if l in values else "-" for l in layers]]


def _markdown_row(cells):
    return "| " + " | ".join(cells) + " |"


def _optimisation_section(path, cache_hash):
    """Decoder vs inversion by optimisation (invert_by_optimisation.py), only when that ran on
    this very cache's eval images (`optimisation_results.stored`)."""
    result = optimisation_results.stored(path, cache_hash)
    if result is None:
        return ""
    lines = ["", "## Decoder vs inversion by optimisation", "",
             f"The same {len(result['images'])} eval images, {optimisation_results.iterations_text(result)} "
             f"(Mahendran & Vedaldi 2015; `{path.name}`, config hash `{result['config_hash']}`). "
             "Budget: the decoder's training, once for every image, beside the optimisation's iterations and "
             "seconds for each image; final drop: how much the objective still fell over the last tenth "
             "of the iterations.", "",
             "| layer | method | norm. error | MSE | PSNR (dB) | SSIM | feature distance | seconds per image | budget "
             "| final drop |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for layer, methods in result["layers"].items():
        for method in optimisation_results.methods(result, layer):
            m = methods[method]
            lines.append(f"| {layer} | {method} | {m['normalized_error']:.3f} | {m['mse']:.5f} | {m['psnr_db']:.2f} "
                         f"| {m['ssim']:.3f} | {optimisation_results.feature_distance_text(m)} "
                         f"| {m['seconds_per_image']:.4g} | "
                         + " | ".join(optimisation_results.budget(result, layer, method)) + " |")
    lines += ["", f"![decoder vs optimisation]({result['figure']})"]
    if (path.parent / str(result.get("objective_figure", ""))).is_file():
        lines += ["", f"![optimisation objective per iteration]({result['objective_figure']})"]
    return "\n".join(lines) + "\n"


def _show(report):
    table = Table(title=f"eval metrics ({report['eval_images']:,} images) - {report['encoder_description']}")
    table.add_column("reconstruction from")
    for _, title, _ in _columns(report):
        table.add_column(title, justify="right")
    for name, cells in _metric_rows(report):
        table.add_row(name, *cells)
    console.print(table)
    if not report["analysis_claims"]:
        return
    header, _, *rows = _analysis_rows(report)
    table = Table(title="normalised error under each analysis (figures: analysis_<name>.png)")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
