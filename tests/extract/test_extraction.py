import ctypes
import errno
import io
import os
import re
import shutil
import signal
import time
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import typer
from PIL import Image

from conftest import WNIDS, Forked, assert_same_cache, make_cfg, write_tiny_imagenet
from inversion.core import console, data, encoder, encoder_graph, feature_cache, splits, storage
from inversion.core.errors import UserError
from inversion.extract import cache_writer, extraction

Usage = namedtuple("Usage", "total used free")


CLONE_NEWNS, CLONE_NEWUSER, MS_REC, MS_PRIVATE = 0x20000, 0x10000000, 0x4000, 0x40000


def _mount_private_tmpfs(folder, size):
    """What `unshare -rm` then `mount -t tmpfs` do, in this (single-threaded, forked) process: a user and
    mount namespace of its own, in which it is root and mounts a tmpfs that no other process sees."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS):
        raise OSError(ctypes.get_errno(), "unshare")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    for args in ((b"none", b"/", None, MS_REC | MS_PRIVATE, None),
                 (b"tmpfs", str(folder).encode(), b"tmpfs", 0, f"size={size}".encode())):
        if libc.mount(*args):
            raise OSError(ctypes.get_errno(), f"mount {args[1]}")


def _can_mount_tmpfs():
    return Forked(_mount_private_tmpfs, "/mnt", "1m").wait() == 0


def test_cache_holds_split_and_features_equal_a_direct_forward(built, tiny_zip):
    cfg, path = built
    ds = data.TinyImageNet(tiny_zip)
    split = splits.make_split(ds, cfg["seed"], 3, 2, 6)
    model, identity = encoder.load("alexnet", "random", cfg["seed"])
    taps = encoder_graph.extractor(model, "alexnet", cfg["layers"])
    with feature_cache.open_for(cfg, cfg["layers"]) as cache:
        assert cache.attrs["class_wnids"] == split.wnids and cache.attrs["encoder"] == identity
        assert cache.attrs["config_hash"] in path.name and cache.attrs["complete"]
        assert set(cache.attrs["versions"]) >= {"torch", "torchvision", "h5py", "numpy"}
        for name, items in (("train", split.train), ("eval", split.eval)):
            images = np.stack([ds.load_image(m) for m, _ in items])
            assert (cache.load(name, "images") == images).all()
            assert list(cache.load(name, "labels")) == [label for _, label in items]
            assert [p.decode() for p in cache.load(name, "paths")] == [ds.root + m for m, _ in items]
            direct = encoder.encode(taps, images, 224, "alexnet", torch.device("cpu"))
            for layer in cfg["layers"]:
                np.testing.assert_allclose(cache.load(name, layer), direct[layer], rtol=1e-5, atol=1e-5)


def test_rerun_is_a_cache_hit_and_a_changed_config_a_new_cache(built, capsys):
    cfg, path = built
    mtime = path.stat().st_mtime_ns
    assert extraction.extract(cfg) == path
    assert path.stat().st_mtime_ns == mtime and "cache hit" in capsys.readouterr().err
    other = feature_cache.path_for(dict(cfg, seed=1))
    assert other != path
    assert feature_cache.path_for(dict(cfg, **{"train.lr": 1.0, "output.dir": "x"})) == path


def test_float16_cache_is_the_float32_one_rounded(built, tmp_path):
    cfg, path = built
    half = extraction.extract(dict(cfg, **{"cache.dtype": "float16", "cache.dir": str(tmp_path)}))
    with h5py.File(half) as f16, h5py.File(path) as f32:
        assert f16["train/fc6"].dtype == np.float16
        np.testing.assert_array_equal(f16["train/fc6"][()], f32["train/fc6"][()].astype(np.float16))


def test_cache_content_does_not_depend_on_decode_workers(built, tmp_path):
    """Two and three processes (batches of 5 over 18 + 6 images: uneven shares) must write the
    very same bytes as the built cache's one thread (`auto` on the CPU)."""
    cfg, path = built
    for workers in (2, 3):
        other = extraction.extract(dict(cfg, **{"extract.workers": workers, "cache.dir": str(tmp_path / str(workers))}))
        with h5py.File(other) as a, h5py.File(path) as b:
            for name in feature_cache.SPLITS:
                for key in b[name]:
                    np.testing.assert_array_equal(a[name][key][()], b[name][key][()], err_msg=f"{name}/{key}")


