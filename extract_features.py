"""Stage one: run the frozen AlexNet once over the split and cache its activations in HDF5."""

from pathlib import Path

import typer

from inversion import config, console, extraction

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(config_path: Path = console.ConfigOption, overrides: list[str] = console.SetOption):
    extraction.extract(config.load(config_path, overrides))


if __name__ == "__main__":
    app()
