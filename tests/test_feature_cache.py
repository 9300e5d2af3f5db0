import ctypes
import errno
import io
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import typer
from PIL import Image

from conftest import WNIDS, Forked, make_cfg, write_tiny_imagenet
from inversion.core import console, data, encoder, encoder_graph, feature_cache, storage
from inversion.extract import extraction
from inversion.core.errors import UserError
from inversion.extract import cache_writer
from inversion.train import batching

ROOT = Path(__file__).resolve().parent.parent
Usage = namedtuple("Usage", "total used free")


def test_cache_holds_split_and_features_equal_a_direct_forward(built, tiny_zip):
    cfg, path = built
    ds = data.TinyImageNet(tiny_zip)
    split = data.make_split(ds, cfg["seed"], 3, 2, 6)
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


def test_interrupted_write_leaves_nothing_valid_and_resumes(built, tmp_path, monkeypatch):
    cfg, reference = built
    cfg = dict(cfg, **{"cache.dir": str(tmp_path)})
    target = feature_cache.path_for(cfg)
    real_write = cache_writer.Writer.write
    calls = []

    def write_then_die(self, *args):
        real_write(self, *args)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cache_writer.Writer, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extraction.extract(cfg)
    assert not target.exists() and feature_cache.read_attrs(target.with_name(target.name + ".partial")) is None
    with pytest.raises(UserError, match="no complete feature cache"):
        feature_cache.open_for(cfg)
    monkeypatch.setattr(cache_writer.Writer, "write", real_write)
    extraction.extract(cfg)
    with h5py.File(target) as a, h5py.File(reference) as b:
        for key in ("train/conv2", "train/fc8", "eval/conv5", "train/images"):
            np.testing.assert_array_equal(a[key][()], b[key][()])


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


def test_missing_layer_is_named(tiny_zip, tmp_path):
    cfg = make_cfg(tmp_path, tiny_zip, "layers=[fc8]")
    extraction.extract(cfg)
    with pytest.raises(UserError, match="no layer 'conv2'"):
        feature_cache.open_for(cfg, ["conv2"])


def test_stream_yields_every_sample_once_in_shuffled_order(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        x = f.create_dataset("x", data=np.arange(103 * 2).reshape(103, 2), chunks=(10, 2))
        y = f.create_dataset("y", data=np.arange(103))
        batches = list(batching.stream(x, y, 8, 25, np.random.default_rng(0)))
        seen = np.concatenate([by for _, by in batches])
        assert sorted(seen) == list(range(103)) and list(seen) != list(range(103))
        assert all(len(by) == 8 for _, by in batches[:-1])
        assert all((bx[:, 0] == 2 * by).all() for bx, by in batches)


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


def test_expected_bytes_is_what_the_cache_holds(built):
    cfg, path = built
    shapes = encoder_graph.feature_shapes("alexnet", cfg["encoder.input_size"], cfg["layers"])
    with h5py.File(path) as f:
        n = sum(len(f[s]["labels"]) for s in feature_cache.SPLITS)
        stored = sum(f[s][k].size * f[s][k].dtype.itemsize for s in feature_cache.SPLITS
                     for k in ["images", *cfg["layers"]])
    assert feature_cache.expected_bytes(shapes, n, 64, cfg["cache.dtype"]) == stored
    # 128 px: only the image grows, four times; conv2 alone in float16 is 192*13*13*2 bytes
    assert feature_cache.expected_bytes({"conv2": (192, 13, 13)}, 10, 128, "float16") == 10 * (128 * 128 * 3 + 64896)


def assert_same_cache(path, reference):
    with h5py.File(path) as a, h5py.File(reference) as b:
        for split in ("train", "eval"):
            for key in ("images", "labels", "conv2", "conv5", "fc6", "fc8"):
                np.testing.assert_array_equal(a[split][key][()], b[split][key][()])


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


def test_a_real_hdf5_write_failure_is_one_line_not_a_crash(built, tmp_path):
    import extract_features

    cfg, reference = built
    limit = reference.stat().st_size // 3  # the file may not grow past this: HDF5 fails as on a full disk
    (tmp_path / "config.yaml").write_text("{}\n")
    args = [f"data.path={cfg['data.path']}", f"cache.dir={tmp_path}/cache", "encoder.weights=random",
            "split.num_classes=3", "split.eval_per_class=2", "split.train_per_class=6", "device=cpu",
            "extract.batch_size=5", "cache.dtype=float32"]

    def on_a_small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        extract_features.app(["--config", str(tmp_path / "config.yaml"), *[a for arg in args for a in ("--set", arg)]])
    child = Forked(on_a_small_disk)
    code, err = child.wait(), child.text()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-3000:]
    assert lines[-1].startswith("error: could not write") and "File too large" in lines[-1], err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err
    target = feature_cache.path_for(dict(cfg, **{"cache.dir": str(tmp_path / "cache")}))
    assert not target.exists() and target.with_name(target.name + ".partial").exists()
    extraction.extract(dict(cfg, **{"cache.dir": str(tmp_path / "cache")}))  # with room: finishes
    assert_same_cache(target, reference)


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


