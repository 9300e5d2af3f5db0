"""Train `encoder.arch` here as a classifier on the dataset, for when ImageNet weights cannot be had:
`encoder.weights: auto` then inverts it (docs/encoder-training.md)."""

from pathlib import Path

import typer

from inversion.core import config, console
from inversion.encoder_training import training

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(config_path: Path = console.ConfigOption, overrides: list[str] = console.SetOption,
         fresh: bool = typer.Option(False, "--fresh", help="Ignore an earlier run's checkpoints and start over.")):
    cfg = config.load(config_path, overrides)
    training.train(cfg, fresh=fresh)


if __name__ == "__main__":
    app()
