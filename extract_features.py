"""Stage one: run the frozen encoder once over the split and cache its activations in HDF5."""

from pathlib import Path

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from inversion import config, console, encoder, extraction, feature_cache

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(config_path: Path = console.ConfigOption, overrides: list[str] = console.SetOption,
         list_layers: bool = typer.Option(False, "--list-layers",
                                          help="Print the encoder's graph nodes a decoder can read, with their "
                                               "layouts and output shapes, and exit."),
         all_nodes: bool = typer.Option(False, "--all-nodes",
                                        help="With --list-layers: every node, with why no decoder reads the rest.")):
    cfg = config.load(config_path, overrides)
    if list_layers:
        print_nodes(cfg, all_nodes)
    else:
        extraction.extract(cfg)


def print_nodes(cfg, all_nodes=False):
    """The nodes `layers` may name, with layout and output shape at encoder.input_size (network
    order), on stdout. Never truncated, whatever the terminal: a name is there to be copied."""
    arch, size = cfg["encoder.arch"], cfg["encoder.input_size"]
    names = {node: layer for layer, node in config.ALEXNET_NODES.items()} if arch == "alexnet" else {}
    listed = encoder.list_nodes(arch, size)
    shown = [row for row in listed if all_nodes or row[2]]
    table = Table(box=None, pad_edge=False)
    for column in ("node", "layer name", "layout", "output shape", f"{cfg['cache.dtype']} bytes/image"):
        table.add_column(column, justify="right" if column.endswith("image") else "left", no_wrap=True)
    for node, shape, layout, reason in shown:
        table.add_row(node, names.get(node, ""), encoder.layout_text(shape, layout) if layout else reason,
                      "x".join(map(str, shape)) if shape is not None else "",
                      f"{feature_cache.layer_bytes(shape, cfg['cache.dtype']):,}" if layout else "")
    out = Console(highlight=False)
    out.print(f"{arch} graph nodes at {size}x{size} input (a module name, e.g. `layer2`, means its last node)",
              soft_wrap=True)
    Console(highlight=False, width=Measurement.get(out, out.options.update_width(10**6), table).maximum).print(table)
    hidden = len(listed) - len(shown)
    console.console.print(f"{len(shown)} of {len(listed)} nodes listed"
                          + (f"; {hidden} more are not one per-image tensor in a layout a decoder reads "
                             f"(--all-nodes shows them and why)" if hidden else ""), soft_wrap=True)


if __name__ == "__main__":
    app()
