"""The benchmark at a tiny size: it runs, reports every figure, and its ratios hold together. No
absolute timings are asserted: they belong to the machine."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import bench as bench_cli
from inversion.core import runtime

KEYS = {"extract_vs_forward", "orig_vs_cached_conv2", "orig_vs_cached_fc6", "online_vs_cached",
        "matmul_gflops_fp32", "matmul_gflops_bf16", "train_flops_fraction", "write_mb_per_s",
        "decode_img_per_s_1_worker", "decode_img_per_s_2_workers", "decode_scaling_2_workers",
        "extract_rss_ratio_4x", "read_samples_per_s_memory", "read_samples_per_s_hdf5",
        *(f"{key}_{setting}" for key in ("cache_ratio", "extract_img_per_s", "stream_samples_per_s")
          for setting in ("none", "lzf", "blosc2-zstd"))}
PRECISION_KEYS = {f"{key}_{layer}_{precision}" for key in ("train_samples_per_s", "flop_fraction")
                  for layer in ("conv2", "fc6") for precision in ("fp32", "bf16")}


def test_bench_prints_the_json_figures_last():
    result = CliRunner().invoke(bench_cli.app, ["--images", "8", "--batch", "4", "--steps", "1", "--device", "cpu",
                                                 "--window", "0.05", "--fc-width", "64"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    bf16 = {key for key in PRECISION_KEYS if key.endswith("_bf16")}
    native = bf16 <= set(figures)  # the bf16 rates only where the CPU computes bf16 natively
    assert set(figures) == KEYS | PRECISION_KEYS - (set() if native else bf16) | {"device"}
    assert figures["device"].startswith("cpu") and native == (runtime.resolve_precision("auto", torch.device("cpu")) == "bf16")
    assert all(figures[k] > 0 for k in PRECISION_KEYS & set(figures))
    optional = {"matmul_gflops_bf16"}  # null on a CPU without a fast bf16 kernel
    assert all(figures[k] > 0 and math.isfinite(figures[k]) for k in KEYS - optional)
    assert all(figures[k] is None or figures[k] > 0 for k in optional)
    # Post-ReLU features hold zeros even on synthetic images: both filters shrink the cache.
    assert figures["cache_ratio_none"] == 1.0
    assert figures["cache_ratio_lzf"] > 1.1 and figures["cache_ratio_blosc2-zstd"] > 1.1
    # Ratios are the quotients of what they name, and the original conv2 step (AlexNet in the step, a
    # decoder up to 416 px) costs many times the cached one: above 1 on any machine, however loaded.
    assert figures["decode_scaling_2_workers"] == pytest.approx(
        figures["decode_img_per_s_2_workers"] / figures["decode_img_per_s_1_worker"])
    assert figures["orig_vs_cached_conv2"] > 1
