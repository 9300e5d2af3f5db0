import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image, features
from typer.testing import CliRunner

from conftest import make_cfg, pixel_size
from inversion.core import data, encoder, feature_cache, figures
from inversion.core.errors import UserError
from inversion.extract import extraction
from inversion.render import own_images


def _pictures(folder):
    """Five readable pictures of different formats and one corrupt file; returns the readable stems."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    photo = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    photo(80, 80).save(folder / "photo.jpg")
    rgba = photo(70, 50).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    photo(64, 64).convert("L").save(folder / "gray.jpeg")
    photo(90, 90).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "sub").mkdir()
    photo(40, 120).save(folder / "sub" / ("wide.webp" if features.check("webp") else "wide.png"))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (folder / "notes.txt").write_text("not an image: ignored in a folder")
    return {"photo", "alpha", "gray", "cmyk", "wide"}


def test_to_square_rgb_crops_the_centre_of_the_shorter_side():
    pixels = np.zeros((50, 150, 3), np.uint8)
    pixels[:, :50, 0] = pixels[:, 50:100, 1] = pixels[:, 100:, 2] = 255  # red | green | blue thirds
    out = data.to_square_rgb(Image.fromarray(pixels), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[:, :, 1] > 200).all() and (out[:, :, [0, 2]] < 60).all()  # only the green centre is left
    same = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(data.to_square_rgb(Image.fromarray(same), 16), same)  # right size: untouched


def test_to_square_rgb_converts_every_mode():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((4, 4), (255, 0, 0, 255))
    out = data.to_square_rgb(rgba, 8)
    assert (out[0, 0] == 255).all() and out[4, 4].tolist() == [255, 0, 0]  # transparent -> white
    gray = data.to_square_rgb(Image.new("L", (8, 8), 90), 8)
    assert gray.shape == (8, 8, 3) and (gray == 90).all()
    assert data.to_square_rgb(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), 4)[0, 0].tolist() == [255, 0, 0]
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 0)
    out = data.to_square_rgb(palette, 8)
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [10, 200, 30]


def test_reconstruct_any_picture_and_report_the_unreadable(trained, tmp_path):
    import reconstruct

    stems = _pictures(tmp_path / "pics")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(trained))  # dotted keys read as they are
    result = CliRunner().invoke(reconstruct.app, [str(tmp_path / "pics"), "--config", str(config_file),
                                                  "--layers", "conv5,fc8"])
    assert result.exit_code == 2, result.output
    assert "broken.jpg: cannot read" in result.output and "notes.txt" not in result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("error: 1 of 6 inputs could not be read") and "broken.jpg" in last
    assert "reconstructed: 5 images" in result.output
    out = tmp_path.parent / trained["output.dir"] / "reconstruct"
    assert {p.stem for p in out.glob("*.png")} == stems | {"contact_sheet"}
    columns = {"original": 0, "conv5": 0, "fc8": 0}
    for stem in stems:
        with Image.open(out / f"{stem}.png") as im:
            assert im.size == pixel_size(figures.image_table_inches(1, columns))
            assert "random init" in im.info["Title"] and "source" in im.info["Description"]
            assert np.asarray(im.convert("L")).std() > 5
    with Image.open(out / "contact_sheet.png") as im:
        assert im.size[0] > im.size[1] and "random init" in im.info["Title"]


def test_reconstruct_names_stay_unique(tmp_path):
    a, b, c = tmp_path / "x.jpg", tmp_path / "x.png", tmp_path / "contact_sheet.png"
    assert list(own_images._output_names([a, b, c]).values()) == ["x", "x-2", "contact_sheet-2"]
    files, missing = own_images.collect([tmp_path / "nowhere.png"])
    assert files == [] and missing == [tmp_path / "nowhere.png"]


def test_reconstruct_refuses_an_encoder_other_than_the_caches(tiny_zip, tmp_path):
    # A small classifier (5 MB of weights, AlexNet's are 244 MB): the check does not depend on the arch.
    weights = tmp_path / "squeezenet.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), weights)
    cfg = make_cfg(tmp_path, tiny_zip, f"encoder.weights={weights}", "encoder.arch=squeezenet1_1", "layers=[flatten]",
                   "split.num_classes=2", "split.train_per_class=1", "split.eval_per_class=1")
    extraction.extract(cfg)
    with feature_cache.open_for(cfg) as cache:
        identity, path = cache.attrs["encoder"], cache.path
    assert encoder.reload_exactly(identity, path, "") is not None  # unchanged: accepted
    torch.manual_seed(2)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), weights)  # same name, other weights
    (tmp_path / "pic.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"squeezenet\.pth has changed since .* re-run extract_features\.py"):
        own_images.reconstruct(cfg, [tmp_path / "pic.png"])
    weights.unlink()
    with pytest.raises(UserError, match=r"squeezenet\.pth is gone"):
        own_images.reconstruct(cfg, [tmp_path / "pic.png"])
