"""Stage two: train one decoder per encoder layer from the feature cache."""

from pathlib import Path

import typer
from rich.table import Table

from inversion.core import config, console, decoders
from inversion.core.layouts import default_layout, layout_text
from inversion.train import training

app = typer.Typer(add_completion=False)


@app.command()
@console.run
def main(config_path: Path = console.ConfigOption, overrides: list[str] = console.SetOption,
         layers: str = console.LayersOption,
         fresh: bool = typer.Option(False, "--fresh", help="Ignore existing checkpoints and start over."),
         describe: bool = typer.Option(False, "--describe", help="Print each decoder's layer table and exit.")):
    cfg = config.load(config_path, overrides)
    chosen = config.chosen_layers(cfg, layers) or cfg["layers"]
    if describe:
        print_tables(cfg, chosen)
    else:
        training.train(cfg, chosen, fresh=fresh)


def print_tables(cfg, layers):
    """The architecture tables, read off the modules themselves (docs/decoders-and-training.md quotes this output)."""
    from inversion.core import encoder_graph  # here only: training needs no torchvision (2 s less at every start)

    found = encoder_graph.feature_layouts(cfg["encoder.arch"], cfg["encoder.input_size"], layers)
    for layer in layers:
        shape, layout = found[layer]
        model = decoders.Decoder(shape, cfg["decoder.width"], out_size=cfg["data.image_size"], layout=layout,
                                 fc_width=cfg["decoder.fc_width"])
        total = sum(p.numel() for p in model.parameters())
        source = "" if layout == default_layout(shape) else \
            f" from the node's {'x'.join(map(str, shape))}, {layout_text(shape, layout)}"
        table = Table(title=f"{layer} decoder (input {'x'.join(map(str, model.map_shape))}{source}, "
                            f"width {cfg['decoder.width']}, {total:,} parameters)")
        for column in ("layer", "kernel", "stride", "out channels", "out size", "parameters"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for name, kernel, stride, channels, size, params in decoders.describe(model):
            table.add_row(name, str(kernel), str(stride), str(channels), size, f"{params:,}")
        console.console.print(table)


if __name__ == "__main__":
    app()
