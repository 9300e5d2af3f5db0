"""Stage one: run the frozen encoder once over the split and cache its activations in HDF5."""

from pathlib import Path

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from inversion.core import config, console, encoder, encoder_graph, feature_cache, storage
from inversion.core.layouts import ALEXNET_NODES, layout_text
from inversion.extract import extraction

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(config_path: Path = console.ConfigOption, overrides: list[str] = console.SetOption,
         list_layers: bool = typer.Option(False, "--list-layers",
                                          help="Print the encoder's graph nodes a decoder can read, with their "
                                               "layouts and output shapes, and exit."),
         all_nodes: bool = typer.Option(False, "--all-nodes",
                                        help="With --list-layers: every node, with why no decoder reads the rest."),
         list_caches: bool = typer.Option(False, "--list-caches",
                                          help="List every cache under cache.dir, marking this config's, and exit.")):
    cfg = config.load(config_path, overrides)
    if list_caches:
        print_caches(cfg)
    elif list_layers:
        print_nodes(cfg, all_nodes)
    else:
        extraction.extract(cfg)


def print_nodes(cfg, all_nodes=False):
    """The nodes `layers` may name, with layout and output shape at encoder.input_size (network
    order), on stdout. Never truncated, whatever the terminal: a name is there to be copied."""
    arch, size = cfg["encoder.arch"], cfg["encoder.input_size"]
    names = {node: layer for layer, node in ALEXNET_NODES.items()} if arch == "alexnet" else {}
    listed = encoder_graph.list_nodes(arch, size)
    shown = [row for row in listed if all_nodes or row[2]]
    table = Table(box=None, pad_edge=False)
    for column in ("node", "layer name", "layout", "output shape", f"{cfg['cache.dtype']} bytes/image"):
        table.add_column(column, justify="right" if column.endswith("image") else "left", no_wrap=True)
    for node, shape, layout, reason in shown:
        table.add_row(node, names.get(node, ""), layout_text(shape, layout) if layout else reason,
                      "x".join(map(str, shape)) if shape is not None else "",
                      f"{feature_cache.layer_bytes(shape, cfg['cache.dtype']):,}" if layout else "")
    out = Console(highlight=False)
    out.print(f"{arch} graph nodes at {size}x{size} input (a module name, e.g. `layer2`, means its last node)",
              soft_wrap=True)
    Console(highlight=False, width=Measurement.get(out, out.options.update_width(10**6), table).maximum).print(table)
    hidden = len(listed) - len(shown)
    console.console.print(f"{len(shown)} of {len(listed)} nodes listed"
                          + (f"; {hidden} more are not one per-image tensor in a layout a decoder reads "
                             f"(--all-nodes shows them and why)" if hidden else ""))


def print_caches(cfg):
    """A table of the caches under cache.dir, newest first; `*` marks the one this config reads or builds
    (by its name: whether it is still current for the data and encoder is checked when it is used)."""
    entries = feature_cache.catalogue(cfg["cache.dir"])
    if not entries:
        console.console.print(f"no caches under {cfg['cache.dir']}")
        return
    mine = feature_cache.path_for(cfg).name
    table = Table(title=f"feature caches under {cfg['cache.dir']} (* = this config's)", show_lines=True)
    name_width = max((len(e["path"].name) for e in entries), default=0)  # a file name is never cut
    for column in ("", "file", "data", "encoder", "features"):
        table.add_column(column, overflow="fold", min_width=name_width if column == "file" else None)
    for e in entries:
        file = f"{e['path'].name}\n{storage.size_text(e['bytes'])}, {e['status']}\n{e['created'].replace('T', ' ')[:16]}"
        if "data" not in e:
            table.add_row("*" if e["name"] == mine else "", file, "", "", "")
            continue
        table.add_row("*" if e["name"] == mine else "", file,
                      f"{e['data']}\n{e['classes']} classes, {e['image_size']}x{e['image_size']} px\n"
                      f"{e['splits']['train']:,} train + {e['splits']['eval']:,} eval images (seed {e['seed']})",
                      f"{encoder.describe(e['encoder'])}\n{e['input_size']} px input",
                      f"{', '.join(e['layers'])}\n{e['dtype']}, compression {e['compression']}")
    console.console.print(table)
    console.console.print(f"{len(entries)} caches, {storage.size_text(sum(e['bytes'] for e in entries))}; "
                          + (f"this config's: {mine}" if any(e["name"] == mine for e in entries)
                             else f"this config's ({mine}) is not built yet"))


if __name__ == "__main__":
    app()
