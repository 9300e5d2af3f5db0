"""Where code runs and with what: device choice and the library versions stamped on artifacts."""

import os
import platform
import zlib
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import UserError


def pick_device(name="auto"):
    """Under torchrun, `auto` and `cuda` mean this rank's GPU (cuda:LOCAL_RANK)."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {name} requested but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device: mps requested but MPS is not available")
    return torch.device(name)


def cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def versions():
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": metadata.version("torchvision"), "h5py": h5py.__version__, "numpy": np.__version__}


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def autocast(device):
    """bf16 autocast on CUDA (tensor cores); full fp32 elsewhere, where bf16 has no fast kernels."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def derive_seed(seed, name, *stream):
    """One random stream per (seed, name, *stream), e.g. (seed, layer, epoch): what one layer draws does
    not depend on which other layers run, so training one layer alone equals training it with others."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode()), *stream]).generate_state(1)[0])


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
