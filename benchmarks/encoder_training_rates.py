"""How long an epoch of train_encoder.py takes at each input size: AlexNet (200 classes, batch norm added as
training adds it) trained on random batches, bf16 autocast where the CPU has it and fp32, side by side; and
the same steps with their input made as an epoch makes it (augment.training_batch from 64-px uint8 images),
so the share of an epoch that goes into the crops shows.

    python -m benchmarks.encoder_training_rates [--batch 128] [--steps 3]
"""

import time

import torch
import torchvision
import typer

from inversion.core import host, runtime
from inversion.encoder_training import augment, batchnorm

app = typer.Typer(add_completion=False)


@app.command()
def main(batch: int = typer.Option(128, help="Images per step (encoder_training.batch_size)."),
         steps: int = typer.Option(3, help="Timed steps per size, after one warm-up."),
         sizes: str = typer.Option("96,112,128,160,224", help="Input sizes, comma-separated.")):
    host.keep_freed_memory()
    torch.manual_seed(0)
    model = batchnorm.add(torchvision.models.alexnet(num_classes=200)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    device = torch.device("cpu")
    precisions = ["fp32"] + (["bf16"] if runtime.resolve_precision("auto", device) == "bf16" else [])
    print(f"{host.cpu_model()}, {torch.get_num_threads()} threads, batch {batch}, torch {torch.__version__}")
    rates, augmented = {}, {}
    images = torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    for size in map(int, sizes.split(",")):
        for precision in precisions:
            x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 200, (batch,))
            rates[size, precision] = _rate(model, optimizer, lambda: x, y, precision, steps)
            augmented[size, precision] = _rate(model, optimizer, lambda: augment.training_batch(
                images, size, (0.35, 1.0), "alexnet", generator, device).contiguous(memory_format=torch.channels_last),
                y, precision, steps)
        cells = ", ".join(f"{p} {rates[size, p]:,.0f} images/s ({100_000 / rates[size, p] / 60:.1f} min per "
                          f"100,000 images; {augmented[size, p]:,.0f} with the crops made, "
                          f"{100_000 / augmented[size, p] / 60:.1f} min)" for p in precisions)
        ratio = f", bf16 / fp32 {rates[size, 'bf16'] / rates[size, 'fp32']:.2f}x" if "bf16" in precisions else ""
        print(f"{size} px: {cells}{ratio}", flush=True)


def _rate(model, optimizer, make_input, y, precision, steps):
    """Images per second of `steps` forward + backward + SGD steps, after one untimed."""
    device = torch.device("cpu")
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        x = make_input()
        with runtime.autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(y) * steps / (time.perf_counter() - start)

if __name__ == "__main__":
    app()
