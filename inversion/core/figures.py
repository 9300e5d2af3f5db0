"""The figures. Each takes plain arrays and a `note` (the encoder's identity) that it prints on
itself, so a figure separated from its report still says which AlexNet it inverts; `provenance`
(config and cache hashes, library versions) goes into the file's metadata.

Figures have fixed sizes in inches at DPI, so their pixel size is known: see `*_inches`. Image
figures are laid out for 64-pixel images and grow by image_size / 64 for larger ones, so every
image is drawn at the same magnification and no reconstructed pixel is dropped.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import LogFormatter, MaxNLocator  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from inversion.core import storage  # noqa: E402

DPI = 100
CELL, LABEL, HEADER = 1.1, 1.0, 0.75  # comparison grid: inches per image, row labels, title


class _PlainLog(LogFormatter):
    """Log-axis labels as plain numbers (0.05, 1e-05), which of them labelled decided as matplotlib does."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:g}"


def plain_log(ax, axes="y"):
    """Log scale on `axes` ("x", "y" or "xy") with plain-text tick labels: matplotlib's default writes
    each label as mathtext, whose parser took 20 ms a label (8 s of the test suite's CPU time)."""
    for name in axes:
        getattr(ax, f"set_{name}scale")("log")
        axis = getattr(ax, f"{name}axis")
        axis.set_major_formatter(_PlainLog())
        axis.set_minor_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.4)))


def choose_rows(labels, n, seed):
    """n eval indices, seeded, cycling through every class (in a shuffled class order): the images a grid
    shows, the same in every figure and every run."""
    rng = np.random.default_rng([seed, 3])
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)}
    order = list(rng.permutation(list(pools)))
    chosen = []
    while len(chosen) < min(n, len(labels)):
        for c in order:
            if pools[c] and len(chosen) < n:
                chosen.append(int(pools[c].pop()))
    return np.array(chosen)


