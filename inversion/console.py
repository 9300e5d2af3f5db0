"""What every command line shares: the console, progress bars, summaries, error exits."""

import functools
import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .errors import UserError

# Under torchrun only rank 0 talks; errors and per-rank summaries come from every rank, prefixed.
RANK = int(os.environ.get("RANK", "0"))
PREFIX = f"rank {RANK}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
console = Console(stderr=True, highlight=False, quiet=RANK != 0)
_every_rank = Console(stderr=True, highlight=False)

ConfigOption = typer.Option(Path("config.yaml"), "--config", help="YAML config file.")
SetOption = typer.Option([], "--set", help="Override a config key: dotted.key=value (YAML scalar). Repeatable.")
LayersOption = typer.Option(None, "--layers", help="Comma-separated subset of `layers`, e.g. conv2,fc8.")


def progress():
    """A rich progress bar; callers put a throughput text in the task's `rate` field."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
        console=console,
    )


def rate_text(done, seconds, unit):
    return f"{done / seconds:,.1f} {unit}/s" if seconds > 0 else ""


def summary(what, items, seconds, unit, extra="", every_rank=False):
    """The one line every long step ends with."""
    line = f"{what}: {items:,} {unit} in {seconds:.1f} s ({items / max(seconds, 1e-9):,.1f} {unit}/s)"
    (_every_rank if every_rank else console).print(PREFIX * every_rank + line + (f", {extra}" if extra else ""),
                                                   soft_wrap=True)


def warn(message):
    console.print(f"[bold yellow]WARNING[/]: {message}", soft_wrap=True)


def run(fn):
    """Wrap a typer command: a UserError becomes one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _every_rank.print(f"{PREFIX}[bold red]error[/]: {e}", soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            console.print("interrupted; completed work is kept, re-run to continue")
            raise typer.Exit(130)
    return wrapper


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    @property
    def seconds(self):
        return time.perf_counter() - self.start

    def __exit__(self, *exc):
        return False