def test_kill_9_during_extraction_leaves_no_complete_cache(tiny_zip, tmp_path):
    cfg = make_cfg(tmp_path, tiny_zip, "extract.batch_size=1", "split.train_per_class=8")
    target = feature_cache.path_for(cfg)
    partial = target.with_name(target.name + ".partial")

    wrote = tmp_path / "wrote"

    def stopped_after_a_batch():  # until the kill: sleeping 0.2 s a batch, it could finish first under load
        write = cache_writer.Writer.write
        cache_writer.Writer.write = lambda *a: (write(*a), wrote.touch(), time.sleep(600))
        extraction.extract(cfg)
    child = Forked(stopped_after_a_batch)
    child.wait_for(wrote)
    child.kill()
    assert child.returncode == -signal.SIGKILL and not target.exists() and partial.exists()
    assert feature_cache.read_attrs(partial) is None


def test_sigterm_during_extraction_keeps_the_written_batches_and_a_rerun_resumes(built, tiny_zip, tmp_path):
    """A scheduler's SIGTERM: the batch in hand is written, the partial file kept, one line says so; the
    re-run resumes after it and builds the same cache as one never stopped."""
    _, reference = built
    cfg = make_cfg(tmp_path, tiny_zip, "cache.dtype=float32")
    target = feature_cache.path_for(cfg)
    partial, wrote = target.with_name(target.name + ".partial"), tmp_path / "wrote"

    def stopped_after_the_first_batch():
        write = cache_writer.Writer.write

        def writing(self, *args):
            write(self, *args)
            if not wrote.exists():
                wrote.touch()
                while not console.interrupt_requested():
                    time.sleep(0.01)
        cache_writer.Writer.write = writing
        console.run(extraction.extract)(cfg)
    child = Forked(stopped_after_the_first_batch)
    child.wait_for(wrote)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait() == 143, child.text()[-3000:]
    assert child.text().strip().splitlines()[-1] == (f"interrupted by SIGTERM: kept 5 of 24 images in {partial}; "
                                                     f"re-run the same command to continue")
    assert not target.exists() and feature_cache.read_attrs(partial) is None
    assert extraction.extract(cfg) == target
    assert_same_cache(target, reference)


def test_corrupt_jpeg_is_one_error_and_leaves_no_file(tmp_path):
    member = f"train/{WNIDS[0]}/images/{WNIDS[0]}_1.JPEG"
    bad = write_tiny_imagenet(tmp_path / "bad.zip", corrupt=member)
    cfg = make_cfg(tmp_path, bad, "split.num_classes=5", "layers=[fc8]")
    with pytest.raises(UserError, match=member):
        extraction.extract(cfg)
    assert not list((tmp_path / "cache").iterdir())


def test_any_classifier_caches_its_nodes_as_named_datasets(tiny_zip, tmp_path):
    from torchvision.models.feature_extraction import create_feature_extractor

    cfg = make_cfg(tmp_path, tiny_zip, "encoder.arch=resnet18", "layers=[fc, layer2]", "encoder.input_size=64",
                   "cache.dtype=float32")
    path = extraction.extract(cfg)
    model, identity = encoder.load("resnet18", "random", cfg["seed"])
    reference = create_feature_extractor(model, ["layer2", "fc"])
    with feature_cache.open_for(cfg, ["layer2", "fc"]) as cache:
        assert cache.attrs["encoder"] == identity and cache.attrs["layers"] == ["layer2", "fc"]  # network order
        images = torch.from_numpy(cache.load("eval", "images"))
        with torch.no_grad():
            direct = reference(encoder.preprocess(images, 64, "resnet18"))
        for layer in ("layer2", "fc"):
            np.testing.assert_allclose(cache.load("eval", layer), direct[layer].numpy(), rtol=1e-5, atol=1e-5)
    assert feature_cache.path_for(cfg) == path != feature_cache.path_for(dict(cfg, **{"encoder.arch": "alexnet"}))


def test_tiny_imagenet_images_are_stored_exactly_as_decoded(built, tiny_zip):
    """At the default image_size the cache holds each JPEG's own pixels: nothing is resampled."""
    cfg, path = built
    ds = data.TinyImageNet(tiny_zip)
    with h5py.File(path) as f:
        assert f["train/images"].shape[1:] == (64, 64, 3)
        for i, member in enumerate(p.decode() for p in f["eval/paths"][()]):
            with Image.open(io.BytesIO(ds.files.read(member))) as im:
                np.testing.assert_array_equal(f["eval/images"][i], np.asarray(im.convert("RGB")))


