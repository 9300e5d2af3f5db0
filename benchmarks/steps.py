"""What the cache buys, measured side by side in one process on synthetic Tiny-ImageNet-shaped data.

Every figure is a ratio of two timings taken here, now, on the same machine, so it holds on a noisy
one. The "original" approach follows the first public PyTorch implementation of this experiment:
AlexNet runs inside every training step and the decoder grows to 416x416 (conv2) or 128x128 (fc)
against targets upscaled from 64x64.
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from inversion.core import config, data, encoder, encoder_graph, feature_cache, host, runtime, synthetic
from inversion.core.console import console
from inversion.core.decoders import FC_WIDTH, LEAK, Decoder
from inversion.core.images import to_target
from inversion.extract import cache_writer, extraction
from inversion.train import batching

ORIGINAL_SIZE = {"conv2": 416, "fc6": 128}


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
        cfg = _cfg(tmp, zip_path, per_class, batch, device)
        n = classes * (per_class + 1)
        console.print(f"bench: {n} synthetic 64x64 images, batch {batch}, {steps} timed steps, "
                      f"on {runtime.describe_device(device)}")
        b = SimpleNamespace(cfg=cfg, tmp=tmp, n=n, batch=batch, steps=steps, device=device, window=window,
                            fc_width=fc_width, rows=[], out={},
                            precision=runtime.resolve_precision("auto", device))  # what training computes in
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rate = b.out[f"matmul_gflops_{name}"] = _matmul_rate(dtype, device, min_seconds=window / 2)
            b.rows.append((f"dense matmul 2048x2048, {name} (`matmul_gflops_{name}`)",
                           "no fast kernel here" if rate is None else f"{rate:,.0f} GFLOP/s", None, ""))
        job = _extraction(b)
        with feature_cache.open_for(cfg, config.LAYERS) as cache:
            cached = _training_steps(b, cache, job.model.to(device))
            _cache_io(b, cache, job, cached)
        _decoding(b, job)
        big_zip = synthetic.write_zip(tmp / "tiny4.zip", classes, 4 * per_class, 1)
        (base1, small), (base4, large) = _peak_rss([tmp / "rss1", tmp / "rss4"], big_zip, [per_class, 4 * per_class], batch)
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
    forward_rate = _forward_rate(job.model.to(b.device), b.n, b.batch, b.device)
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
    cached = {layer: _step_time(_cached_step(data[layer], images_u8, device, fc_width, precision=precision),
                                steps, device)
              for layer in config.LAYERS}
    peak = out[f"matmul_gflops_{precision}"]
    for layer in config.LAYERS:
        flops = _train_flops(data[layer], images_u8, device, fc_width, precision)
        rate = flops * batch / cached[layer] / 1e9
        if layer == "conv2":
            out["train_flops_fraction"] = rate / peak
        rows.append((f"{layer}: training FLOP rate vs {precision} matmul"
                     + (" (`train_flops_fraction`)" if layer == "conv2" else ""),
                     f"{flops / 1e6:,.0f} MFLOP/sample x {batch / cached[layer]:,.0f} samples/s = "
                     f"{rate:,.0f} vs {peak:,.0f} GFLOP/s", rate / peak, ">= 0.7" if layer == "conv2" else ""))
    for layer, goal in (("conv2", 20), ("fc6", 3)):
        original = _step_time(_original_step(layer, alexnet, images_u8, device, b.cfg, fc_width, precision), steps, device)
        out[f"orig_vs_cached_{layer}"] = original / cached[layer]
        rows.append((f"{layer}: original step vs cached step", f"{original * 1e3:,.0f} vs {cached[layer] * 1e3:,.0f} ms",
                     out[f"orig_vs_cached_{layer}"], f">= {goal}"))
    online = {}
    for layer in config.LAYERS:
        t = _step_time(_online_step(layer, alexnet, images_u8, device, b.cfg, fc_width, precision), steps, device)
        online[layer] = t / cached[layer]
        rows.append((f"{layer}: online step vs cached step", f"{t * 1e3:,.0f} vs {cached[layer] * 1e3:,.0f} ms",
                     online[layer], ">= 2"))
    out["online_vs_cached"] = min(online.values())
    unfused = _step_time(_cached_step(data["fc6"], images_u8, device, fc_width, fused=False, precision=precision),
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
            seconds = _step_time(_cached_step(data[layer], images_u8, b.device, b.fc_width, precision=precision),
                                 b.steps, b.device)
            rate = b.out[f"train_samples_per_s_{layer}_{precision}"] = b.batch / seconds
            flops[precision] = _train_flops(data[layer], images_u8, b.device, b.fc_width, precision) * rate / 1e9
            fraction = b.out[f"flop_fraction_{layer}_{precision}"] = flops[precision] / b.out[f"matmul_gflops_{precision}"]
            b.rows.append((f"{layer}: {precision} training step (`train_samples_per_s_{layer}_{precision}`; ratio: "
                           f"`flop_fraction_{layer}_{precision}`)",
                           f"{rate:,.0f} samples/s, {flops[precision]:,.0f} GFLOP/s", fraction, ""))


def _cache_io(b, cache, job, cached):
    """Reading training batches, and writing the cache with every compression setting."""
    for mode in ("memory", "hdf5"):
        rate = b.out[f"read_samples_per_s_{mode}"] = _read_rate(cache, "conv2", b.batch, mode, b.device, b.window)
        b.rows.append((f"read conv2 training batches ({'in memory' if mode == 'memory' else 'streamed from HDF5'})",
                       f"{rate:,.0f} samples/s", None, ""))
    written = {setting: _write_seconds(cache, job, b.tmp / f"write-{setting}.h5", b.batch, setting)
               for setting in feature_cache.COMPRESSIONS}
    train_n = len(cache["train"]["images"])
    rate = b.out["write_mb_per_s"] = train_n * _bytes_per_image(cache) / written["none"] / 1e6
    b.rows.append(("cache writer, HDF5 (`write_mb_per_s`)",
                   f"{rate:,.0f} MB/s (extraction above needs {b.extract_rate * _bytes_per_image(cache) / 1e6:,.1f})",
                   None, ""))
    b.rows += _compression_rows(b, written, b.n / b.extract_rate, train_n, cached)


def _decoding(b, job):
    rates = {}
    for workers in (1, 2):
        rates[workers] = b.out[f"decode_img_per_s_{workers}_worker{'s' if workers > 1 else ''}"] = \
            _decode_rate(job.dataset, [m for m, _ in job.split.train + job.split.eval],
                         b.cfg["data.image_size"], b.batch, workers, b.window)
    b.out["decode_scaling_2_workers"] = rates[2] / rates[1]
    b.rows.append(("JPEG decode from the zip, 1 vs 2 workers (`decode_scaling_2_workers`)",
                   f"{rates[1]:,.0f} vs {rates[2]:,.0f} img/s", b.out["decode_scaling_2_workers"], ">= 1.6"))


def _cfg(tmp, zip_path, per_class, batch, device):
    path = tmp / "bench.yaml"
    path.write_text("{}\n")
    return config.load(path, [f"data.path={zip_path}", f"cache.dir={tmp}/cache", f"output.dir={tmp}/out",
                              "encoder.weights=random", "split.num_classes=8", "split.eval_per_class=1",
                              f"split.train_per_class={per_class}", f"extract.batch_size={batch}",
                              f"device={device}"])


def _forward_rate(model, n, batch, device):
    """A bare AlexNet forward on ready 224x224 tensors: the ceiling for extraction."""
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        model(x)
        _sync(device)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            model(x)
            done += batch
        _sync(device)
    return done / (time.perf_counter() - t0)


def _train_step(model, inputs, target, device, fused=True, precision="fp32"):
    """One decoder training step; `inputs` and `target` are recomputed inside it, as a pipeline would."""
    model = model.to(device)
    opt = runtime.adam(model.parameters(), device, fused, lr=1e-4)

    def step():
        with torch.no_grad():
            x, y = inputs(), target()
        with runtime.autocast(device, precision):
            loss = F.mse_loss(model(x.float()).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _cached_step(features, images_u8, device, fc_width, fused=True, precision="fp32"):
    """Ours: features straight from the cache, 64x64 targets."""
    return _train_step(Decoder(features.shape[1:], fc_width=fc_width), lambda: features, lambda: to_target(images_u8),
                       device, fused, precision)


def _online_step(layer, alexnet, images_u8, device, cfg, fc_width, precision):
    """Our decoder, but with AlexNet run inside the step instead of read from the cache."""
    shape = encoder_graph.feature_shapes("alexnet", cfg["encoder.input_size"], [layer])[layer]
    return _train_step(Decoder(shape, fc_width=fc_width), _tap(alexnet, images_u8, layer, cfg),
                       lambda: to_target(images_u8), device, precision=precision)


def _original_step(layer, alexnet, images_u8, device, cfg, fc_width, precision):
    """The original approach: AlexNet in the step, decoder and targets at 416 or 128 px."""
    shape = encoder_graph.feature_shapes("alexnet", cfg["encoder.input_size"], [layer])[layer]
    size = ORIGINAL_SIZE[layer]
    upscaled = lambda: F.interpolate(to_target(images_u8), size=(size, size), mode="bilinear",
                                     align_corners=False)
    return _train_step(original_decoder(shape, fc_width), _tap(alexnet, images_u8, layer, cfg), upscaled, device,
                       precision=precision)


def _tap(alexnet, images_u8, layer, cfg):
    """AlexNet's forward to `layer`, traced once, as a function to run inside every step."""
    taps = encoder_graph.extractor(alexnet, "alexnet", [layer])
    return lambda: taps(encoder.preprocess(images_u8, cfg["encoder.input_size"]))[layer]


