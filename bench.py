"""Benchmarks: what the feature cache buys. Prints a table, then one JSON object as its last line."""

import json

import typer

from benchmarks import measurements
from inversion.core import console

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(images: int = typer.Option(512, help="Synthetic training images (8 classes)."),
         batch: int = typer.Option(64, help="Batch size for every measurement."),
         steps: int = typer.Option(5, help="Timed training steps per measurement (after one warm-up)."),
         device: str = typer.Option("auto", help="auto, cpu, cuda, mps."),
         window: float = typer.Option(1.0, min=0.01, help="Seconds each throughput timing runs."),
         fc_width: int = typer.Option(4096, help="Units of the fc decoders' fc layers (decoder.fc_width).")):
    print(json.dumps(measurements.run(images, batch, steps, device, window, fc_width)))


if __name__ == "__main__":
    app()
