"""Stage one: run the frozen encoder once over the split and cache its activations in HDF5."""

from pathlib import Path

import typer
from rich.table import Table

from inversion import config, console, encoder, extraction, feature_cache

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(config_path: Path = console.ConfigOption, overrides: list[str] = console.SetOption,
         list_layers: bool = typer.Option(False, "--list-layers",
                                          help="Print the encoder's graph nodes with their output shapes and exit.")):
    cfg = config.load(config_path, overrides)
    if list_layers:
        print_nodes(cfg)
    else:
        extraction.extract(cfg)


def print_nodes(cfg):
    """Every node `layers` may name, with its output shape at encoder.input_size (network order)."""
    arch, size = cfg["encoder.arch"], cfg["encoder.input_size"]
    names = {node: layer for layer, node in config.ALEXNET_NODES.items()} if arch == "alexnet" else {}
    table = Table(title=f"{arch} graph nodes at {size}x{size} input (a module name, e.g. `layer2`, "
                        f"means its last node)")
    for column in ("node", "layer name", "output shape", f"{cfg['cache.dtype']} bytes/image"):
        table.add_column(column, justify="right" if column.endswith("image") else "left")
    for node, shape in encoder.list_nodes(arch, size):
        tensor = isinstance(shape, tuple)
        table.add_row(node, names.get(node, ""), "x".join(map(str, shape)) if tensor else shape,
                      f"{feature_cache.layer_bytes(shape, cfg['cache.dtype']):,}" if tensor else "")
    console.console.print(table)


if __name__ == "__main__":
    app()
