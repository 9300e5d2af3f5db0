"""How long an epoch of train_encoder.py takes at each input size: AlexNet (200 classes, batch norm added as
training adds it) trained on random batches, bf16 autocast where the CPU has it and fp32, side by side.

    python -m benchmarks.encoder_training_rates [--batch 128] [--steps 3]
"""

import time

import torch
import torchvision
import typer

from inversion.core import host, runtime
from inversion.encoder_training import batchnorm

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
    rates = {}
    for size in map(int, sizes.split(",")):
        for precision in precisions:
            x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 200, (batch,))
            for i in range(steps + 1):
                if i == 1:
                    start = time.perf_counter()
                with runtime.autocast(device, precision):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            rates[size, precision] = batch * steps / (time.perf_counter() - start)
        cells = ", ".join(f"{p} {rates[size, p]:,.0f} images/s ({100_000 / rates[size, p] / 60:.1f} min per "
                          f"100,000 images)" for p in precisions)
        ratio = f", bf16 / fp32 {rates[size, 'bf16'] / rates[size, 'fp32']:.2f}x" if "bf16" in precisions else ""
        print(f"{size} px: {cells}{ratio}", flush=True)


if __name__ == "__main__":
    app()