def loss_curves(histories, path, note, provenance=""):
    """One panel per layer (train and eval) and one plot of every layer's eval loss, log scale."""
    layers = list(histories)
    fig, axes = plt.subplots(1, len(layers), figsize=loss_panels_inches(len(layers)), squeeze=False,
                             sharey=True)
    for ax, layer in zip(axes[0], layers):
        epochs = [h["epoch"] for h in histories[layer]]
        ax.plot(epochs, [h["train_loss"] for h in histories[layer]], "o-", label="train")
        ax.plot(epochs, [h["eval_loss"] for h in histories[layer]], "s--", label="eval")
        ax.set(title=layer, xlabel="epoch")
        plain_log(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("pixel MSE")
    axes[0][0].legend()
    fig.suptitle(f"Decoder loss per layer\n{note}", fontsize=9)
    fig.subplots_adjust(top=0.78, bottom=0.16, left=0.08, right=0.98)
    written = save(fig, path / "loss_per_layer", ("png", "pdf"), note, provenance)

    fig, ax = plt.subplots(figsize=LOSS_ALL_INCHES)
    for layer in layers:
        ax.plot([h["epoch"] for h in histories[layer]], [h["eval_loss"] for h in histories[layer]],
                "o-", label=f"{layer} eval")
        ax.plot([h["epoch"] for h in histories[layer]], [h["train_loss"] for h in histories[layer]],
                ":", color=ax.lines[-1].get_color(), label=f"{layer} train")
    ax.set(xlabel="epoch", ylabel="pixel MSE", title=f"All layers\n{note}")
    plain_log(ax)
    ax.title.set_fontsize(9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.subplots_adjust(top=0.86, bottom=0.12, left=0.15, right=0.97)
    return written + save(fig, path / "loss_all_layers", ("png", "pdf"), note, provenance)


def objective_curves(curves, path, title, note, provenance=""):
    """An optimisation's objective per iteration, one line per entry of `curves` ({label: {objective,
    feature_term}}), its feature term dotted in the same colour; log scale, so a tail that still falls
    shows as a slope, not as a flat line near zero."""
    fig, ax = plt.subplots(figsize=OBJECTIVE_INCHES)
    for label, curve in curves.items():
        steps = np.arange(1, len(curve["objective"]) + 1)
        ax.plot(steps, curve["objective"], "-", label=label)
        if curve.get("feature_term"):
            ax.plot(steps, curve["feature_term"], ":", color=ax.lines[-1].get_color())
    ax.set(xlabel="iteration", ylabel="mean over images: objective\n(solid), its feature term (dotted)")
    plain_log(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{title}\n{note}", fontsize=8)
    fig.subplots_adjust(top=0.86, bottom=0.12, left=0.17, right=0.97)  # room for log ticks and two label lines
    return save(fig, path, ("png",), note, provenance)


def comparison_grid(originals, reconstructions, row_labels, path, note, provenance="",
                    caption="Reconstructions from each layer (eval images)"):
    """The paper-style grid: a row per image, columns original | one per layer."""
    columns = {"original": originals, **reconstructions}
    rows, size = len(originals), originals.shape[1]
    fig, axes = plt.subplots(rows, len(columns), figsize=comparison_inches(rows, len(columns), size), squeeze=False)
    _fill_grid(axes, columns, row_labels, heading_size=9)
    width, height = comparison_inches(rows, len(columns), size)
    fig.suptitle(f"{caption}\n{note}", fontsize=8, y=1 - 0.08 / height,
                 va="top")
    fig.subplots_adjust(left=LABEL / width, right=1 - 0.1 / width, top=1 - HEADER / height,
                        bottom=0.1 / height, wspace=0.05, hspace=0.05)
    return save(fig, path, ("png",), note, provenance)


def _fill_grid(axes, columns, row_labels, heading_size):
    """Image r of column c into axes[r][c]: a heading over each column, a label left of each row."""
    for c, (heading, images) in enumerate(columns.items()):
        axes[0][c].set_title(heading, fontsize=heading_size)
        for r in range(len(row_labels)):
            ax = axes[r][c]
            ax.imshow(images[r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")


def layer_grid(originals, reconstruction, layer, path, note, provenance=""):
    """n x n originals beside the same n x n reconstructed from one layer."""
    fig, axes = plt.subplots(1, 2, figsize=layer_grid_inches(originals.shape[1]))
    for ax, images, title in ((axes[0], originals, "original"), (axes[1], reconstruction, f"from {layer}")):
        ax.imshow(mosaic(images), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{layer}: {len(originals)} eval images\n{note}", fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.86, bottom=0.02, wspace=0.04)
    return save(fig, path, ("png",), note, provenance)


def image_table(columns, row_labels, path, title, note, provenance=""):
    """A grid of images: one titled column per entry of `columns` ({title: (rows, H, W, 3)}), a
    label per row. Never narrower than TABLE_MIN_WIDTH, so the title and note stay readable."""
    rows = len(row_labels)
    width, height = image_table_inches(rows, columns)
    fig, axes = plt.subplots(rows, len(columns), figsize=(width, height), squeeze=False)
    _fill_grid(axes, columns, row_labels, heading_size=8)
    grid_width = LABEL + CELL * len(columns) + 0.1
    side = (width - grid_width) / 2  # centres the grid in a widened figure
    fig.suptitle(f"{title}\n{note}", fontsize=8, y=1 - 0.08 / height, va="top")
    fig.subplots_adjust(left=(side + LABEL) / width, right=1 - (side + 0.1) / width,
                        top=1 - (height - CELL * rows - 0.2) / height, bottom=0.1 / height, wspace=0.05, hspace=0.05)
    return save(fig, path, ("png",), note, provenance)


TABLE_MIN_WIDTH = 6.5


def image_table_inches(rows, columns):
    """Two title lines, then the column headings (as many lines as the longest has)."""
    heading_lines = max(str(title).count("\n") + 1 for title in columns)
    return (max(LABEL + CELL * len(columns) + 0.1, TABLE_MIN_WIDTH),
            HEADER + 0.14 * (heading_lines - 1) + CELL * rows + 0.1)


def mosaic_panels(panels, path, title, note, provenance=""):
    """Side by side, one titled mosaic per entry of `panels` ({title: (N, H, W, 3)}): the same N
    images through different layers. Tiles are shown at least at their own pixel size."""
    mosaics = {heading: mosaic(images) for heading, images in panels.items()}
    width, height = mosaic_panels_inches(next(iter(mosaics.values())).shape, len(mosaics))
    fig, axes = plt.subplots(1, len(mosaics), figsize=(width, height), squeeze=False)
    for ax, (heading, image) in zip(axes[0], mosaics.items()):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(heading, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}\n{note}", fontsize=9, y=1 - 0.08 / height, va="top")
    fig.subplots_adjust(left=0.1 / width, right=1 - 0.1 / width, top=1 - HEADER / height, bottom=0.1 / height,
                        wspace=0.1 * len(mosaics) / width)
    return save(fig, path, ("png",), note, provenance)


def mosaic_panels_inches(mosaic_shape, panels):
    (h, w), panel = mosaic_shape[:2], max(2.4, mosaic_shape[1] / DPI)  # panel width, inches
    return (max(panels * (panel + 0.1) + 0.1, TABLE_MIN_WIDTH), HEADER + panel * h / w + 0.1)


def mosaic(images, pad=2):
    """(N, H, W, 3) -> one image of ceil(sqrt(N)) columns, tiles separated by white lines: torchvision's
    make_grid, without the border it also draws around the whole."""
    if len(images) == 1:
        return images[0]
    white = 255 if images.dtype == np.uint8 else 1
    grid = make_grid(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2),
                     nrow=int(np.ceil(np.sqrt(len(images)))), padding=pad, pad_value=white)
    return grid[:, pad:grid.shape[1] - pad, pad:grid.shape[2] - pad].permute(1, 2, 0).numpy()


def loss_panels_inches(n):
    return (3.2 * n + 0.6, 3.4)


LOSS_ALL_INCHES = (6.4, 4.8)
OBJECTIVE_INCHES = (7.2, 4.8)
LAYER_GRID_INCHES = (10.0, 5.6)  # for 64-pixel images


def layer_grid_inches(image_size=64):
    scale = max(1.0, image_size / 64)
    return (LAYER_GRID_INCHES[0] * scale, LAYER_GRID_INCHES[1] * scale)


def comparison_inches(rows, cols, image_size=64):
    cell = CELL * max(1.0, image_size / 64)
    return (LABEL + cell * cols + 0.1, HEADER + cell * rows + 0.1)


def save(fig, path, formats, note, provenance):
    path = Path(path)
    written = []
    try:
        for fmt in formats:
            target = path.with_name(f"{path.name}.{fmt}")  # not with_suffix: layer names may hold dots
            meta = {"Title": note, ("Description" if fmt == "png" else "Subject"): provenance}
            with storage.replacing(target) as tmp:
                fig.savefig(tmp, dpi=DPI, format=fmt, metadata=meta)
            written.append(target)
    finally:
        plt.close(fig)
    return written
