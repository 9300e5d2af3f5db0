import errno
import re
import resource
import signal

import h5py
import numpy as np
import pytest

from conftest import Forked, assert_same_cache
from inversion.core import encoder_graph, feature_cache, storage
from inversion.core.errors import UserError
from inversion.extract import cache_writer, extraction


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
