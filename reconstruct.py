"""Reconstruct your own pictures from every trained decoder: files or folders, any format Pillow reads."""

from pathlib import Path

import typer

from inversion.core import config, console
from inversion.render import own_images

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(paths: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
         config_path: Path = console.ConfigOption, overrides: list[str] = console.SetOption,
         layers: str = console.LayersOption):
    cfg = config.load(config_path, overrides)
    chosen = config.chosen_layers(cfg, layers)
    own_images.reconstruct(cfg, paths, chosen)


if __name__ == "__main__":
    app()