@pytest.mark.parametrize("compression", ["lzf", "blosc2-zstd"])
def test_compressed_cache_holds_the_uncompressed_values_under_the_same_name(built, tmp_path, capsys, compression):
    cfg, reference = built
    cfg = dict(cfg, **{"cache.dir": str(tmp_path), "cache.compression": compression})
    path = extraction.extract(cfg)
    assert path.name == reference.name  # compression is not in the name: either is a hit for the other
    with h5py.File(path) as f:
        assert f["train/conv2"].compression is not None and f["eval/images"].compression is not None
        assert f["train/conv2"].chunks[0] == f["train/fc8"].chunks[0] == f["train/images"].chunks[0]
    assert path.stat().st_size < 0.7 * reference.stat().st_size
    assert_same_cache(path, reference)
    with feature_cache.open_for(cfg, cfg["layers"]) as cache:
        assert feature_cache.compression_of(cache.attrs) == compression
        np.testing.assert_array_equal(cache["train"]["fc6"][[1, 7, 16]], cache.load("train", "fc6")[[1, 7, 16]])
    capsys.readouterr()
    assert extraction.extract(dict(cfg, **{"cache.compression": "none"})) == path
    assert f"compression {compression}; cache.compression=none applies to new caches" in capsys.readouterr().err


def test_streamed_batches_are_the_same_from_a_compressed_cache(built, tmp_path):
    """Blocks follow the uncompressed chunking, not the file's: the order is the cache's, not its format's."""
    cfg, reference = built
    compressed = extraction.extract(dict(cfg, **{"cache.dir": str(tmp_path), "cache.compression": "lzf"}))
    with h5py.File(compressed) as a, h5py.File(reference) as b:
        assert a["train/fc6"].chunks != b["train/fc6"].chunks
        for layer in ("conv2", "fc6"):
            got, want = ([bx for bx, _ in batching.stream(f["train"][layer], f["train/images"], 4, 8,
                                                               np.random.default_rng(3))] for f in (a, b))
            assert len(got) == len(want) and all((g == w).all() for g, w in zip(got, want))


