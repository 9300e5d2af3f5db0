import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import GRAY_MEMBER, TRAIN_PER_CLASS, VAL_PER_CLASS, WNIDS, write_tiny_imagenet
from inversion.core import data, synthetic
from inversion.core.errors import UserError


def split(path, seed=0, classes=3, eval_per_class=2, train_per_class=None):
    return data.make_split(data.TinyImageNet(path), seed, classes, eval_per_class, train_per_class)


@pytest.fixture(scope="module")
def folder_zip(tmp_path_factory):
    """5 classes x 12 train + 3 val images of mixed sizes, types and modes, in a zip."""
    return synthetic.write_imagefolder(tmp_path_factory.mktemp("folders") / "folders.zip", 5, 12, 3)


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


# --- image folders: any layout detail a user's own data may have ---------------------------------


def test_auto_detects_each_layout_and_says_which(tiny_zip, folder_zip, tmp_path):
    tiny, folders = data.open_dataset(tiny_zip), data.open_dataset(folder_zip)
    assert isinstance(tiny, data.TinyImageNet) and "tiny-imagenet layout, detected" in tiny.describe()
    assert isinstance(folders, data.ImageFolder) and "imagefolder layout, detected" in folders.describe()
    assert not data.open_dataset(folder_zip, "imagefolder").detected
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"no wnids\.txt.*no train/<class>/<image>"):
        data.open_dataset(tmp_path)
    with pytest.raises(UserError, match="no train/<class>/<image>"):
        data.open_dataset(tiny_zip, "imagefolder")
    with pytest.raises(UserError, match="data.path: set it"):
        data.locate(None, "imagefolder")


def test_image_folder_lists_images_of_every_extension_and_skips_the_rest(folder_zip):
    ds = data.ImageFolder(folder_zip)
    assert ds.root == "data/" and ds.wnids() == WNIDS
    members = ds.train_images(WNIDS[0])
    assert len(members) == 12 and len(ds.val_images()[WNIDS[0]]) == 3
    assert {m.rsplit(".", 1)[1] for m in members} == {k[0] for k in synthetic.KINDS}  # JPG and PNG included
    assert not [m for m in members if m.endswith(".txt") or "/._" in m]
    assert ds.words()[WNIDS[1]] == "thing 1, other name"


@pytest.mark.parametrize("size", [16, 64, 128])
def test_every_size_and_mode_becomes_an_rgb_square(folder_zip, size):
    ds = data.ImageFolder(folder_zip)
    for i, member in enumerate(ds.train_images(WNIDS[2])[:8]):
        image = ds.load_image(member, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8 and image.std() > 0, member
    gray = ds.load_image(f"train/{WNIDS[2]}/train_{WNIDS[2]}_2.png", size)  # mode L
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA", "P", "LA"])
@pytest.mark.parametrize("wh", [(97, 61), (50, 130), (64, 64), (33, 40)])
def test_resize_and_crop_equal_torchvision_resize_then_center_crop(mode, wh):
    """The documented rule is torchvision's Resize(size) + CenterCrop(size) on the RGB image."""
    from torchvision import transforms

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    im = rgb.convert(mode)
    reference = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64)])(im.convert("RGB"))
    np.testing.assert_array_equal(data.to_square_rgb(im, 64), np.asarray(reference))


def test_an_image_already_at_size_is_not_resampled(tiny_zip):
    """The Tiny ImageNet path is unchanged: the stored image is the decoded JPEG itself."""
    ds = data.TinyImageNet(tiny_zip)
    member = ds.train_images(WNIDS[1])[0]
    with Image.open(io.BytesIO(ds.read(member))) as im:
        np.testing.assert_array_equal(ds.load_image(member), np.asarray(im.convert("RGB")))


def test_zip_and_folder_image_folders_agree(folder_zip, tmp_path):
    with zipfile.ZipFile(folder_zip) as z:
        z.extractall(tmp_path)
    a, b = data.open_dataset(folder_zip), data.open_dataset(tmp_path)
    sa, sb = data.make_split(a, 1, 3, 2, 5), data.make_split(b, 1, 3, 2, 5)
    assert sa == sb and sa.fingerprint(a) == sb.fingerprint(b)
    assert all(m.startswith("val/") for m, _ in sa.eval)
    member = sa.train[0][0]
    assert (a.load_image(member, 32) == b.load_image(member, 32)).all()


@pytest.mark.parametrize("names_file, expected", [("words.txt", "thing 3, other name"),
                                                  ("LOC_synset_mapping.txt", "thing 3, other name"),
                                                  (None, WNIDS[3])])
def test_class_names_from_a_mapping_file_else_the_folder(tmp_path, names_file, expected):
    path = synthetic.write_imagefolder(tmp_path / "f.zip", 5, 2, 0, names_file=names_file)
    assert data.make_split(data.open_dataset(path), 0, 5, 1).names[3] == expected


def test_without_val_eval_images_are_held_out_of_train_and_never_trained_on(tmp_path):
    ds = data.open_dataset(synthetic.write_imagefolder(tmp_path / "noval.zip", 5, 12, 0))
    assert ds.val_images() is None
    full = data.make_split(ds, 0, 4, 3)
    assert len(full.eval) == 4 * 3 and len(full.train) == 4 * 9
    assert not {m for m, _ in full.train} & {m for m, _ in full.eval}
    assert all(m.startswith(f"train/{full.wnids[label]}/") for m, label in full.eval)
    for label in range(4):
        assert sum(1 for _, l in full.eval if l == label) == 3
    small = data.make_split(ds, 0, 4, 3, train_per_class=4)
    assert small.eval == full.eval  # the held-out set does not move with train_per_class
    assert {m for m, _ in small.train} <= {m for m, _ in full.train}
    assert data.make_split(ds, 1, 4, 3).eval != full.eval
    with pytest.raises(UserError, match=r"split\.train_per_class: class n0000000\d has 9 train images after 3 "
                                        r"held out for eval, 10 requested"):
        data.make_split(ds, 0, 4, 3, train_per_class=10)
    with pytest.raises(UserError, match=r"split\.eval_per_class: class n0000000\d has 12 train images and no val/"):
        data.make_split(ds, 0, 4, 12)


def test_a_class_with_too_few_images_is_named_with_its_count(folder_zip, tmp_path):
    with pytest.raises(UserError, match=r"split\.eval_per_class: class n0000000\d has 3 val images, 4 requested"):
        data.make_split(data.open_dataset(folder_zip), 0, 2, 4)
    short = synthetic.write_imagefolder(tmp_path / "short.zip", 1, 12, 3)
    with zipfile.ZipFile(short) as z, zipfile.ZipFile(tmp_path / "shorter.zip", "w") as out:
        for info in z.infolist():  # drop two of the one class's train images
            if not info.filename.endswith(("_0.jpg", "_1.JPG")) or "/val/" in info.filename:
                out.writestr(info, z.read(info))
    with pytest.raises(UserError, match=r"split\.train_per_class: class n00000001 has 10 train images, 11 requested"):
        data.make_split(data.open_dataset(tmp_path / "shorter.zip"), 0, 1, 3, 11)
