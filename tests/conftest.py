"""Shared fixtures: a small Tiny-ImageNet-shaped zip and a cache built from it by the real code."""

import json
import os

# One compute thread per test process and per process a test starts (they inherit it), set before torch
# is imported: the suite's tensors are tiny, pytest-xdist already runs one worker per core, and a second
# OpenMP thread per process on a busy core spins more than it computes (4x the CPU time, measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import signal  # noqa: E402 (after the thread setting, as torch below)
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import typer  # noqa: E402

from inversion.core import (config, console,  # noqa: E402 (torch-free: pytest-xdist's controller loads this file too)
                            synthetic)

WNIDS = synthetic.wnids_for(5)
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 3
GRAY_MEMBER = f"train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG"
ROOT = Path(__file__).resolve().parent.parent  # the repository


def write_tiny_imagenet(path, corrupt=None, with_wnids=True):
    return synthetic.write_zip(path, len(WNIDS), TRAIN_PER_CLASS, VAL_PER_CLASS, gray=[GRAY_MEMBER],
                               corrupt=[corrupt] if corrupt else [], with_wnids=with_wnids)


@pytest.fixture(scope="session")
def tiny_zip(tmp_path_factory):
    return write_tiny_imagenet(tmp_path_factory.mktemp("data") / "tiny-imagenet-200.zip")


@pytest.fixture(scope="module")
def folder_zip(tmp_path_factory):
    """5 classes x 12 train + 3 val images of mixed sizes, types and modes, in a zip."""
    return synthetic.write_imagefolder(tmp_path_factory.mktemp("folders") / "folders.zip", 5, 12, 3)


def make_cfg(tmp, data_path, *overrides):
    """A small, fast config rooted in `tmp`."""
    base = [f"data.path={data_path}", f"cache.dir={tmp}/cache", f"output.dir={tmp}/out",
            "encoder.weights=random", "split.num_classes=3", "split.eval_per_class=2",
            "split.train_per_class=6", "train.batch_size=4", "train.epochs=2", "device=cpu",
            "extract.batch_size=5", "render.num_images=4", "render.grid_size=2", "decoder.fc_width=64",
            "decoder.width=0.125", "precision=fp32"]  # fp32: the same numbers on a CPU with or without bf16
    path = tmp / "config.yaml"
    if not path.exists():
        path.write_text("{}\n")
    return config.load(path, [*base, *overrides])


@pytest.fixture(scope="session")
def built(tmp_path_factory, tiny_zip):
    """(config, cache path) of a cache built once from the tiny zip; tests must not modify it."""
    tmp = tmp_path_factory.mktemp("built")
    from inversion.extract import extraction

    cfg = make_cfg(tmp, tiny_zip, "cache.dtype=float32")
    return cfg, extraction.extract(cfg)


@pytest.fixture(scope="session")
def trained_once(built, tmp_path_factory):
    """conv5 and fc8 decoders trained one epoch on the built cache, once for the whole suite."""
    cfg, _ = built
    cfg = dict(cfg, **{"output.dir": str(tmp_path_factory.mktemp("trained")), "train.epochs": 1})
    from inversion.train import training

    training.train(cfg, ["conv5", "fc8"])
    return cfg


@pytest.fixture(scope="module")
def trained(trained_once, tmp_path_factory):
    """A private output.dir per test module whose `decoders` is a link to the session's: read, never
    written (a test that damages a checkpoint copies the folder first)."""
    out = tmp_path_factory.mktemp("out")
    (out / "decoders").symlink_to(Path(trained_once["output.dir"]) / "decoders", target_is_directory=True)
    return dict(trained_once, **{"output.dir": str(out)})


