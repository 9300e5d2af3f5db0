"""What each layer keeps: the paper's analyses, from the feature cache and trained decoders alone.

Dosovitskiy & Brox perturb a layer's features and look at what its (normally trained) decoder
still reconstructs. Each perturbation below is a pure function of a feature batch (N, *shape)
and, where it needs them, per-unit statistics of the training split; a "unit" is one element of
a layer's feature tensor (one channel at one position for conv maps).

| name               | layers          | perturbation                                                        |
|--------------------|-----------------|---------------------------------------------------------------------|
| fc8_top5_only      | fc8             | keep each image's 5 largest scores, the rest -> the unit's mean     |
| fc8_without_top5   | fc8             | each image's 5 largest scores -> the unit's mean, keep the rest     |
| binarized          | ReLU layers     | (activation > 0) x the unit's mean positive activation              |
| dropout50          | every layer     | a seeded random half of the units (per image) -> 0, the rest x 2    |
| interpolation      | every layer     | 8 steps from one eval image's features to another's (figure only)   |
| random_features    | every layer     | per-unit Gaussian fitted to the training split, clipped at 0 for    |
|                    |                 | ReLU layers (figure only)                                           |

A layer "has ReLU outputs" when every cached training activation is >= 0: decided from the data,
so it holds for any arch's nodes (for AlexNet: conv1..fc7 are, fc8's logits are not).

The decoders were trained on unperturbed features only; an error that barely moves under a
perturbation means the decoder needed nothing the perturbation removed.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from inversion.core import figures, inference, metrics, seeds
from inversion.core.console import Timer, progress, summary
from inversion.core.images import to_hwc

TOP_K = 5
STEPS = 8               # interpolation: images from one endpoint to the other, both included
RANDOM_SAMPLES = 8      # random_features: decoded samples per layer
FIGURE_ROWS = 6         # eval images in the per-image analysis figures
SCORES_LAYER = "fc8"    # AlexNet's class scores (logits): the fc8 analyses run where it is cached

NUMBERS = ("fc8_top5_only", "fc8_without_top5", "binarized", "dropout50")   # a table row each


# ---- the perturbations: pure functions of a feature batch ----

def top_k_only(x, mean, k=TOP_K):
    """Keep each row's k largest values; every other unit becomes its training mean."""
    keep = _top_k_mask(x, k)
    return torch.where(keep, x, mean.expand_as(x))


def without_top_k(x, mean, k=TOP_K):
    """Each row's k largest values become their units' training means; the rest is kept."""
    drop = _top_k_mask(x, k)
    return torch.where(drop, mean.expand_as(x), x)


def binarized(x, positive_mean):
    """Only the pattern of non-zero activations survives: (x > 0) x the unit's mean positive value."""
    return (x > 0).to(x.dtype) * positive_mean


def dropout50(x, generator):
    """Exactly half the units of each sample (a seeded random half) set to 0, the others doubled."""
    flat = x.reshape(len(x), -1)
    if flat.shape[1] < 2:
        return x * 2  # half of one unit is none
    draw = torch.rand(flat.shape, generator=generator)
    # the half above each row's median draw (a float32 tie at the median, which would keep one unit
    # too few, has odds of about units / 2^24); kthvalue is linear, a full sort is not
    keep = draw > draw.kthvalue(max(flat.shape[1] // 2, 1), dim=1, keepdim=True).values
    return (flat * keep.to(x.device) * 2).reshape(x.shape)


def interpolation(a, b, steps=STEPS):
    """(steps, *shape): (1 - t) a + t b for t evenly from 0 to 1; the endpoints are a and b exactly."""
    t = torch.linspace(0, 1, steps, dtype=a.dtype).view(-1, *[1] * a.dim())
    return (1 - t) * a + t * b


def random_features(mean, std, n, generator, relu):
    """n samples drawn unit by unit from N(mean, std^2); clipped at 0 for ReLU layers."""
    noise = torch.randn((n, *mean.shape), generator=generator, dtype=mean.dtype)
    x = mean + std * noise
    return x.clamp_min(0) if relu else x


def _top_k_mask(x, k):
    flat = x.reshape(len(x), -1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.topk(min(k, flat.shape[1]), dim=1).indices, True)
    return mask.reshape(x.shape)


# ---- per-unit training statistics ----

@dataclass
class Stats:
    """Per-unit statistics of one layer over the training split (float32, the feature shape)."""
    mean: torch.Tensor
    std: torch.Tensor
    positive_mean: torch.Tensor   # mean of the activations > 0 (0 for a unit that never fires)
    minimum: float                # over every unit and sample

    @property
    def relu(self):
        return self.minimum >= 0


def train_stats(dataset, chunk=256):
    """Stats of an (N, *shape) array or HDF5 dataset, read `chunk` samples at a time (sums in
    float64), so memory stays at a few chunks whatever the split's size."""
    shape = dataset.shape[1:]
    total, squares, positive = (np.zeros(shape) for _ in range(3))
    fired = np.zeros(shape, dtype=np.int64)
    minimum = math.inf
    for start in range(0, len(dataset), chunk):
        x = np.asarray(dataset[start:start + chunk], dtype=np.float32)
        total += x.sum(0, dtype=np.float64)
        squares += np.square(x).sum(0, dtype=np.float64)
        positive += np.maximum(x, 0).sum(0, dtype=np.float64)
        fired += (x > 0).sum(0)
        minimum = min(minimum, float(x.min()))
    n = len(dataset)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 0))
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float32))
    return Stats(as_tensor(mean), as_tensor(std), as_tensor(positive / np.maximum(fired, 1)), minimum)


