"""The generated datasets the suite and the benchmarks run on hold what their docstrings promise."""

import io
import zipfile

import pytest
from PIL import Image

from inversion.core import synthetic


def test_the_zip_has_tiny_imagenets_layout_with_the_asked_for_oddities(tmp_path):
    gray, corrupt = "train/n00000001/images/n00000001_0.JPEG", "train/n00000002/images/n00000002_1.JPEG"
    path = synthetic.write_zip(tmp_path / "t.zip", classes=3, train_per_class=4, val_per_class=2,
                               gray=[gray], corrupt=[corrupt])
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        root = synthetic.ROOT
        assert z.read(root + "wnids.txt").decode().split() == synthetic.wnids_for(3)
        assert sum(n.startswith(root + "train/") and n.endswith(".JPEG") for n in names) == 3 * 4
        annotations = z.read(root + "val/val_annotations.txt").decode().splitlines()
        assert len(annotations) == 3 * 2 and all(f"{root}val/images/{a.split()[0]}" in names for a in annotations)
        assert Image.open(io.BytesIO(z.read(root + gray))).mode == "L"
        with pytest.raises(OSError):  # looks like a JPEG (its first bytes), is none
            Image.open(io.BytesIO(z.read(root + corrupt))).load()
    assert "wnids.txt" not in str(zipfile.ZipFile(synthetic.write_zip(tmp_path / "n.zip", with_wnids=False)).namelist())


def test_the_image_folder_is_the_same_as_a_zip_and_as_a_folder_with_every_kind(tmp_path):
    (tmp_path / "f").mkdir()
    synthetic.write_imagefolder(tmp_path / "f", classes=2, train_per_class=8, val_per_class=1)
    with zipfile.ZipFile(synthetic.write_imagefolder(tmp_path / "f.zip", classes=2, train_per_class=8,
                                                     val_per_class=1)) as z:
        zipped = {n: z.read(n) for n in z.namelist()}
    on_disk = {str(p.relative_to(tmp_path / "f")): p.read_bytes() for p in (tmp_path / "f").rglob("*") if p.is_file()}
    assert zipped == on_disk
    images = [n for n in zipped if "/train/" in n and not n.split("/")[-1].startswith("._") and "notes" not in n]
    assert {Image.open(io.BytesIO(zipped[n])).mode for n in images} == {mode for _, mode, _ in synthetic.KINDS}
