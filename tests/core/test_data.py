import functools
import hashlib
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import GRAY_MEMBER, WNIDS, write_tiny_imagenet
from inversion.core import data, splits, synthetic
from inversion.core.errors import UserError


def test_grayscale_images_become_rgb(tiny_zip):
    ds = data.TinyImageNet(tiny_zip)
    image = ds.load_image(GRAY_MEMBER)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all()


def test_zip_and_unpacked_folder_agree(tiny_zip, tmp_path):
    with zipfile.ZipFile(tiny_zip) as z:
        z.extractall(tmp_path)
    a, b = data.TinyImageNet(tiny_zip), data.TinyImageNet(tmp_path)
    sa, sb = splits.make_split(a, 1, 3, 2), splits.make_split(b, 1, 3, 2)
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


@pytest.fixture
def served(tiny_zip):
    """The tiny zip over HTTP from this process (a port the kernel picks): torchvision's download_url, like a
    user's download, reads an HTTP response."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_zip.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_verifies_md5_and_leaves_nothing(served, tiny_zip, tmp_path):
    dest = tmp_path / "dl" / "tiny.zip"
    with pytest.raises(UserError, match="MD5"):
        data.download(dest, url=served + tiny_zip.name, md5="0" * 32)
    assert not dest.exists() and not list(dest.parent.iterdir())
    good = hashlib.md5(tiny_zip.read_bytes()).hexdigest()
    assert data.download(dest, url=served + tiny_zip.name, md5=good) == dest
    assert dest.read_bytes() == tiny_zip.read_bytes() and list(dest.parent.iterdir()) == [dest]


def test_download_failure_says_what_to_do(served, tmp_path):
    with pytest.raises(UserError, match="could not download .*absent.zip .*set data.path"):
        data.download(tmp_path / "x.zip", url=served + "absent.zip")
    assert not list(tmp_path.iterdir())


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
    sa, sb = splits.make_split(a, 1, 3, 2, 5), splits.make_split(b, 1, 3, 2, 5)
    assert sa == sb and sa.fingerprint(a) == sb.fingerprint(b)
    assert all(m.startswith("val/") for m, _ in sa.eval)
    member = sa.train[0][0]
    assert (a.load_image(member, 32) == b.load_image(member, 32)).all()


@pytest.mark.parametrize("names_file, expected", [("words.txt", "thing 3, other name"),
                                                  ("LOC_synset_mapping.txt", "thing 3, other name"),
                                                  (None, WNIDS[3])])
def test_class_names_from_a_mapping_file_else_the_folder(tmp_path, names_file, expected):
    path = synthetic.write_imagefolder(tmp_path / "f.zip", 5, 2, 0, names_file=names_file)
    assert splits.make_split(data.open_dataset(path), 0, 5, 1).names[3] == expected
