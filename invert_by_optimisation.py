"""The baseline the decoders beat: invert each layer's cached features by gradient descent on the
image (Mahendran & Vedaldi, CVPR 2015), beside the trained decoder on the same images."""

from pathlib import Path

import typer

from inversion.baseline import optimisation
from inversion.core import config, console

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(config_path: Path = console.ConfigOption, overrides: list[str] = console.SetOption,
         layers: str = console.LayersOption,
         num_images: int = typer.Option(None, "--num-images", min=1,
                                        help="The first N rows of render.py's grid (default render.num_images)."),
         iterations: int = typer.Option(None, "--iterations", min=1,
                                        help="Gradient steps for every layer (default: optimisation.iterations "
                                             "and the layers' own optimisation.layers entries)."),
         fresh: bool = typer.Option(False, "--fresh", help="Recompute layers that are already finished."),
         split: str = typer.Option("eval", "--split",
                                   help="eval, or train to tune optimisation.* away from the eval images.")):
    cfg = config.load(config_path, overrides)
    if iterations:
        cfg = optimisation.with_iterations(cfg, iterations)
    chosen = config.chosen_layers(cfg, layers)
    optimisation.run(cfg, chosen, num_images, fresh, split)


if __name__ == "__main__":
    app()
