"""Figures, metrics.json and results.md from the feature cache and decoder checkpoints alone."""

from pathlib import Path

import typer

from inversion.core import config, console
from inversion.render import report

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(config_path: Path = console.ConfigOption, overrides: list[str] = console.SetOption,
         layers: str = console.LayersOption,
         num_images: int = typer.Option(None, "--num-images", min=1, help="Rows of the comparison grid.")):
    cfg = config.load(config_path, overrides)
    chosen = config.chosen_layers(cfg, layers)
    report.render(cfg, chosen, num_images)


if __name__ == "__main__":
    app()
