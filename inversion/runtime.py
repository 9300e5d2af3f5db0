"""Where code runs and with what: device choice and the library versions stamped on artifacts."""

import ctypes
import functools
import os
import platform
import time
import zlib
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np
import torch

from .console import warn
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


def describe_device(device, precision=None):
    """The log line's device, with the precision it computes in where one is given."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({cpu_model()}, {torch.get_num_threads()} threads)"
    return f"{name}, {precision}" if precision else name


# `precision: auto` on the CPU: bf16 only where the CPU has bf16 dot-product instructions (AVX512-BF16 or
# AMX-BF16). Elsewhere oneDNN emulates bf16 and a matmul runs 5-10x slower than fp32 (docs/performance.md).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(setting, device):
    """`precision` (auto | fp32 | bf16) -> what this device computes in: "bf16" or "fp32". `auto` is bf16 on
    CUDA and on CPUs with native bf16, else fp32; a forced bf16 on a CPU without it runs, with one warning."""
    if setting == "fp32" or device.type not in ("cpu", "cuda"):
        return "fp32"  # MPS: autocast's bf16 support there is partial; fp32 is the safe default
    if device.type == "cuda" or cpu_has_native_bf16():
        return "bf16"
    if setting == "bf16":
        _warn_once("precision: bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX-BF16): it runs, "
                   "but slowly (emulated); precision: auto picks fp32 here")
        return "bf16"
    return "fp32"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16():
    """The CPU's flags as torch's cpuinfo reads them (one lookup, no timing, so a busy machine decides as an
    idle one would); a short timed matmul probe only where this torch does not expose the flags."""
    try:
        flags = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return _bf16_probe()
    return any(flags.get(flag, False) for flag in NATIVE_BF16_FLAGS)


def _bf16_probe(n=512, repeats=5):
    """bf16 matmul at least 1.5x fp32's rate (emulated bf16 is several times slower than fp32)."""
    def best(dtype):
        a = torch.randn(n, n).to(dtype)
        a @ a
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(torch.float32) / best(torch.bfloat16) >= 1.5


def autocast(device, precision="fp32"):
    """bf16 autocast where `precision` (resolve_precision's answer) says bf16; weights, gradients and optimiser
    state stay fp32, so a checkpoint trained under one precision resumes and renders under the other."""
    return torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu", dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def adam(parameters, device, fused=True, **options):
    """Adam with PyTorch's fused kernel where it has one (CPU and CUDA): one pass over parameters, gradients
    and moments instead of a dozen, 2-5x faster on the fc decoders' 51 M parameters (docs/performance.md)."""
    return torch.optim.Adam(parameters, fused=fused and device.type in ("cpu", "cuda"), **options)


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


@functools.lru_cache(maxsize=None)
def _warn_once(message):
    warn(message)


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