def test_two_extractions_at_once_make_one_cache(built, tiny_zip, tmp_path):
    cfg, reference = built
    cfg = make_cfg(tmp_path, tiny_zip, "cache.dtype=float32")

    def slowly():
        write = cache_writer.Writer.write
        cache_writer.Writer.write = lambda *a: (write(*a), time.sleep(0.3))
        console.run(extraction.extract)(cfg)
    children = [Forked(slowly) for _ in range(2)]
    results = [(child.pid, child.wait(), child.text()) for child in children]
    codes = sorted(code for _, code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # the second waits for nothing: it refuses, or finds it done
    for pid, code, err in results:
        if code == 2:
            other = next(p for p, c, _ in results if p != pid)
            assert err.strip().splitlines()[-1].startswith(f"error: another process (pid {other}) is writing")
            assert "Traceback" not in err
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == [reference.name]  # no .partial, no .lock
    assert_same_cache(tmp_path / "cache" / reference.name, reference)


def test_not_enough_free_space_is_refused_before_writing(built, tmp_path, monkeypatch):
    cfg, _ = built
    cfg = dict(cfg, **{"cache.dir": str(tmp_path)})
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"not enough free space .* needs [\d.]+ MiB, 1,000 B free") as raised:
        extraction.extract(cfg)
    assert "\n" not in str(raised.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("how", ["seen coming", "hdf5 write fails"])
def test_disk_full_during_extraction_keeps_the_partial_and_resumes(built, tmp_path, monkeypatch, capsys, how):
    cfg, reference = built
    cfg = dict(cfg, **{"cache.dir": str(tmp_path)})
    target = feature_cache.path_for(cfg)
    partial = target.with_name(target.name + ".partial")
    if how == "seen coming":  # room for the first batch, then the disk fills up (another process)
        calls = []
        room = lambda path: Usage(10**9, 0, 10**9 if len(calls.append(1) or calls) <= 2 else 1000)
        monkeypatch.setattr(storage.shutil, "disk_usage", room)
        expected = "not enough free space"
    else:  # the second batch's fc6 write meets a full disk inside h5py
        real_setitem, calls = h5py.Dataset.__setitem__, []

        def setitem(self, key, value):
            calls.append(1)
            if len(calls) == 9:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_setitem(self, key, value)

        monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
        expected = f"could not write {partial} (No space left on device"
    with pytest.raises(storage.DiskError, match=re.escape(expected)) as raised:
        extraction.extract(cfg)
    assert "\n" not in str(raised.value) and "re-run to resume" in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name]
    with h5py.File(partial) as f:
        assert f["train"].attrs["done"] == 5  # the batch before the failure, whole
    monkeypatch.undo()
    capsys.readouterr()
    extraction.extract(cfg)
    assert "resuming" in capsys.readouterr().err
    assert_same_cache(target, reference)


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a tmpfs mounted in a private user and mount namespace")
def test_a_small_filesystem_filling_midway_keeps_a_partial_that_resumes(built, tmp_path, capsys):
    """The reported crash, for real: cache.dir on a 4 MiB tmpfs, the free-space checks passed (as when
    another process fills the disk meanwhile). The partial left there resumes where there is room."""
    cfg, reference = built
    small = tmp_path / "small"
    small.mkdir()

    def on_a_small_filesystem():
        _mount_private_tmpfs(small, "4m")
        storage.check_free_space = lambda *a: None
        try:
            console.run(extraction.extract)(make_cfg(tmp_path, cfg["data.path"], "cache.dtype=float32",
                                                     f"cache.dir={small}"))
            print("rc=0")
        except typer.Exit as e:
            print(f"rc={e.exit_code}")
        print(*os.listdir(small), sep="\n")
        shutil.copytree(small, tmp_path / "cache")  # the tmpfs goes with this process
    child = Forked(on_a_small_filesystem)
    code, err = child.wait(), child.text()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 0 and lines[-2:] == ["rc=2", reference.name + ".partial"], err[-3000:]  # refused, partial kept
    assert lines[-3].startswith("error: could not write") and "No space left on device" in lines[-3]
    assert "Traceback" not in err and "Exception ignored" not in err
    with h5py.File(tmp_path / "cache" / (reference.name + ".partial")) as f:
        assert f["train"].attrs["done"] > 0
    capsys.readouterr()
    extraction.extract(dict(cfg, **{"cache.dir": str(tmp_path / "cache")}))  # with room
    assert "resuming" in capsys.readouterr().err
    assert_same_cache(tmp_path / "cache" / reference.name, reference)
