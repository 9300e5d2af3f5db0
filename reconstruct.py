"""Reconstruct your own pictures from every trained decoder: files or folders, any format Pillow reads."""

from pathlib import Path

import typer

from inversion import config, console, own_images

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(paths: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
         config_path: Path = console.ConfigOption, overrides: list[str] = console.SetOption,
         layers: str = typer.Option(None, "--layers", help="Comma-separated subset of `layers`, e.g. conv2,fc8.")):
    cfg = config.load(config_path, overrides)
    chosen = layers.split(",") if layers else None
    config.check_layers(cfg, chosen or [], "--layers")
    own_images.reconstruct(cfg, paths, chosen)


if __name__ == "__main__":
    app()
