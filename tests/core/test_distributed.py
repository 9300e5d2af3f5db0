"""Two CPU processes (Gloo): a sharded cache equals the single-process one, a killed run resumes, and
two-process training matches single-process training with the same global batch, for each loss.

The ranks are forks of this test process given the environment torchrun gives its ranks, which is all
the pipeline reads of torchrun; a real launch of the pipeline costs its agent and each rank 3-6 s of
imports on a small CPU. That torchrun gives exactly that environment is checked against a real launch
whose ranks run no Python."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from conftest import assert_same_cache, forked_ranks, make_cfg, read_history, wait_at_batch
from inversion.core import console, distributed, feature_cache
from inversion.extract import cache_writer, extraction
from inversion.train import training


def _extract_until_killed(cfg, folder):
    """A rank that stops for good after its first written batch. Polling for a part file instead, a busy test
    process could miss the parts being written altogether."""
    write = cache_writer.Writer.write

    def writing(self, *args):
        write(self, *args)
        (folder / f"wrote-{os.environ['RANK']}").touch()
        time.sleep(600)
    cache_writer.Writer.write = writing
    extraction.extract(cfg)


def _train_in_one_group(runs):
    """Every ([config, layers]) of `runs` in one process group, taken down after the last."""
    teardown, distributed.teardown = distributed.teardown, lambda: None
    for cfg, layers in runs:
        training.train(cfg, layers)
    teardown()


def test_forked_ranks_get_the_environment_torchrun_gives(tmp_path):
    """`torchrun --standalone --nproc_per_node=2` running `env` in each rank (no Python there), against
    `forked_ranks`: the variables the pipeline reads (distributed.py, console.py, extraction.py and
    torch's env:// rendezvous) are set alike."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
               "sh", "-c", f"env > {tmp_path}/rank-$RANK.env"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    launched = [dict(line.split("=", 1) for line in (tmp_path / f"rank-{r}.env").read_text().splitlines() if "=" in line)
                for r in range(2)]
    ranks = forked_ranks(lambda: None)
    assert [rank.wait() for rank in ranks] == [0, 0]
    forked = [rank.env for rank in ranks]
    for r in range(2):
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
            assert launched[r][key] == forked[r][key], key
        assert {"MASTER_ADDR", "MASTER_PORT"} <= set(launched[r]) & set(forked[r])
    assert launched[0]["RANK"] == "0" and launched[1]["RANK"] == "1" and launched[0]["WORLD_SIZE"] == "2"


def test_share_splits_a_range_contiguously():
    assert [distributed.share(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [distributed.share(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    assert [distributed.share(18, r, 2, unit=5) for r in range(2)] == [(0, 10), (10, 18)]
    assert [distributed.share(3, r, 2, unit=5) for r in range(2)] == [(0, 3), (3, 3)]


def test_two_process_extraction_equals_one_and_resumes_after_a_kill(tiny_zip, tmp_path):
    cfg = make_cfg(tmp_path, tiny_zip, "cache.dtype=float32")
    # One thread here as in each rank (forked_ranks): the float sums depend on the thread count.
    assert torch.get_num_threads() == 1
    reference = extraction.extract(dict(cfg, **{"cache.dir": str(tmp_path / "one")}))
    target = feature_cache.path_for(cfg)
    assert target.name == reference.name  # same settings, same cache name

    ranks = forked_ranks(_extract_until_killed, cfg, tmp_path)  # killed once each has written a batch of its part
    for r, rank in enumerate(ranks):
        rank.wait_for(tmp_path / f"wrote-{r}")
    [rank.kill() for rank in ranks]
    assert not target.exists() and len(list(target.parent.glob("*.part-*.h5.partial"))) == 2

    ranks = forked_ranks(console.run(extraction.extract), cfg)  # run again: resumes
    assert [rank.wait() for rank in ranks] == [0, 0], ranks[0].text()[-3000:] + ranks[1].text()[-3000:]
    assert "virtual datasets over 2 part files" in ranks[0].text()
    assert_same_cache(target, reference)
    with h5py.File(target) as fa, h5py.File(reference) as fb:
        for key in ("cache_hash", "config", "layers", "encoder", "class_wnids"):
            assert fa.attrs[key] == fb.attrs[key]
    with h5py.File(target) as f:
        assert f["train/conv2"].is_virtual and json.loads(f.attrs["parts"]) == [
            f"{target.name}.part-0-of-2.h5", f"{target.name}.part-1-of-2.h5"]

    # The single-process command reads it as a hit; a missing part makes it incomplete, not zeros.
    assert extraction.extract(cfg) == target
    part = target.with_name(f"{target.name}.part-1-of-2.h5")
    part.rename(part.with_suffix(".moved"))
    assert feature_cache.read_attrs(target) is None


def test_two_process_training_matches_one_process_with_each_loss(built, trained_once, tmp_path):
    """Pixel loss (conv5, fc8), the feature term (conv5) and the adversarial one (conv5), three trainings
    in one process group. The feature term has no randomness: two ranks give the one-process run. The
    discriminator's dropout draws per rank, so with it the test asks for a run that finishes, agrees on
    every pause (or DDP would hang) and writes D's weights and optimiser state once."""
    cfg, _ = built
    feature = {"train.epochs": 1, "loss.feature": 0.05}
    runs = {"pixel": (dict(trained_once, **{"output.dir": str(tmp_path / "pixel")}), ["conv5", "fc8"]),
            "feature": (dict(cfg, **{"output.dir": str(tmp_path / "feature"), **feature}), ["conv5"]),
            "gan": (dict(cfg, **{"output.dir": str(tmp_path / "gan"), "train.epochs": 2, "loss.adversarial": 0.1}),
                    ["conv5"])}
    ranks = forked_ranks(_train_in_one_group, runs.values())
    for rank in ranks:
        assert rank.wait() == 0, rank.text()[-3000:]
    assert ranks[0].text().count("2 ranks (DistributedDataParallel)") == 3  # rank 0 speaks for the group

    # fc8 gets 1e-3: in one process, summing the gradients of each batch's two halves (what DDP
    # computes) moves this tiny run's fc8 eval loss by 2.9e-4 relative too: Adam's first steps
    # amplify the reduction order. conv5 stays within the 1e-4 the two-process run promises.
    single = {layer: read_history(Path(trained_once["output.dir"]) / "decoders" / layer / "history.jsonl")
              for layer in ("conv5", "fc8")}
    single_feature = training.train(dict(cfg, **{"output.dir": str(tmp_path / "one"), **feature}), ["conv5"])["conv5"]
    for run, layer, reference, tolerance in (("pixel", "conv5", single["conv5"], 1e-4), ("pixel", "fc8", single["fc8"], 1e-3),
                                             ("feature", "conv5", single_feature, 1e-4)):
        folder = tmp_path / run / "decoders" / layer
        history = read_history(folder / "history.jsonl")
        assert len(history) == 1 and history[0]["samples"] == reference[0]["samples"]  # written once
        assert history[0]["eval_loss"] == pytest.approx(reference[0]["eval_loss"], rel=tolerance), (run, layer)
        assert history[0]["train_loss"] == pytest.approx(reference[0]["train_loss"], rel=tolerance), (run, layer)
        assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "history.jsonl", "last.pt", "optimizer.pt"]

    folder = tmp_path / "gan/decoders/conv5"
    assert len(read_history(folder / "history.jsonl")) == 2
    assert "discriminator" in torch.load(folder / "last.pt", weights_only=True)
    assert "discriminator_optimizer" in torch.load(folder / "optimizer.pt", weights_only=True)


def test_two_ranks_stopped_by_sigterm_mid_epoch_resume_to_the_uninterrupted_weights(built, tmp_path):
    """torchrun's agent, stopped by a scheduler, sends SIGTERM to every rank (and waits its shutdown timeout):
    the ranks agree on the step to stop at, rank 0 keeps it, and two ranks resuming it end where two ranks
    never stopped do."""
    cfg, _ = built
    straight, stopped = (dict(cfg, **{"output.dir": str(tmp_path / name), "train.epochs": 2})
                         for name in ("straight", "stopped"))

    def rank_until_stopped():
        wait_at_batch(5 + 2, tmp_path / f"reached-{os.environ['RANK']}")  # epoch 2, after its first step
        console.run(training.train)(stopped, ["conv5"])
    ranks = forked_ranks(rank_until_stopped)
    for r, rank in enumerate(ranks):
        rank.wait_for(tmp_path / f"reached-{r}")
    for rank in ranks:
        os.kill(rank.pid, signal.SIGTERM)
    assert [rank.wait() for rank in ranks] == [143, 143], ranks[0].text()[-3000:] + ranks[1].text()[-3000:]
    folder = tmp_path / "stopped/decoders/conv5"
    assert f"conv5: kept epoch 2 up to step 1 of 5 ({folder / 'in-progress.pt'})" in ranks[0].text()
    assert ranks[1].text().count("interrupted") == 0  # rank 0 speaks for the group
    assert len(torch.load(folder / "in-progress.pt", weights_only=True)["ranks"]) == 2

    ranks = forked_ranks(_train_in_one_group, [(straight, ["conv5"]), (stopped, ["conv5"])])
    assert [rank.wait() for rank in ranks] == [0, 0], ranks[0].text()[-3000:] + ranks[1].text()[-3000:]
    assert "conv5: continuing epoch 2 after step 1 of 5" in ranks[0].text()
    a, b = (torch.load(tmp_path / name / "decoders/conv5/last.pt", weights_only=True) for name in ("straight", "stopped"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert not (folder / "in-progress.pt").exists()