def original_decoder(shape, fc_width=FC_WIDTH):
    """The original implementation's halved decoder: 5 up-convolutions from the feature grid
    (13 -> 416 for conv2, 4 -> 128 for fc), leaky ReLU on every layer including the output."""
    layers = []
    if len(shape) == 1:
        layers += [nn.Linear(shape[0], fc_width), nn.LeakyReLU(LEAK), nn.Linear(fc_width, fc_width), nn.LeakyReLU(LEAK),
                   nn.Linear(fc_width, fc_width), nn.LeakyReLU(LEAK), nn.Unflatten(1, (fc_width // 16, 4, 4))]
        channels = fc_width // 16
    else:
        channels = shape[0]
        for _ in range(3):
            layers += [nn.Conv2d(channels, 128, 3, padding=1), nn.LeakyReLU(LEAK)]
            channels = 128
    for out in (128, 64, 32, 16, 3):
        layers += [nn.ConvTranspose2d(channels, out, 5, 2, 2, output_padding=1), nn.LeakyReLU(LEAK)]
        channels = out
    return nn.Sequential(*layers)


def _matmul_rate(dtype, device, n=2048, min_seconds=0.5, windows=4):
    """GFLOP/s of an n x n matmul after a warm-up, the best of `windows` timings of `min_seconds`:
    the machine's dense ceiling. (One 1-second window read 65 GFLOP/s on a shared 2-core VM whose
    ceiling, timed again minutes later, was 106-118, and put the conv2 step's fraction above 1.)
    None where the device has no such dtype, or only a slow fallback: a CPU without AVX-512 BF16
    or AMX ran a 2048 bf16 matmul at 0.13-0.27 GFLOP/s (minutes), so a 512 probe that projects more
    than 2 s for one 2048 matmul (under ~9 GFLOP/s) rules it out. (A probe relative to fp32's was
    fooled by load.)"""
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return None
    try:
        if dtype != torch.float32 and (2048 / 512) ** 3 * _probe_seconds(dtype, device) > 2.0:
            return None
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        a @ b
    except (RuntimeError, TypeError):
        return None
    _sync(device)
    best = 0.0
    for _ in range(windows):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_seconds:
            a @ b
            done += 1
            if device.type != "cpu":
                _sync(device)
        _sync(device)
        best = max(best, 2 * n ** 3 * done / (time.perf_counter() - t0) / 1e9)
    return best


def _probe_seconds(dtype, device, n=512):
    a = torch.randn(n, n, device=device).to(dtype)
    a @ a
    _sync(device)
    t0 = time.perf_counter()
    a @ a
    _sync(device)
    return time.perf_counter() - t0


def _train_flops(features, images_u8, device, fc_width, precision="fp32"):
    """Forward + backward FLOPs per sample of a cached training step (matmuls and convolutions,
    as torch's FlopCounterMode counts them; element-wise work and the optimiser are not counted)."""
    model = Decoder(features.shape[1:], fc_width=fc_width).to(device)
    with FlopCounterMode(display=False) as counter, runtime.autocast(device, precision):
        loss = F.mse_loss(model(features.float()).float(), to_target(images_u8))
        loss.backward()
    return counter.get_total_flops() / len(features)


def _decode_rate(dataset, members, size, batch, workers, min_seconds=1.0):
    """Images/s decoded from the dataset alone (read + JPEG decode + resize), `workers` at a time,
    after one warm-up round that starts the workers."""
    batches = [members[i:i + batch] for i in range(0, len(members), batch)]
    with data.BatchDecoder(dataset, size, workers) as decoder:
        for _ in decoder.map(batches[:workers]):
            pass
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_seconds:
            for images in decoder.map(batches):
                done += len(images)
    return done / (time.perf_counter() - t0)


def _bytes_per_image(cache):
    group = cache["train"]
    return sum(group[k][0].nbytes for k in ("images", *config.LAYERS))


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
            stream = {layer: _read_rate(cache, layer, batch, "hdf5", b.device, b.window) for layer in config.LAYERS}
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


def _write_seconds(cache, job, path, batch, compression="none"):
    """Seconds the cache writer takes to store the bench's training images and features again,
    batch by batch, into a new file with this compression, flushed as extraction does."""
    group = cache["train"]
    n = len(group["images"])
    shapes = {layer: group[layer].shape[1:] for layer in config.LAYERS}
    meta = {name: ([0] * n, ["x"] * n, ["x"] * n) for name in feature_cache.SPLITS}  # eval stays empty
    arrays = {k: group[k][()] for k in ("images", *config.LAYERS)}
    writer = cache_writer.Writer(path, job.attrs, meta, shapes, group["conv2"].dtype, arrays["images"].shape[1],
                                  compression)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        writer.write("train", start, arrays["images"][start:stop],
                     {layer: arrays[layer][start:stop] for layer in config.LAYERS})
    writer.finish()
    return time.perf_counter() - t0


def _step_time(step, steps, device):
    step()  # warm-up: allocations, kernel selection
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _read_rate(cache, layer, batch, mode, device, min_seconds=1.0):
    """Training-input throughput: epochs of shuffled batches, moved to the device, until min_seconds."""
    x, y = batching.inputs(cache, "train", layer, mode == "memory", device)
    rng = np.random.default_rng(0)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        for bx, _, _ in batching.batches(x, y, batch, rng, 1024, device):
            done += len(bx)
    _sync(device)
    return done / (time.perf_counter() - t0)


def _peak_rss(tmps, zip_path, per_classes, batch):
    """Per folder in `tmps`: (resident memory before, peak resident memory during) the extraction of
    per_class*8 (+8 eval) images, each in a fresh process so nothing else counts; the processes run at
    once (memory, not time, is measured)."""
    code = "import sys; from benchmarks import steps; steps.extraction_memory(*sys.argv[1:])"
    runs = []
    for tmp, per_class in zip(tmps, per_classes):
        tmp.mkdir()
        runs.append(subprocess.Popen([sys.executable, "-c", code, str(tmp), str(zip_path), str(per_class), str(batch)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parent.parent))
    results = []
    for run in runs:
        out, err = run.communicate()
        if run.returncode:
            raise RuntimeError(f"bench: the extraction-memory process failed:\n{err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def extraction_memory(tmp, zip_path, per_class, batch):
    """Child of _peak_rss. Linux's peak-RSS counter (VmHWM) is reset after start-up (imports,
    split, encoder), so the peak is the extraction's own; elsewhere ru_maxrss stands in."""
    cfg = _cfg(Path(tmp), zip_path, int(per_class), int(batch), "cpu")
    job = extraction.prepare(cfg)
    status = Path("/proc/self/status")
    if status.exists():
        Path("/proc/self/clear_refs").write_text("5")
        read = lambda key: int(next(l for l in status.read_text().splitlines() if l.startswith(key)).split()[1])
        before = read("VmRSS:")
        extraction.build(cfg, job)
        peak = read("VmHWM:")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        extraction.build(cfg, job)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps([before * 1024, peak * 1024]))  # both counters are in KiB


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _table(rows, n, batch):
    table = Table(title=f"bench ({n} images, batch {batch})")
    for column in ("measure", "timings", "ratio", "goal"):
        table.add_column(column, justify="left" if column in ("measure", "timings") else "right")
    for measure, timings, ratio, goal in rows:
        table.add_row(measure, timings, "" if ratio is None else f"{ratio:.2f}", goal)
    console.print(table)