# ---- the runner ----

def run(cache, decoders, originals, unperturbed, errors, normaliser, rows, device, seed, note, provenance, out,
        batch=256):
    """Every analysis for the decoded layers. `unperturbed` and `errors` are render's reconstructions
    of the eval split and their normalised errors, `rows` the eval indices the figures show.
    Returns (table, written files), the table as {name: {layer: {"normalized_error": e}}} with
    "unperturbed" as its first name."""
    layers = list(decoders)
    table = {"unperturbed": {layer: {"normalized_error": errors[layer]} for layer in layers}}
    shown = {}  # (name, layer) -> the figure rows' reconstructions, (rows, H, W, 3)
    with Timer() as timer, progress() as bar:
        task = bar.add_task("analyses: training-split statistics", total=len(layers), rate="")
        stats = {}
        for layer in layers:
            stats[layer] = train_stats(cache["train"][layer])
            bar.advance(task)
        plan = [(name, layer) for name, wanted in _applies(stats).items() for layer in wanted]
        bar.reset(task, total=len(plan), description="analyses: perturbed eval features")
        for name, layer in plan:
            model = decoders[layer][0]
            perturb = _perturbation(name, stats[layer], seed, layer)
            recon = inference.decode(model, cache["eval"][layer], batch, device, perturb)
            error = metrics.normalized_error(originals, recon, normaliser)
            table.setdefault(name, {})[layer] = {"normalized_error": error}
            shown[name, layer] = to_hwc(recon[rows])
            bar.advance(task)
        files = _figures(cache, decoders, stats, unperturbed, shown, rows, device, seed, note, provenance, out)
    summary("analysed", len(plan), timer.seconds, "perturbed decodings",
            f"{len(originals):,} eval images each, {len(files)} figures")
    return table, files


def _applies(stats):
    """{analysis with a number: the layers it runs on}, in network order."""
    layers = list(stats)
    return {"fc8_top5_only": [l for l in layers if l == SCORES_LAYER],
            "fc8_without_top5": [l for l in layers if l == SCORES_LAYER],
            "binarized": [l for l in layers if stats[l].relu],
            "dropout50": layers}


def _perturbation(name, stats, seed, layer):
    if name == "fc8_top5_only":
        return lambda x: top_k_only(x, stats.mean.to(x.device))
    if name == "fc8_without_top5":
        return lambda x: without_top_k(x, stats.mean.to(x.device))
    if name == "binarized":
        return lambda x: binarized(x, stats.positive_mean.to(x.device))
    generator = torch.Generator().manual_seed(seeds.derive_seed(seed, layer, 0))  # one stream per layer
    return lambda x: dropout50(x, generator)


def interpolation_reconstructions(model, a, b, device, steps=STEPS):
    """Decoded interpolation from features a to b: (steps, 3, H, W)."""
    return inference.decode(model, interpolation(torch.as_tensor(a).float(), torch.as_tensor(b).float(), steps),
                            steps, device)


def _figures(cache, decoders, stats, unperturbed, shown, rows, device, seed, note, provenance, out):
    images, labels = cache["eval"]["images"], cache.load("eval", "labels")
    originals = np.stack([images[i] for i in rows])
    names = cache.attrs["class_names"]
    row_labels = [names[labels[i]].split(",")[0] for i in rows]
    layers = list(decoders)
    files = []
    for name in NUMBERS:
        done = [layer for layer in layers if (name, layer) in shown]
        if not done:
            continue
        columns = {"original": originals}
        for layer in done:
            columns[layer] = to_hwc(unperturbed[layer][rows])
            columns[f"{layer}\n{HEADINGS[name]}"] = shown[name, layer]
        files += figures.image_table(columns, row_labels, out / f"analysis_{name}", TITLES[name], note, provenance)

    a, b = int(rows[0]), int(rows[1 % len(rows)])
    steps = {layer: to_hwc(interpolation_reconstructions(model, cache["eval"][layer][a], cache["eval"][layer][b],
                                                       device)) for layer, (model, _) in decoders.items()}
    columns = {"image A": np.stack([images[a]] * len(layers))}
    for s in range(STEPS):
        columns[f"t = {s / (STEPS - 1):.2f}"] = np.stack([steps[layer][s] for layer in layers])
    columns["image B"] = np.stack([images[b]] * len(layers))
    files += figures.image_table(columns, layers, out / "analysis_interpolation", TITLES["interpolation"], note,
                                 provenance)

    samples = {}
    for layer, (model, _) in decoders.items():
        generator = torch.Generator().manual_seed(seeds.derive_seed(seed, layer, 1))
        x = random_features(stats[layer].mean, stats[layer].std, RANDOM_SAMPLES, generator, stats[layer].relu)
        samples[layer] = to_hwc(inference.decode(model, x, RANDOM_SAMPLES, device))
    columns = {f"sample {s + 1}": np.stack([samples[layer][s] for layer in layers]) for s in range(RANDOM_SAMPLES)}
    files += figures.image_table(columns, layers, out / "analysis_random_features", TITLES["random_features"], note,
                                 provenance)
    return files


