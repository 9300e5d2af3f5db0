"""Where and how networks compute: the device, the precision (bf16 autocast where it is native) and the
optimiser's fused update."""

import functools
import os
import time

import torch

from inversion.core import host
from inversion.core.console import warn
from inversion.core.errors import UserError


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


def describe_device(device, precision=None):
    """The log line's device, with the precision it computes in where one is given."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({host.cpu_model()}, {torch.get_num_threads()} threads)"
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


@functools.lru_cache(maxsize=None)
def _warn_once(message):
    warn(message)
