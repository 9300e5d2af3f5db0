import zipfile

import numpy as np
import pytest

from conftest import GRAY_MEMBER, TRAIN_PER_CLASS, VAL_PER_CLASS, WNIDS, write_tiny_imagenet
from inversion import data
from inversion.errors import UserError


def split(path, seed=0, classes=3, eval_per_class=2, train_per_class=None):
    return data.make_split(data.TinyImageNet(path), seed, classes, eval_per_class, train_per_class)


def test_class_choice_is_deterministic_per_seed_and_differs_across_seeds(tiny_zip):
    assert split(tiny_zip, seed=0).wnids == split(tiny_zip, seed=0).wnids
    choices = {tuple(split(tiny_zip, seed=s).wnids) for s in range(6)}
    assert len(choices) > 1


def test_class_choice_does_not_depend_on_subset_sizes(tiny_zip):
    assert split(tiny_zip, train_per_class=2).wnids == split(tiny_zip, train_per_class=None).wnids


def test_split_sizes_balance_and_disjointness(tiny_zip):
    s = split(tiny_zip, classes=4, eval_per_class=2, train_per_class=5)
    assert len(s.train) == 4 * 5 and len(s.eval) == 4 * 2
    for label in range(4):
        assert sum(1 for _, l in s.train if l == label) == 5
        assert sum(1 for _, l in s.eval if l == label) == 2
    assert not {m for m, _ in s.train} & {m for m, _ in s.eval}
    assert all(m.startswith("val/") for m, _ in s.eval)
    assert all(m.startswith(f"train/{s.wnids[l]}/") for m, l in s.train)
    assert s.names[0].startswith("thing ")


def test_full_class_when_train_per_class_is_null(tiny_zip):
    s = split(tiny_zip, classes=2, eval_per_class=VAL_PER_CLASS)
    assert len(s.train) == 2 * TRAIN_PER_CLASS and len(s.eval) == 2 * VAL_PER_CLASS


def test_grayscale_images_become_rgb(tiny_zip):
    ds = data.TinyImageNet(tiny_zip)
    image = ds.load_image(GRAY_MEMBER)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all()


def test_zip_and_unpacked_folder_agree(tiny_zip, tmp_path):
    with zipfile.ZipFile(tiny_zip) as z:
        z.extractall(tmp_path)
    a, b = data.TinyImageNet(tiny_zip), data.TinyImageNet(tmp_path)
    sa, sb = data.make_split(a, 1, 3, 2), data.make_split(b, 1, 3, 2)
    assert sa == sb and sa.fingerprint(a) == sb.fingerprint(b)
    member = sa.train[0][0]
    assert (a.load_image(member) == b.load_image(member)).all()


def test_corrupt_jpeg_names_the_member(tmp_path):
    member = f"train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG"
    bad = write_tiny_imagenet(tmp_path / "bad.zip", corrupt=member)
    with pytest.raises(UserError, match=member):
        data.TinyImageNet(bad).load_image(member)


def test_zip_without_wnids_is_a_clear_error(tmp_path):
    path = write_tiny_imagenet(tmp_path / "nowinds.zip", with_wnids=False)
    with pytest.raises(UserError, match="no wnids.txt"):
        data.TinyImageNet(path)


def test_missing_path_and_non_zip(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        data.locate(str(tmp_path / "missing.zip"))
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="junk.zip"):
        data.TinyImageNet(junk)


def test_too_few_images_for_the_request(tiny_zip):
    with pytest.raises(UserError, match="eval_per_class"):
        split(tiny_zip, eval_per_class=VAL_PER_CLASS + 1)
    with pytest.raises(UserError, match="num_classes"):
        split(tiny_zip, classes=len(WNIDS) + 1)


def test_download_verifies_md5_and_leaves_nothing(tiny_zip, tmp_path):
    dest = tmp_path / "dl" / "tiny.zip"
    with pytest.raises(UserError, match="MD5"):
        data.download(dest, url=tiny_zip.as_uri(), md5="0" * 32)
    assert not dest.exists() and not list(dest.parent.iterdir())
    import hashlib
    good = hashlib.md5(tiny_zip.read_bytes()).hexdigest()
    assert data.download(dest, url=tiny_zip.as_uri(), md5=good) == dest and dest.read_bytes() == tiny_zip.read_bytes()


def test_download_failure_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="set data.path"):
        data.download(tmp_path / "x.zip", url=(tmp_path / "absent.zip").as_uri())
