import h5py
import numpy as np
import pytest
import torch

from conftest import cfg_in, train
from inversion.core import feature_cache, host
from inversion.extract import extraction
from inversion.train import batching


def test_stream_yields_every_sample_once_in_shuffled_order(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        x = f.create_dataset("x", data=np.arange(103 * 2).reshape(103, 2), chunks=(10, 2))
        y = f.create_dataset("y", data=np.arange(103))
        batches = list(batching.stream(x, y, 8, 25, np.random.default_rng(0)))
        seen = np.concatenate([by for _, by in batches])
        assert sorted(seen) == list(range(103)) and list(seen) != list(range(103))
        assert all(len(by) == 8 for _, by in batches[:-1])
        assert all((bx[:, 0] == 2 * by).all() for bx, by in batches)


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


def test_streamed_input_trains_like_in_memory_input_up_to_order(built, tmp_path, monkeypatch):
    seen = []  # per training batch, the images it held (as bytes: one key per image)
    real = batching.batches

    def recording(*args):
        for x, y, n in real(*args):
            seen.append([bytes(image.numpy()) for image in y])
            yield x, y, n
    monkeypatch.setattr(batching, "batches", recording)
    runs = {}
    for mode in (True, False):
        seen.clear()
        history = train(cfg_in(built, tmp_path / str(mode), **{"train.in_memory": mode, "train.shuffle_buffer": 5}))
        epochs = [sum(seen[i * 5:(i + 1) * 5], []) for i in range(2)]  # 18 images in batches of 4: 5 a epoch
        runs[mode] = history, epochs
        assert len(seen) == 10 and all(len(set(epoch)) == 18 == len(epoch) for epoch in epochs)  # each image once
    (memory, memory_order), (streamed, streamed_order) = runs[True], runs[False]
    assert sorted(memory_order[0]) == sorted(streamed_order[0]) and memory_order != streamed_order
    assert [h["samples"] for h in streamed] == [h["samples"] for h in memory] == [18, 18]
    for a, b in zip(streamed, memory):  # the same data and initialisation; only the order differs
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=0.25)


def test_in_memory_auto_follows_memavailable_not_memfree(built, tmp_path, monkeypatch):
    """A full page cache shrinks MemFree but not MemAvailable; when auto followed MemFree, one of two
    default runs streamed conv2 (another batch order) and the histories differed."""
    meminfo = dict(line.split(":") for line in open("/proc/meminfo").read().splitlines())
    assert host.available_ram() == int(meminfo["MemAvailable"].split()[0]) * 1024
    with feature_cache.open_for(built[0], ["conv5"]) as cache:
        nbytes = cache["train"]["conv5"].nbytes + cache["train"]["images"].nbytes
        for ram, streamed in ((2 * nbytes - 1, True), (2 * nbytes + 1, False)):
            monkeypatch.setattr(host, "available_ram", lambda: ram)
            x, _ = batching.inputs(cache, "train", "conv5", "auto", torch.device("cpu"))
            assert isinstance(x, h5py.Dataset) == streamed
