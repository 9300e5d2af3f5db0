"""The machine a run is on, as artifacts and timings record it: cores, available RAM, the CPU model, the
library versions; and how glibc hands memory back, which a training step's speed depends on."""

import ctypes
import functools
import os
import platform
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np
import torch


def cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_ram():
    """Linux's MemAvailable (free plus reclaimable page cache). MemFree shrinks as the page cache fills,
    so on a busy machine a split that fits would be streamed instead of loaded, which changes the batch
    order and so the training history."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


@functools.lru_cache(maxsize=1)
def cpu_model():
    """The CPU's model name (timings depend on it), from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions():
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": metadata.version("torchvision"), "h5py": h5py.__version__, "numpy": np.__version__}


@functools.lru_cache(maxsize=1)
def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing every large block back to the kernel.
    A training step allocates its gradients and bf16 weight copies anew (tens of MB each); by default each
    comes from a fresh mmap whose pages fault in one by one: 55,000-100,000 page faults a step for an fc
    decoder, a third to half of its time (docs/performance.md). The price: the process keeps its peak
    memory until it exits. True where it took effect (glibc), False elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # mallopt parameters from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)
                    and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):
        return False