HEADINGS = {"fc8_top5_only": "top-5 only", "fc8_without_top5": "without top-5", "binarized": "binarized",
            "dropout50": "dropout 50%"}
TITLES = {
    "fc8_top5_only": "fc8: only each image's top-5 scores kept (the rest at their training means)",
    "fc8_without_top5": "fc8: each image's top-5 scores replaced by their training means",
    "binarized": "Binarized: (activation > 0) x the unit's mean positive activation",
    "dropout50": "Dropout: a random half of the units set to 0, the rest doubled",
    "interpolation": "Interpolating between the features of two eval images",
    "random_features": "Decoded random features (per-unit Gaussian fitted to the training split)",
}


# ---- what the numbers say about the paper's claims ----

def claims(table, baseline_error, pretrained):
    """One sentence per claim of the paper: does this run agree? `baseline_error` is the
    normalised error of the mean-train-image baseline. A decoder no better than that baseline has
    learned nothing image-specific, so perturbing its input can show nothing: such a layer makes a
    perturbation claim inconclusive rather than agreeing."""
    base = {layer: v["normalized_error"] for layer, v in table["unperturbed"].items()}
    blind = [layer for layer, error in base.items() if error >= baseline_error]
    sentences = []
    worst = max(base, key=base.get)
    sentences.append(
        f"**Colours and rough positions survive in every layer** (agreement means every layer's normalised error "
        f"is below the mean training image's {baseline_error:.3f}; the worst layer, {worst}, has "
        f"{base[worst]:.3f}): " + ("this run does not agree." if blind else "this run agrees."))

    binary = {layer: v["normalized_error"] for layer, v in table.get("binarized", {}).items()}
    if binary:
        order = list(binary)
        higher = order[len(order) // 2:]  # the deeper half of the ReLU layers
        change = {l: binary[l] / base[l] - 1 for l in order}
        sentences.append(
            "**Higher layers keep their information in the pattern of non-zero activations** (binarizing raises "
            "the error by " + ", ".join(f"{change[l]:+.1%} in {l}" for l in order)
            + f"; agreement means at most +10% in {', '.join(higher)}): "
            + _verdict(all(change[l] <= 0.10 for l in higher), [l for l in higher if l in blind]))
    else:
        sentences.append("**Pattern of non-zero activations**: not tested (no rendered layer has ReLU outputs).")

    if "fc8_top5_only" in table:
        top5 = table["fc8_top5_only"][SCORES_LAYER]["normalized_error"]
        rest = table["fc8_without_top5"][SCORES_LAYER]["normalized_error"]
        tie = abs(top5 - rest) < 5e-4  # equal at the precision shown
        sentences.append(
            f"**fc8 keeps most information in the small scores outside the top 5** (agreement means a lower error "
            f"without the top 5 than with only them: {rest:.3f} vs {top5:.3f}; unperturbed {base[SCORES_LAYER]:.3f}): "
            + ("the two are equal to three decimals, so this run cannot tell." if tie and SCORES_LAYER not in blind
               else _verdict(rest < top5, [SCORES_LAYER] if SCORES_LAYER in blind else [])))
    else:
        sentences.append("**fc8's small scores**: not tested (fc8 not rendered).")

    if pretrained:
        sentences.append("The encoder is a trained network, but these decoders are small, briefly trained and work at "
                         "Tiny ImageNet's resolution: agreement or disagreement here is indicative, not a replication.")
    else:
        sentences.append("**The encoder is a random-init network**: whatever these numbers say is about random "
                         "features and says nothing about what ImageNet-trained features keep.")
    return sentences


def _verdict(agree, blind):
    if blind:
        return (f"inconclusive, since the decoder{'s' if len(blind) > 1 else ''} of {', '.join(blind)} "
                f"{'do' if len(blind) > 1 else 'does'} no better than the mean training image (train longer).")
    return "this run agrees." if agree else "this run does not agree."
