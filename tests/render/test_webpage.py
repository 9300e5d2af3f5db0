import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inversion.render import report, webpage


class Page(HTMLParser):
    """The parts of report.html the tests look at: images, result-table row headers, per-image rows, tags."""

    def __init__(self, text):
        super().__init__()
        self.images, self.result_rows, self.image_rows, self.tags, self._table, self._in_th = [], [], 0, set(), None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self._table = attrs.get("class")
        elif tag == "tr" and self._table == "images":
            self.image_rows += 1
        self._in_th = tag == "th" and attrs.get("scope") == "row" and self._table == "results"

    def handle_data(self, data):
        if self._in_th:
            self.result_rows.append(data)
            self._in_th = False


def open_image(src, folder):
    """Every image the page shows must decode: embedded data or a file relative to the page."""
    if src.startswith("data:image/png;base64,"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert "://" not in src and not src.startswith("/"), src  # nothing from the network or outside the folder
    return Image.open(folder / src)


def test_render_writes_one_self_contained_page_with_every_layer_and_image(trained, tmp_path):
    result = report.render(trained)
    out = Path(trained["output.dir"])
    path = out / webpage.NAME
    assert path in result["files"]
    text = path.read_text()
    page = Page(text)
    metrics = json.loads((out / "metrics.json").read_text())

    assert set(metrics["layers"]) <= set(page.result_rows)
    assert len(page.result_rows) == len(metrics["layers"]) + len(metrics["baselines"])
    assert "random init, not ImageNet-pretrained" in text and 'class="encoder random"' in text
    assert metrics["config_hash"] in text and metrics["cache_hash"] in text
    assert "script" not in page.tags and "http" not in text.replace("http-equiv", "")
    for image in page.images:
        assert image.get("alt"), image
        with open_image(image["src"], out) as im:
            im.load()
            assert im.size[0] > 0
    png_figures = [f for f in metrics["figures"] if f.endswith(".png")]
    per_image = trained["render.num_images"] * (1 + len(metrics["layers"]))
    assert len(page.images) == len(png_figures) + per_image
    assert page.image_rows == trained["render.num_images"] + 1  # a header row and one per grid image
    assert all(c["name"].split(",")[0] in text for c in metrics["classes"])  # the grid covers every class


def test_per_image_error_is_the_distance_over_the_normaliser():
    originals = torch.zeros(2, 3, 4, 4)
    recon = torch.zeros(2, 3, 4, 4)
    recon[1] = 0.5  # ||.||_2 = 0.5 * sqrt(48)
    assert np.allclose(webpage.per_image_errors(originals, recon, 2.0), [0, 0.25 * 48 ** 0.5])


def test_the_optimisation_baseline_appears_only_for_this_cache(tmp_path):
    figure = tmp_path / "optimisation_vs_decoder.png"
    Image.new("RGB", (8, 8)).save(figure)
    scores = {"normalized_error": 0.5, "mse": 0.01, "psnr_db": 20.0, "ssim": 0.3, "seconds_per_image": 0.2}
    optimisation = {"cache_hash": "abc", "split": "eval", "images": [0, 1], "settings": {"iterations": 7},
                    "figure": figure.name, "layers": {"conv5": {"decoder": scores, "optimisation": scores}}}
    (tmp_path / "optimisation.json").write_text(json.dumps(optimisation))
    metrics = {"config_hash": "c", "cache": "cache.h5", "cache_hash": "abc", "eval_images": 2,
               "encoder": {"kind": "imagenet"}, "encoder_description": "AlexNet ImageNet-pretrained",
               "normaliser_mean_pair_distance": 1.0, "layers": {"conv5": {"mse": 0.1, "epochs": 1}},
               "baselines": {}, "top1_agreement": {"conv5": 0.5}, "analyses": "skipped: off",
               "analysis_claims": [], "versions": {"torch": "x"}, "figures": [],
               "classes": [{"label": 0, "wnid": "n0", "name": "cat"}]}
    images = torch.rand(1, 3, 8, 8)
    tables = {"results": (["MSE"], [("conv5", ["0.10000"])]), "compared": None}
    text = webpage.write(tmp_path, metrics, tables, images, {"conv5": images}, np.array([0]), 1.0).read_text()
    assert "Decoder vs inversion by optimisation" in text and "7 iterations" in text
    assert 'class="encoder random"' not in text and "error 0.000" in text
    metrics["cache_hash"] = "another cache"
    text = webpage.write(tmp_path, metrics, tables, images, {"conv5": images}, np.array([0]), 1.0).read_text()
    assert "Decoder vs inversion by optimisation" not in text
