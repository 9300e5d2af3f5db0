"""`output.dir/report.html`: render's results as one page to open or send, beside metrics.json.

The page is one self-contained file: every image is embedded as a base64 PNG, so it opens from `file://`
(or as a mail attachment) with no network, no script and no folder next to it. It is built from what render
already holds: the metrics.json dict, the figure files it just wrote, and the comparison grid's eval images
with their reconstructions (the per-image section; nothing is decoded again).

Sections, top to bottom: the encoder and provenance (a random-init encoder in a warning box), the results
table, the compared runs' table (`render.compare_with`), loss curves, the comparison grid, per-layer grids, the analyses and the optimisation baseline when
present, and one row per grid image: its class, the original and every layer's reconstruction with its error.
"""

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from inversion.core import optimisation_results, storage
from inversion.core.images import to_uint8

NAME = "report.html"
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 0 auto; padding: 0 16px 48px; color: #222; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; margin-top: 36px; }
.encoder { font-size: 18px; padding: 10px 14px; border-radius: 6px; background: #eef4ff; }
.random { background: #fff0f0; border: 3px solid #c00; color: #900; font-weight: bold; }
table { border-collapse: collapse; margin: 8px 0; } th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; } figure { margin: 12px 0; } figcaption { color: #555; font-size: 13px; }
.thumb { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
.images td { text-align: center; vertical-align: top; font-size: 13px; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; } dd { margin: 0; word-break: break-all; }
"""


def write(out, report, tables, originals, reconstructions, labels, normaliser):
    """Write the page into `out`; returns its path. `tables` holds results.md's: "results" (column titles,
    [(row name, formatted cells)]) and "compared" (titles, [(layer, run, encoder, cells)]) or None. `originals` (N, 3, S, S) float in [0, 1] and `reconstructions` {layer: (N, 3, S,
    S)} are the comparison grid's images, `labels` their classes."""
    out = Path(out)
    parts = [_header(report), _results(report, tables["results"]), _compared(tables["compared"])]
    figures = [out / name for name in report["figures"] if name.endswith(".png")]
    parts.append(_figures("Loss curves", [f for f in figures if f.name.startswith("loss_")]))
    parts.append(_figures("Comparison grid", [f for f in figures if f.name == "reconstructions.png"]))
    parts.append(_figures("Runs compared", [f for f in figures if f.name == "reconstructions_compared.png"]))
    parts.append(_figures("Power spectra", [f for f in figures if f.name == "spectrum.png"]))
    parts.append(_figures("Per-layer grids", [f for f in figures if f.name.startswith("grid_")]))
    parts.append(_analyses(report, [f for f in figures if f.name.startswith("analysis_")]))
    parts.append(_optimisation(out, report["cache_hash"]))
    parts.append(_per_image(report, originals, reconstructions, labels, normaliser))
    title = f"Reconstruction results - {report['encoder_description']}"
    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(p for p in parts if p) + "\n</body>\n</html>\n")
    path = out / NAME
    storage.write_text(path, page)
    return path


def per_image_errors(originals, reconstruction, normaliser):
    """Each image's normalised error: ||x - y||_2 over the normaliser, as metrics.json's mean is."""
    return ((originals - reconstruction).flatten(1).norm(dim=1) / normaliser).tolist()


def _header(report):
    description = report["encoder_description"]
    random = report["encoder"].get("kind") == "random"
    warning = (" - its features come from untrained weights, so these reconstructions say nothing about "
               "what a trained network keeps" if random else "")
    facts = {"Config hash": report["config_hash"], "Cache": f"{report['cache']} (hash {report['cache_hash']})",
             "Evaluation images": f"{report['eval_images']:,}",
             "Normaliser": f"{report['normaliser_mean_pair_distance']:.3f} (mean distance between random pairs "
                           f"of eval images)",
             "Epochs": ", ".join(f"{k} {v['epochs']}" for k, v in report["layers"].items()),
             "Versions": ", ".join(f"{k} {v}" for k, v in report["versions"].items())}
    return (f"<h1>Reconstruction results</h1>\n"
            f"<p class=\"encoder{' random' if random else ''}\">Encoder: {_e(description)}{_e(warning)}</p>\n"
            "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts.items()) + "</dl>")


def _results(report, table):
    titles, rows = table
    body = "".join(f"<tr><th scope=\"row\">{_e(name)}</th>"
                   + "".join(f"<td class=\"num\">{_e(cell)}</td>" for cell in cells) + "</tr>\n" for name, cells in rows)
    note = (f"<p>Top-1 agreement {_e(report['top1_agreement'])}.</p>"
            if isinstance(report["top1_agreement"], str) else "")
    return ("<h2 id=\"results\">Results</h2>\n<table class=\"results\">\n<tr><th>reconstruction from</th>"
            + "".join(f"<th>{_e(title)}</th>" for title in titles) + "</tr>\n" + body + "</table>\n" + note)


def _compared(table):
    """`render.compare_with`'s table: every run's row per layer, then the baselines."""
    if not table:
        return ""
    titles, rows = table
    body = "".join("<tr>" + "".join(f"<td>{_e(text)}</td>" for text in (layer, run, name))
                   + "".join(f"<td class=\"num\">{_e(cell)}</td>" for cell in cells) + "</tr>\n"
                   for layer, run, name, cells in rows)
    return ("<h2 id=\"compared\">Runs compared</h2>\n<table class=\"results\">\n<tr>"
            + "".join(f"<th>{_e(title)}</th>" for title in titles) + "</tr>\n" + body + "</table>")


def _figures(title, paths):
    if not paths:
        return ""
    return f"<h2>{_e(title)}</h2>\n" + "\n".join(
        f"<figure><img src=\"{_data_uri(p.read_bytes())}\" alt=\"{_e(_alt(p))}\">"
        f"<figcaption>{_e(p.name)}</figcaption></figure>" for p in paths)


def _analyses(report, paths):
    table = report["analyses"]
    if not isinstance(table, dict):
        return f"<h2>Analyses</h2>\n<p>{_e(table)}.</p>"
    layers = list(table["unperturbed"])
    rows = "".join(f"<tr><th scope=\"row\">{_e(name)}</th>" + "".join(
        f"<td class=\"num\">{values[layer]['normalized_error']:.3f}</td>" if layer in values else "<td>-</td>"
        for layer in layers) + "</tr>\n" for name, values in table.items())
    claims = "".join(f"<li>{_e(c)}</li>" for c in report["analysis_claims"])
    return ("<h2>Analyses: normalised error under each</h2>\n<table>\n<tr><th>analysis</th>"
            + "".join(f"<th>{_e(layer)}</th>" for layer in layers) + f"</tr>\n{rows}</table>\n"
            + (f"<ul>{claims}</ul>\n" if claims else "") + _figures("Analysis figures", paths))


def _optimisation(out, cache_hash):
    """Decoder vs inversion by optimisation, only when it ran on this cache's eval images (as results.md)."""
    result = optimisation_results.stored(out / optimisation_results.RESULTS, cache_hash)
    if result is None:
        return ""
    rows = "".join(
        f"<tr><th scope=\"row\">{_e(layer)}</th><td>{method}</td>"
        + "".join(f"<td class=\"num\">{m[key]:{fmt}}</td>" for key, fmt in
                  (("normalized_error", ".3f"), ("mse", ".5f"), ("psnr_db", ".2f"), ("ssim", ".3f")))
        + f"<td class=\"num\">{optimisation_results.feature_distance_text(m)}</td>"
        + f"<td class=\"num\">{m['seconds_per_image']:.4g}</td>"
        + "".join(f"<td>{_e(cell)}</td>" for cell in optimisation_results.budget(result, layer, method)) + "</tr>\n"
        for layer, methods in result["layers"].items() for method, m in
        ((method, methods[method]) for method in optimisation_results.methods(result, layer)))
    found = [out / str(result[key]) for key in ("figure", "objective_figure") if result.get(key)]
    found = [figure for figure in found if figure.is_file()]
    return (f"<h2>Decoder vs inversion by optimisation</h2>\n<p>The same {len(result['images'])} eval images, "
            f"{_e(optimisation_results.iterations_text(result))} (Mahendran &amp; Vedaldi 2015).</p>\n<table>\n"
            "<tr><th>layer</th><th>method</th><th>norm. error</th><th>MSE</th><th>PSNR (dB)</th><th>SSIM</th>"
            f"<th>feature distance</th><th>seconds per image</th><th>budget</th><th>final drop</th></tr>\n{rows}</table>\n"
            + _figures("Decoder vs optimisation", found))


def _per_image(report, originals, reconstructions, labels, normaliser):
    names = {c["label"]: c["name"].split(",")[0] for c in report["classes"]}
    errors = {layer: per_image_errors(originals, r, normaliser) for layer, r in reconstructions.items()}
    thumbs = {"original": to_uint8(originals), **{layer: to_uint8(r) for layer, r in reconstructions.items()}}
    head = "<tr><th>#</th><th>class</th><th>original</th>" + "".join(
        f"<th>{_e(layer)}</th>" for layer in reconstructions) + "</tr>\n"
    rows = []
    for i, label in enumerate(np.asarray(labels).tolist()):
        name = names.get(label, str(label))
        cells = [f"<td>{i + 1}</td><td>{_e(name)}</td>",
                 f"<td>{_thumb(thumbs['original'][i], f'original {i + 1}, class {name}')}</td>"]
        cells += [f"<td>{_thumb(thumbs[layer][i], f'{layer} reconstruction of image {i + 1} ({name})')}"
                  f"error {errors[layer][i]:.3f}</td>" for layer in reconstructions]
        rows.append("<tr>" + "".join(cells) + "</tr>\n")
    return ("<h2 id=\"images\">Every image of the comparison grid</h2>\n<p>Error: normalised error of that "
            "image (its L2 distance to the original over the normaliser; 0 is perfect, about 1 no better "
            "than a random other image).</p>\n<table class=\"images\">\n" + head + "".join(rows) + "</table>")


def _thumb(hwc_uint8, alt):
    buffer = io.BytesIO()
    Image.fromarray(hwc_uint8).save(buffer, format="PNG")
    return f"<img class=\"thumb\" src=\"{_data_uri(buffer.getvalue())}\" alt=\"{_e(alt)}\">"


def _alt(path):
    words = {"loss_per_layer": "train and eval loss per layer", "loss_all_layers": "eval loss of all layers",
             "reconstructions": "comparison grid: eval images and their reconstructions from every layer",
             "reconstructions_compared": "eval images and each compared run's reconstructions, layer by layer",
             "spectrum": "radially averaged power spectra of the originals and the reconstructions"}
    stem = path.stem
    if stem.startswith("grid_"):
        return f"grid of eval images and their {stem[5:]} reconstructions"
    return words.get(stem, stem.replace("_", " "))


def _data_uri(png_bytes):
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def _e(text):
    return html.escape(str(text))
