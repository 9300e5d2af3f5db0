"""The benchmark's timers: one training step of each kind, matmul and decoding rates, cache reads and
writes, FLOP counts and extraction memory, each measured the same way for every row of measurements.py."""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from inversion.core import config, data, encoder, encoder_graph, feature_cache, runtime
from inversion.core.decoders import FC_WIDTH, LEAK, Decoder
from inversion.core.images import to_target
from inversion.extract import cache_writer, extraction
from inversion.train import batching

ORIGINAL_SIZE = {"conv2": 416, "fc6": 128}


def bench_config(tmp, zip_path, per_class, batch, device):
    """The benchmark's config: 8 synthetic classes, `per_class` training images each."""
    path = tmp / "bench.yaml"
    path.write_text("{}\n")
    return config.load(path, [f"data.path={zip_path}", f"cache.dir={tmp}/cache", f"output.dir={tmp}/out",
                              "encoder.weights=random", "split.num_classes=8", "split.eval_per_class=1",
                              f"split.train_per_class={per_class}", f"extract.batch_size={batch}",
                              f"device={device}"])


def forward_rate(model, n, batch, device):
    """A bare AlexNet forward on ready 224x224 tensors: the ceiling for extraction."""
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        model(x)
        sync(device)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            model(x)
            done += batch
        sync(device)
    return done / (time.perf_counter() - t0)


def train_step(model, inputs, target, device, fused=True, precision="fp32"):
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


def cached_step(features, images_u8, device, fc_width, fused=True, precision="fp32"):
    """Ours: features straight from the cache, 64x64 targets."""
    return train_step(Decoder(features.shape[1:], fc_width=fc_width), lambda: features, lambda: to_target(images_u8),
                       device, fused, precision)


def online_step(layer, alexnet, images_u8, device, cfg, fc_width, precision):
    """Our decoder, but with AlexNet run inside the step instead of read from the cache."""
    shape = encoder_graph.feature_shapes("alexnet", cfg["encoder.input_size"], [layer])[layer]
    return train_step(Decoder(shape, fc_width=fc_width), tap(alexnet, images_u8, layer, cfg),
                       lambda: to_target(images_u8), device, precision=precision)


def original_step(layer, alexnet, images_u8, device, cfg, fc_width, precision):
    """The original approach: AlexNet in the step, decoder and targets at 416 or 128 px."""
    shape = encoder_graph.feature_shapes("alexnet", cfg["encoder.input_size"], [layer])[layer]
    size = ORIGINAL_SIZE[layer]
    upscaled = lambda: F.interpolate(to_target(images_u8), size=(size, size), mode="bilinear",
                                     align_corners=False)
    return train_step(original_decoder(shape, fc_width), tap(alexnet, images_u8, layer, cfg), upscaled, device,
                       precision=precision)


def tap(alexnet, images_u8, layer, cfg):
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


def matmul_rate(dtype, device, n=2048, min_seconds=0.5, windows=4):
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
        if dtype != torch.float32 and (2048 / 512) ** 3 * probe_seconds(dtype, device) > 2.0:
            return None
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        a @ b
    except (RuntimeError, TypeError):
        return None
    sync(device)
    best = 0.0
    for _ in range(windows):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_seconds:
            a @ b
            done += 1
            if device.type != "cpu":
                sync(device)
        sync(device)
        best = max(best, 2 * n ** 3 * done / (time.perf_counter() - t0) / 1e9)
    return best


def probe_seconds(dtype, device, n=512):
    a = torch.randn(n, n, device=device).to(dtype)
    a @ a
    sync(device)
    t0 = time.perf_counter()
    a @ a
    sync(device)
    return time.perf_counter() - t0


def train_flops(features, images_u8, device, fc_width, precision="fp32"):
    """Forward + backward FLOPs per sample of a cached training step (matmuls and convolutions,
    as torch's FlopCounterMode counts them; element-wise work and the optimiser are not counted)."""
    model = Decoder(features.shape[1:], fc_width=fc_width).to(device)
    with FlopCounterMode(display=False) as counter, runtime.autocast(device, precision):
        loss = F.mse_loss(model(features.float()).float(), to_target(images_u8))
        loss.backward()
    return counter.get_total_flops() / len(features)


def decode_rate(dataset, members, size, batch, workers, min_seconds=1.0):
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


def bytes_per_image(cache):
    group = cache["train"]
    return sum(group[k][0].nbytes for k in ("images", *config.LAYERS))


def write_seconds(cache, job, path, batch, compression="none"):
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


def step_time(step, steps, device):
    step()  # warm-up: allocations, kernel selection
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def read_rate(cache, layer, batch, mode, device, min_seconds=1.0):
    """Training-input throughput: epochs of shuffled batches, moved to the device, until min_seconds."""
    x, y = batching.inputs(cache, "train", layer, mode == "memory", device)
    rng = np.random.default_rng(0)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        for bx, _, _ in batching.batches(x, y, batch, rng, 1024, device):
            done += len(bx)
    sync(device)
    return done / (time.perf_counter() - t0)


def peak_rss(tmps, zip_path, per_classes, batch):
    """Per folder in `tmps`: (resident memory before, peak resident memory during) the extraction of
    per_class*8 (+8 eval) images, each in a fresh process so nothing else counts; the processes run at
    once (memory, not time, is measured)."""
    code = "import sys; from benchmarks import rates; rates.extraction_memory(*sys.argv[1:])"
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
    cfg = bench_config(Path(tmp), zip_path, int(per_class), int(batch), "cpu")
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