def test_compressed_writer_holds_rows_until_chunks_are_whole_and_resumes(built, tmp_path, monkeypatch):
    """An interrupted compressed cache keeps its whole chunks (16 float32 conv2 rows) and resumes after them."""
    cfg, reference = built
    cfg = dict(cfg, **{"cache.dir": str(tmp_path), "cache.compression": "blosc2-zstd", "extract.batch_size": 4})
    target = feature_cache.path_for(cfg)
    partial = target.with_name(target.name + ".partial")
    real_write, calls = cache_writer.Writer.write, []

    def write_then_die(self, *args):
        real_write(self, *args)
        calls.append(int(self.file["train"].attrs["done"]))  # on disk, not held
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(cache_writer.Writer, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extraction.extract(cfg)
    assert calls == [0, 0, 0, 16, 18]  # 4, 8, 12 rows held; 16 = one chunk; 18 = the split's last rows
    assert not target.exists() and feature_cache.read_attrs(partial) is None
    monkeypatch.undo()
    with h5py.File(partial, "r+") as f:  # as if killed after the first chunk
        f["train"].attrs["done"], f["eval"].attrs["done"] = 16, 0
    extraction.extract(dict(cfg, **{"extract.batch_size": 5}))  # 5 per batch from row 16: rows 16-17 end the split
    with h5py.File(target) as f:
        assert f["train/conv2"].compression is not None
    with h5py.File(target) as a, h5py.File(reference) as b:  # another batch size: features to float precision
        for split in feature_cache.SPLITS:
            for key in ("images", "labels"):
                np.testing.assert_array_equal(a[split][key][()], b[split][key][()])
            for layer in cfg["layers"]:
                np.testing.assert_allclose(a[split][layer][()], b[split][layer][()], rtol=1e-5, atol=1e-5)


def test_disk_full_in_a_compressed_write_keeps_a_partial_that_resumes(built, tmp_path, monkeypatch, capsys):
    cfg, reference = built
    cfg = dict(cfg, **{"cache.dir": str(tmp_path), "cache.compression": "lzf", "extract.batch_size": 8})
    target = feature_cache.path_for(cfg)
    partial = target.with_name(target.name + ".partial")
    real_setitem, calls = h5py.Dataset.__setitem__, []

    def setitem(self, key, value):
        calls.append(self.name)
        if self.name == "/train/fc6" and calls.count("/train/fc6") == 2:  # the second chunk's fc6
            raise OSError(errno.ENOSPC, "No space left on device")
        real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    with pytest.raises(storage.DiskError, match=re.escape(f"could not write {partial} (No space left on device")):
        extraction.extract(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name]
    with h5py.File(partial) as f:
        assert f["train"].attrs["done"] == 16
    monkeypatch.undo()
    capsys.readouterr()
    extraction.extract(cfg)
    assert "resuming" in capsys.readouterr().err
    with h5py.File(target) as a, h5py.File(reference) as b:
        for key in ("train/images", "eval/images", "train/labels"):
            np.testing.assert_array_equal(a[key][()], b[key][()])
        for key in ("train/fc6", "eval/conv2"):  # batches of 8, not 5: equal to float precision
            np.testing.assert_allclose(a[key][()], b[key][()], rtol=1e-5, atol=1e-5)


def test_free_space_estimate_bounds_what_a_compressed_cache_takes(built, tmp_path):
    """Random bytes do not compress: the estimate must still cover the file."""
    cfg, _ = built
    rng = np.random.default_rng(0)
    shapes = {"fc6": (4096,), "conv2": (192, 13, 13)}
    meta = {name: ([0] * n, ["x"] * n, ["x"] * n) for name, n in (("train", 40), ("eval", 3))}
    attrs = {"cache_hash": "x"}
    for compression in ("lzf", "blosc2-zstd"):
        path = tmp_path / f"{compression}.h5"
        writer = cache_writer.Writer(path, attrs, meta, shapes, "float16", 64, compression)
        bound = writer._space({"train": (0, None), "eval": (0, None)})
        for name, n in (("train", 40), ("eval", 3)):
            for start in range(0, n, 6):
                rows = min(6, n - start)
                writer.write(name, start, rng.integers(0, 256, (rows, 64, 64, 3), dtype=np.uint8),
                             {k: rng.standard_normal((rows, *s)).astype(np.float16) for k, s in shapes.items()})
        writer.finish()
        assert path.stat().st_size <= bound, compression


def test_reading_a_blosc2_cache_without_hdf5plugin_is_one_line_naming_it(built, tmp_path):
    cfg, _ = built
    cfg = dict(cfg, **{"cache.dir": str(tmp_path), "cache.compression": "blosc2-zstd"})
    extraction.extract(cfg)
    code = (f"import sys; sys.modules['hdf5plugin'] = None; sys.path.insert(0, {str(ROOT)!r}); import h5py\n"
            f"from inversion import feature_cache, errors\n"
            f"try:\n    feature_cache.open_for({cfg!r})\nexcept errors.UserError as e:\n    print(e)\n"
            f"with h5py.File({str(feature_cache.path_for(cfg))!r}) as f:\n"
            f"    try:\n        f['train/fc6'][0]\n    except OSError as e:\n        print('h5py alone:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"cache {feature_cache.path_for(cfg)} is compressed with Blosc2") and \
        "HDF5 filter 32026" in lines[0] and lines[0].endswith("pip install hdf5plugin"), out
    assert lines[1].startswith("h5py alone:"), out  # the check is needed: h5py cannot read it either


def test_training_streamed_from_a_compressed_cache_has_the_uncompressed_history(built, tmp_path):
    from inversion.train import training

    cfg, _ = built
    runs = {}
    for compression in ("none", "blosc2-zstd"):
        run = dict(cfg, **{"cache.dir": str(tmp_path / compression), "output.dir": str(tmp_path / f"out-{compression}"),
                           "cache.compression": compression, "train.in_memory": False, "train.shuffle_buffer": 8,
                           "train.epochs": 2})
        extraction.extract(run)
        runs[compression] = training.train(run, ["fc8"])["fc8"]  # 18 rows: one block uncompressed, 16 + 2 compressed
    strip = lambda history: [{k: v for k, v in h.items() if k not in ("seconds", "samples_per_s")} for h in history]
    assert strip(runs["blosc2-zstd"]) == strip(runs["none"]) and len(runs["none"]) == 2


def test_list_caches_tells_them_apart_and_marks_this_configs(built, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from inversion.core import console

    import extract_features

    cfg, reference = built
    folder = tmp_path / "caches"
    lzf = extraction.extract(dict(cfg, **{"cache.dir": str(folder), "cache.compression": "lzf", "seed": 1}))
    shutil.copy(reference, folder / reference.name)
    partial = folder / "features-0123456789abcdef.h5.partial"
    shutil.copy(reference, partial)
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"], f["train"].attrs["done"], f["eval"].attrs["done"] = False, 10, 0
    args = [a for key in ("data.path", "encoder.weights", "split.num_classes", "split.eval_per_class",
                          "split.train_per_class", "cache.dtype") for a in ("--set", f"{key}={cfg[key]}")]
    (tmp_path / "c.yaml").write_text("{}\n")
    monkeypatch.setattr(console.console, "_width", 200)  # wide enough that no cell wraps, whatever the terminal
    result = CliRunner().invoke(extract_features.app, ["--list-caches", "--config", str(tmp_path / "c.yaml"),
                                                       "--set", f"cache.dir={folder}", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    blocks, table = [[]], result.output[result.output.index("┡"):result.output.index("└")].splitlines()[1:]
    for line in table:  # one block of lines per cache, between the rules
        blocks.append([]) if line.startswith("├") else blocks[-1].append(line.split("│")[1:-1])
    text = {"".join(cells[1] for cells in block).split()[0]: " ".join(" ".join(c.strip() for c in cells) for cells in block)
            for block in blocks}
    assert set(text) == {reference.name, lzf.name, partial.name}, result.output
    assert all("AlexNet random init, not ImageNet-pretrained" in t and "3 classes, 64x64 px" in t
               and "18 train + 6 eval images" in t and "conv2, conv5, fc6, fc8" in t for t in text.values())
    assert "compression lzf" in text[lzf.name] and "seed 1" in text[lzf.name] and "complete" in text[lzf.name]
    assert "float32, compression none" in text[reference.name] and "partial: 10 of 24 images" in text[partial.name]
    marked = [line for line in result.output.splitlines() if line.startswith("│ * ")]
    assert len(marked) == 1 and reference.name in marked[0]
    assert "3 caches" in result.output.splitlines()[-1] and reference.name in result.output.splitlines()[-1]
