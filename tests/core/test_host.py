"""The machine facts stamped on artifacts, and glibc keeping freed memory for the next training step."""

from pathlib import Path

import torch

from inversion.core import host


def test_freed_memory_is_kept_for_reuse_where_glibc_allows_it():
    assert host.keep_freed_memory() in (True, False)
    assert host.keep_freed_memory() is host.keep_freed_memory()  # once per process
    x = torch.empty(64 << 20, dtype=torch.uint8)  # above glibc's default mmap threshold: still allocates
    x.fill_(1)
    assert int(x[-1]) == 1


def test_the_machine_facts_an_artifact_records():
    assert set(host.versions()) == {"python", "torch", "torchvision", "h5py", "numpy"}
    assert host.cores() >= 1 and host.cpu_model()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():  # Linux: MemAvailable, in bytes
        kib = next(int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:"))
        assert abs(host.available_ram() - kib * 1024) < 2**30  # read a moment apart
