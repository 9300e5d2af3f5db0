import numpy as np

from inversion.core import figures


def test_mosaic_tiles_images():
    images = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    images[3] = 9
    m = figures.mosaic(images, pad=1)
    assert m.shape == (5, 5, 3) and (m[3:, 3:] == 9).all() and (m[2] == 255).all()


def test_comparison_grid_caption(monkeypatch, tmp_path):
    seen = []

    def capture(fig, *args):
        seen.append(fig._suptitle.get_text())
        figures.plt.close(fig)
        return []
    monkeypatch.setattr(figures, "save", capture)
    images = np.zeros((1, 4, 4, 3))
    figures.comparison_grid(images, {"conv2": images}, ["a"], tmp_path / "g", "note")
    figures.comparison_grid(images, {"conv2": images}, ["a"], tmp_path / "g", "note", caption="Decoder vs optimisation")
    assert seen == ["Reconstructions from each layer (eval images)\nnote", "Decoder vs optimisation\nnote"]