class Forked:
    """A child forked from this test process, running one function: torch, torchvision and the package
    are imported already (a fresh interpreter spends 3-6 s of CPU importing them on a small machine, which
    was most of what the fault and multi-process tests cost). What it prints goes to a temporary file."""

    def __init__(self, fn, *args, env=None, core=None):
        self.env = env or {}
        self.log = tempfile.TemporaryFile("w+")
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.dup2(self.log.fileno(), 1)
                os.dup2(self.log.fileno(), 2)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
                os.environ.update(env or {})
                if core is not None:
                    os.sched_setaffinity(0, {core})
                console.console.quiet = os.environ.get("RANK", "0") != "0"  # what the import decides in a rank
                code = 0
                fn(*args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except typer.Exit as e:  # what console.run raises for a UserError: a command line exits with it
                code = e.exit_code
            except BaseException:  # noqa: BLE001 - reported in the log, as a crashed process would
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        self.returncode = None

    def wait(self, timeout=300):
        """The exit code (negative: killed by that signal), as subprocess reports it."""
        deadline = time.time() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif time.time() > deadline:
                self.kill()
                raise TimeoutError(f"forked child {self.pid} ran past {timeout} s:\n{self.text()[-3000:]}")
            else:
                time.sleep(0.02)
        return self.returncode

    def wait_for(self, path, timeout=300):
        """Until the child creates `path`: how a test meets it at a point of its own choosing (a hook in the
        child touches the file), not after a guessed delay. Fails at once if the child exits first."""
        deadline = time.time() + timeout
        while not Path(path).exists():
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                raise AssertionError(f"forked child exited ({self.returncode}) before {path}:\n{self.text()[-3000:]}")
            if time.time() > deadline:
                self.kill()
                raise TimeoutError(f"forked child {self.pid}: no {path} after {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.02)

    def text(self):
        """Everything it has printed so far."""
        self.log.seek(0)
        return self.log.read()

    def kill(self):
        if self.returncode is None:  # once reaped, its pid may be another process's
            os.kill(self.pid, signal.SIGKILL)
        return self.wait()


def cfg_in(built, tmp_path, **overrides):
    """The built cache's config with outputs in `tmp_path`: a training of its own on the shared cache."""
    cfg, _ = built
    return dict(cfg, **{"output.dir": str(tmp_path), **overrides})


def train(cfg, fresh=False):
    """conv5's history after training it alone (the quickest decoder of the four)."""
    from inversion.train import training
    return training.train(cfg, ["conv5"], fresh=fresh)["conv5"]


def epoch_losses(history):
    return [(h["epoch"], h["train_loss"], h["eval_loss"]) for h in history]


def assert_same_cache(a, b):
    """The two caches hold the same datasets with the same values."""
    import h5py
    import numpy as np
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for split in ("train", "eval"):
            assert set(fa[split]) == set(fb[split])
            for name in fa[split]:
                np.testing.assert_array_equal(fa[split][name][()], fb[split][name][()], err_msg=f"{split}/{name}")


def read_history(path):
    """A decoder's history.jsonl, one dict per epoch."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pixel_size(inches):
    """The (width, height) in pixels of a figure saved at `inches` (figures.DPI)."""
    from inversion.core.figures import DPI
    return int(round(inches[0] * DPI)), int(round(inches[1] * DPI))


def wait_at_batch(n, reached, until=None, module=None):
    """For a forked child: its n-th training batch (counted over epochs from 1) touches `reached`, then waits
    until `until()` (default: until a Ctrl-C or SIGTERM has arrived), so the test sends its signal mid-epoch,
    at a step it chose. The batch is fetched after the step before it. `module`: whose `batches` generator
    to hold (default: decoder training's, inversion.train.batching)."""
    if module is None:
        from inversion.train import batching as module

    until = until or console.interrupt_requested
    real, count = module.batches, [0]

    def batches(*args):
        for item in real(*args):
            count[0] += 1
            if count[0] == n:
                Path(reached).touch()
                while not until():
                    time.sleep(0.01)
            yield item
    module.batches = batches


def forked_ranks(fn, *args, world=2):
    """`world` forked processes running fn(*args) with the environment torchrun gives its ranks (the
    pipeline reads nothing else of torchrun's), all on one core: each rank computes with one thread, as
    this suite's processes do, and the other core stays with the other test worker.

    MASTER_PORT stays reserved for as long as the ranks are referenced (see `reserve_port`)."""
    port = reserve_port()
    core = max(os.sched_getaffinity(0))
    common = {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port.getsockname()[1]), "OMP_NUM_THREADS": "1"}
    ranks = [Forked(fn, *args, env={**common, "RANK": str(r), "LOCAL_RANK": str(r)}, core=core) for r in range(world)]
    for rank in ranks:
        rank.port = port  # closed when the last rank is dropped, long after rank 0's store has bound it
    return ranks


def reserve_port():
    """A socket bound (not listening) to a free port with SO_REUSEADDR, for rank 0's TCPStore to listen on.
    A port found free and closed again, as before, could be taken by anything binding port 0 before rank 0
    bound it: another test worker's ranks, or another suite on the same machine. Bound, no bind(0) or
    connect() is given it, and the store, which binds with SO_REUSEADDR too (libuv does), still may."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s
