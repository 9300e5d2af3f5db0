"""Where and how networks compute: `precision: auto`'s choice, bf16 autocast, the fused optimiser."""

import copy

import pytest
import torch

from inversion.core import host, runtime

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.fixture
def native(monkeypatch):
    """Set whether the CPU has native bf16 (the flags lookup is cached per process: bypassed here)."""
    def set_native(value):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: value)
    return set_native


def steps(optimizer_factory, model, batches, state=None):
    optimizer = optimizer_factory(model.parameters())
    if state:
        optimizer.load_state_dict(state)
    for x in batches:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
    return model, optimizer


def test_auto_is_bf16_on_cuda_and_on_a_cpu_with_native_bf16_else_fp32(native):
    native(True)
    assert runtime.resolve_precision("auto", CPU) == "bf16" and runtime.resolve_precision("auto", CUDA) == "bf16"
    native(False)
    assert runtime.resolve_precision("auto", CPU) == "fp32" and runtime.resolve_precision("auto", CUDA) == "bf16"
    for value in (True, False):
        native(value)
        assert runtime.resolve_precision("fp32", CPU) == runtime.resolve_precision("fp32", CUDA) == "fp32"
        assert runtime.resolve_precision("auto", torch.device("mps")) == "fp32"


def test_forced_bf16_without_native_support_runs_and_warns_once(native, capsys):
    runtime._warn_once.cache_clear()
    native(False)
    assert runtime.resolve_precision("bf16", CPU) == runtime.resolve_precision("bf16", CPU) == "bf16"
    err = capsys.readouterr().err
    assert err.count("precision: bf16 on a CPU without native bf16") == 1 and "slowly" in err
    native(True)
    assert runtime.resolve_precision("bf16", CPU) == "bf16" and capsys.readouterr().err == ""


def test_native_bf16_is_read_from_the_cpu_flags_or_probed_where_torch_has_none(monkeypatch):
    answers = []
    for flags in ({"avx512_bf16": True, "amx_bf16": False}, {"amx_bf16": True}, {"avx512_bf16": False, "avx2": True}):
        monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda flags=flags: flags)
        runtime.cpu_has_native_bf16.cache_clear()
        answers.append(runtime.cpu_has_native_bf16())
    assert answers == [True, True, False]

    def missing():
        raise AttributeError("no such function in this torch")
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", missing)
    monkeypatch.setattr(runtime, "_bf16_probe", lambda: "probed")
    runtime.cpu_has_native_bf16.cache_clear()
    assert runtime.cpu_has_native_bf16() == "probed"
    runtime.cpu_has_native_bf16.cache_clear()  # the real answer for the rest of the process


def test_autocast_computes_in_bf16_only_when_asked():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with runtime.autocast(CPU, "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with runtime.autocast(CPU, "fp32"):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # autocast only: the weights stay fp32


def test_fused_adam_steps_like_the_unfused_one_and_resumes_its_state():
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 4))
    batches = [torch.randn(8, 16) for _ in range(6)]
    fused = lambda params: runtime.adam(params, CPU, lr=1e-2, weight_decay=1e-3)
    unfused = lambda params: runtime.adam(params, CPU, fused=False, lr=1e-2, weight_decay=1e-3)
    assert fused([torch.zeros(1, requires_grad=True)]).defaults["fused"]
    a, _ = steps(fused, copy.deepcopy(start), batches)
    b, _ = steps(unfused, copy.deepcopy(start), batches)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    # an optimizer.pt written by the unfused Adam of earlier versions resumes under the fused one
    half, old = steps(unfused, copy.deepcopy(start), batches[:3])
    resumed, _ = steps(fused, half, batches[3:], copy.deepcopy(old.state_dict()))
    for p, q in zip(resumed.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_the_device_line_names_the_cpu_model_and_the_precision():
    line = runtime.describe_device(CPU, "bf16")
    assert line.startswith(f"cpu ({host.cpu_model()}, ") and line.endswith(", bf16")
    assert runtime.describe_device(CPU) == line[:-len(", bf16")]
