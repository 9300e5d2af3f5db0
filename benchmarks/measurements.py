"""What the cache buys, measured side by side in one process on synthetic Tiny-ImageNet-shaped data.

Every figure is a ratio of two timings taken here, now, on the same machine, so it holds on a noisy
one. The "original" approach follows the first public PyTorch implementation of this experiment:
AlexNet runs inside every training step and the decoder grows to 416x416 (conv2) or 128x128 (fc)
against targets upscaled from 64x64.
"""

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from rich.table import Table

from benchmarks import rates
from inversion.core import config, feature_cache, host, runtime, synthetic
from inversion.core.console import console
from inversion.core.decoders import FC_WIDTH
from inversion.extract import extraction


def run(images=512, batch=64, steps=5, device="auto", window=1.0, fc_width=FC_WIDTH):
    """Every measurement; `window` is the seconds each throughput timing runs (shorter: noisier);
    `fc_width` sizes the fc decoders (the paper's 4096 by default; a smoke test runs them tiny)."""
    device = runtime.pick_device(device)
    host.keep_freed_memory()  # as training does
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        classes = 8
        per_class = max(1, images // classes)
        zip_path = synthetic.write_zip(tmp / "tiny.zip", classes, per_class, 1)
        cfg = rates.bench_config(tmp, zip_path, per_class, batch, device)
        n = classes * (per_class + 1)
        console.print(f"bench: {n} synthetic 64x64 images, batch {batch}, {steps} timed steps, "
                      f"on {runtime.describe_device(device)}")
        b = SimpleNamespace(cfg=cfg, tmp=tmp, n=n, batch=batch, steps=steps, device=device, window=window,
                            fc_width=fc_width, rows=[], out={},
                            precision=runtime.resolve_precision("auto", device))  # what training computes in
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rate = b.out[f"matmul_gflops_{name}"] = rates.matmul_rate(dtype, device, min_seconds=window / 2)
            b.rows.append((f"dense matmul 2048x2048, {name} (`matmul_gflops_{name}`)",
                           "no fast kernel here" if rate is None else f"{rate:,.0f} GFLOP/s", None, ""))
        job = _extraction(b)
        with feature_cache.open_for(cfg, config.LAYERS) as cache:
            cached = _training_steps(b, cache, job.model.to(device))
            _cache_io(b, cache, job, cached)
        _decoding(b, job)
        big_zip = synthetic.write_zip(tmp / "tiny4.zip", classes, 4 * per_class, 1)
        (base1, small), (base4, large) = rates.peak_rss([tmp / "rss1", tmp / "rss4"], big_zip, [per_class, 4 * per_class], batch)
        b.out["extract_rss_ratio_4x"] = large / small
        b.rows.append((f"extraction peak RSS, 4N vs N = {n} images",
                       f"{large / 2**20:,.0f} vs {small / 2**20:,.0f} MiB (growth: "
                       f"{(large - base4) / 2**20:,.0f} vs {(small - base1) / 2**20:,.0f} MiB)",
                       b.out["extract_rss_ratio_4x"], "< 1.2"))
        b.out["device"] = runtime.describe_device(device)
    _table(b.rows, n, batch)
    return b.out


def _extraction(b):
    """Extraction of the bench's images against a bare forward of the same encoder; returns the job."""
    job = extraction.prepare(b.cfg)
    t0 = time.perf_counter()
    extraction.build(b.cfg, job)
    b.extract_rate = b.n / (time.perf_counter() - t0)
    forward_rate = rates.forward_rate(job.model.to(b.device), b.n, b.batch, b.device)
    b.out["extract_vs_forward"] = b.extract_rate / forward_rate
    b.rows.append(("extraction vs bare AlexNet forward", f"{b.extract_rate:,.1f} vs {forward_rate:,.1f} img/s",
                   b.out["extract_vs_forward"], ">= 0.9"))
    return job


def _training_steps(b, cache, alexnet):
    """Cached training steps: their FLOP rate, and against the original and the online approach.
    Returns {layer: seconds per cached step}."""
    device, batch, steps, out, rows = b.device, b.batch, b.steps, b.out, b.rows
    data = {layer: torch.from_numpy(cache["train"][layer][:batch]).to(device) for layer in config.LAYERS}
    images_u8 = torch.from_numpy(cache["train"]["images"][:batch]).to(device)
    fc_width = b.fc_width
    precision = b.precision
    cached = {layer: rates.step_time(rates.cached_step(data[layer], images_u8, device, fc_width, precision=precision),
                                steps, device)
              for layer in config.LAYERS}
    peak = out[f"matmul_gflops_{precision}"]
    for layer in config.LAYERS:
        flops = rates.train_flops(data[layer], images_u8, device, fc_width, precision)
        rate = flops * batch / cached[layer] / 1e9
        if layer == "conv2":
            out["train_flops_fraction"] = rate / peak
        rows.append((f"{layer}: training FLOP rate vs {precision} matmul"
                     + (" (`train_flops_fraction`)" if layer == "conv2" else ""),
                     f"{flops / 1e6:,.0f} MFLOP/sample x {batch / cached[layer]:,.0f} samples/s = "
                     f"{rate:,.0f} vs {peak:,.0f} GFLOP/s", rate / peak, ">= 0.7" if layer == "conv2" else ""))
    for layer, goal in (("conv2", 20), ("fc6", 3)):
        original = rates.step_time(rates.original_step(layer, alexnet, images_u8, device, b.cfg, fc_width, precision), steps, device)
        out[f"orig_vs_cached_{layer}"] = original / cached[layer]
        rows.append((f"{layer}: original step vs cached step", f"{original * 1e3:,.0f} vs {cached[layer] * 1e3:,.0f} ms",
                     out[f"orig_vs_cached_{layer}"], f">= {goal}"))
    online = {}
    for layer in config.LAYERS:
        t = rates.step_time(rates.online_step(layer, alexnet, images_u8, device, b.cfg, fc_width, precision), steps, device)
        online[layer] = t / cached[layer]
        rows.append((f"{layer}: online step vs cached step", f"{t * 1e3:,.0f} vs {cached[layer] * 1e3:,.0f} ms",
                     online[layer], ">= 2"))
    out["online_vs_cached"] = min(online.values())
    unfused = rates.step_time(rates.cached_step(data["fc6"], images_u8, device, fc_width, fused=False, precision=precision),
                         steps, device)
    rows.append(("fc6 cached step: for-each Adam vs fused Adam (the default)",
                 f"{unfused * 1e3:,.0f} vs {cached['fc6'] * 1e3:,.0f} ms", unfused / cached["fc6"], ""))
    _precision_rows(b, data, images_u8)
    return cached


def _precision_rows(b, data, images_u8):
    """conv2's and fc6's cached steps in every precision this device computes natively, each FLOP rate
    against that precision's own matmul ceiling: what `precision: auto` buys, and what is left."""
    natives = [name for name in ("fp32", "bf16") if b.out.get(f"matmul_gflops_{name}")
               and (name == "fp32" or runtime.resolve_precision("auto", b.device) == "bf16")]
    for layer in ("conv2", "fc6"):
        flops = {}
        for precision in natives:
            seconds = rates.step_time(rates.cached_step(data[layer], images_u8, b.device, b.fc_width, precision=precision),
                                 b.steps, b.device)
            rate = b.out[f"train_samples_per_s_{layer}_{precision}"] = b.batch / seconds
            flops[precision] = rates.train_flops(data[layer], images_u8, b.device, b.fc_width, precision) * rate / 1e9
            fraction = b.out[f"flop_fraction_{layer}_{precision}"] = flops[precision] / b.out[f"matmul_gflops_{precision}"]
            b.rows.append((f"{layer}: {precision} training step (`train_samples_per_s_{layer}_{precision}`; ratio: "
                           f"`flop_fraction_{layer}_{precision}`)",
                           f"{rate:,.0f} samples/s, {flops[precision]:,.0f} GFLOP/s", fraction, ""))


def _cache_io(b, cache, job, cached):
    """Reading training batches, and writing the cache with every compression setting."""
    for mode in ("memory", "hdf5"):
        rate = b.out[f"read_samples_per_s_{mode}"] = rates.read_rate(cache, "conv2", b.batch, mode, b.device, b.window)
        b.rows.append((f"read conv2 training batches ({'in memory' if mode == 'memory' else 'streamed from HDF5'})",
                       f"{rate:,.0f} samples/s", None, ""))
    written = {setting: rates.write_seconds(cache, job, b.tmp / f"write-{setting}.h5", b.batch, setting)
               for setting in feature_cache.COMPRESSIONS}
    train_n = len(cache["train"]["images"])
    rate = b.out["write_mb_per_s"] = train_n * rates.bytes_per_image(cache) / written["none"] / 1e6
    b.rows.append(("cache writer, HDF5 (`write_mb_per_s`)",
                   f"{rate:,.0f} MB/s (extraction above needs {b.extract_rate * rates.bytes_per_image(cache) / 1e6:,.1f})",
                   None, ""))
    b.rows += _compression_rows(b, written, b.n / b.extract_rate, train_n, cached)


def _decoding(b, job):
    per_second = {}
    for workers in (1, 2):
        per_second[workers] = b.out[f"decode_img_per_s_{workers}_worker{'s' if workers > 1 else ''}"] = \
            rates.decode_rate(job.dataset, [m for m, _ in job.split.train + job.split.eval],
                              b.cfg["data.image_size"], b.batch, workers, b.window)
    b.out["decode_scaling_2_workers"] = per_second[2] / per_second[1]
    b.rows.append(("JPEG decode from the zip, 1 vs 2 workers (`decode_scaling_2_workers`)",
                   f"{per_second[1]:,.0f} vs {per_second[2]:,.0f} img/s", b.out["decode_scaling_2_workers"], ">= 1.6"))


def _compression_rows(b, written, extract_seconds, train_n, cached):
    """Per cache.compression setting, from the training split written again with it: file size
    against the uncompressed one, extraction images/s (the uncompressed extraction plus the extra
    writer time, scaled to all n images), and training input streamed from it against the steps
    it feeds (conv2 in the keys, the tightest layer in the table)."""
    out, n, batch = b.out, b.n, b.batch
    rows, base = [], b.tmp / "write-none.h5"
    for setting, seconds in written.items():
        path = b.tmp / f"write-{setting}.h5"
        ratio = out[f"cache_ratio_{setting}"] = base.stat().st_size / path.stat().st_size
        extract = out[f"extract_img_per_s_{setting}"] = n / (extract_seconds + (seconds - written["none"]) * n / train_n)
        with feature_cache.Cache(path, feature_cache.read_attrs(path)) as cache:
            per_image = {name: ds.id.get_storage_size() / train_n for name, ds in cache["train"].items()
                         if name in ("images", *config.LAYERS)}
            stream = {layer: rates.read_rate(cache, layer, batch, "hdf5", b.device, b.window) for layer in config.LAYERS}
        out[f"stream_samples_per_s_{setting}"] = stream["conv2"]
        tight = min(config.LAYERS, key=lambda layer: stream[layer] * cached[layer] / batch)
        rows.append((f"cache.compression={setting}: size ratio (`cache_ratio_{setting}`), extraction",
                     f"{sum(per_image.values()) / 1024:,.1f} KiB/image ("
                     + ", ".join(f"{k} {v / 1024:,.1f}" for k, v in per_image.items())
                     + f"), {extract:,.1f} img/s", ratio, ">= 2" if setting != "none" else ""))
        tightest = "" if tight == "conv2" else f"; {tight} (tightest) {stream[tight]:,.0f} vs {batch / cached[tight]:,.0f}"
        rows.append((f"cache.compression={setting}: streamed read (`stream_samples_per_s_{setting}`: conv2) "
                     f"vs the training step", f"conv2 {stream['conv2']:,.0f} vs {batch / cached['conv2']:,.0f} "
                     f"samples/s{tightest}", stream[tight] * cached[tight] / batch, ">= 1"))
    return rows


def _table(rows, n, batch):
    table = Table(title=f"bench ({n} images, batch {batch})")
    for column in ("measure", "timings", "ratio", "goal"):
        table.add_column(column, justify="left" if column in ("measure", "timings") else "right")
    for measure, timings, ratio, goal in rows:
        table.add_row(measure, timings, "" if ratio is None else f"{ratio:.2f}", goal)
    console.print(table)
