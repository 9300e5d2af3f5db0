import zipfile
import pytest
from conftest import TRAIN_PER_CLASS, VAL_PER_CLASS, WNIDS
from inversion.core import data, splits, synthetic
from inversion.core.errors import UserError


def split(path, seed=0, classes=3, eval_per_class=2, train_per_class=None):
    return splits.make_split(data.TinyImageNet(path), seed, classes, eval_per_class, train_per_class)


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


def test_too_few_images_for_the_request(tiny_zip):
    with pytest.raises(UserError, match="eval_per_class"):
        split(tiny_zip, eval_per_class=VAL_PER_CLASS + 1)
    with pytest.raises(UserError, match="num_classes"):
        split(tiny_zip, classes=len(WNIDS) + 1)


def test_without_val_eval_images_are_held_out_of_train_and_never_trained_on(tmp_path):
    ds = data.open_dataset(synthetic.write_imagefolder(tmp_path / "noval.zip", 5, 12, 0))
    assert ds.val_images() is None
    full = splits.make_split(ds, 0, 4, 3)
    assert len(full.eval) == 4 * 3 and len(full.train) == 4 * 9
    assert not {m for m, _ in full.train} & {m for m, _ in full.eval}
    assert all(m.startswith(f"train/{full.wnids[label]}/") for m, label in full.eval)
    for label in range(4):
        assert sum(1 for _, l in full.eval if l == label) == 3
    small = splits.make_split(ds, 0, 4, 3, train_per_class=4)
    assert small.eval == full.eval  # the held-out set does not move with train_per_class
    assert {m for m, _ in small.train} <= {m for m, _ in full.train}
    assert splits.make_split(ds, 1, 4, 3).eval != full.eval
    with pytest.raises(UserError, match=r"split\.train_per_class: class n0000000\d has 9 train images after 3 "
                                        r"held out for eval, 10 requested"):
        splits.make_split(ds, 0, 4, 3, train_per_class=10)
    with pytest.raises(UserError, match=r"split\.eval_per_class: class n0000000\d has 12 train images and no val/"):
        splits.make_split(ds, 0, 4, 12)


def test_a_class_with_too_few_images_is_named_with_its_count(folder_zip, tmp_path):
    with pytest.raises(UserError, match=r"split\.eval_per_class: class n0000000\d has 3 val images, 4 requested"):
        splits.make_split(data.open_dataset(folder_zip), 0, 2, 4)
    short = synthetic.write_imagefolder(tmp_path / "short.zip", 1, 12, 3)
    with zipfile.ZipFile(short) as z, zipfile.ZipFile(tmp_path / "shorter.zip", "w") as out:
        for info in z.infolist():  # drop two of the one class's train images
            if not info.filename.endswith(("_0.jpg", "_1.JPG")) or "/val/" in info.filename:
                out.writestr(info, z.read(info))
    with pytest.raises(UserError, match=r"split\.train_per_class: class n00000001 has 10 train images, 11 requested"):
        splits.make_split(data.open_dataset(tmp_path / "shorter.zip"), 0, 1, 3, 11)


def test_an_encoder_trained_here_never_sees_an_image_the_decoders_are_evaluated_on(tiny_zip, tmp_path):
    """With val/: trained on train/ of every class, scored on val/. Without val/: exactly the images every
    decoder split (any split.num_classes, same seed and eval_per_class) holds out are held out, both ways."""
    tiny = data.TinyImageNet(tiny_zip)
    encoder_split = splits.classifier_split(tiny, 0, None, None, 2)
    assert encoder_split.wnids == sorted(tiny.wnids()) and all(m.startswith("train/") for m, _ in encoder_split.train)
    assert sorted(m for m, _ in encoder_split.eval) == sorted(m for ms in tiny.val_images().values() for m in ms)

    noval = data.open_dataset(synthetic.write_imagefolder(tmp_path / "noval.zip", 5, 12, 0))
    for seed in (0, 1):
        encoder_split = splits.classifier_split(noval, seed, None, None, 3)
        trained_on, held = {m for m, _ in encoder_split.train}, {m for m, _ in encoder_split.eval}
        assert not trained_on & held and len(trained_on | held) == 5 * 12
        decoders_eval = set()
        for num_classes in range(1, 6):
            split = splits.make_split(noval, seed, num_classes, 3)
            evaluated = {m for m, _ in split.eval}
            assert not evaluated & trained_on  # no decoder-evaluation image is trained on ...
            decoders_eval |= evaluated
        assert decoders_eval == held  # ... and nothing else is held out
    some = splits.classifier_split(noval, 0, 3, 4, 3)
    assert some.wnids == splits.choose_classes(noval, 0, 3) and len(some.train) == 3 * 4
    assert some.wnids == splits.make_split(noval, 0, 3, 3).wnids  # the same classes as the decoders' split
    with pytest.raises(UserError, match=r"encoder_training\.train_per_class: class n0000000\d has 9 training images"):
        splits.classifier_split(noval, 0, None, 10, 3)
