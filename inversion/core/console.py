"""What every command line shares: the console, progress bars, summaries, error exits."""

import contextlib
import functools
import os
import signal
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from inversion.core.errors import UserError

# Under torchrun only rank 0 talks; errors and per-rank summaries come from every rank, prefixed.
RANK = int(os.environ.get("RANK", "0"))
PREFIX = f"rank {RANK}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
# soft_wrap: a line is never broken at the console's width (80 columns where it is a file or a pipe), so a
# log reads and greps as it was printed; tables and progress bars still fit the width.
console = Console(stderr=True, highlight=False, quiet=RANK != 0, soft_wrap=True)
_every_rank = Console(stderr=True, highlight=False, soft_wrap=True)

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
    (_every_rank if every_rank else console).print(PREFIX * every_rank + line + (f", {extra}" if extra else ""))


def warn(message):
    console.print(f"[bold yellow]WARNING[/]: {message}")


def run(fn):
    """Wrap a typer command: a UserError becomes one line on stderr and exit code 2; Ctrl-C or SIGTERM
    (`interruptible`) one line saying what was kept and exit code 130 or 143 (128 + the signal)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with interruptible():
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                _every_rank.print(f"{PREFIX}[bold red]error[/]: {e}")
                raise typer.Exit(2)
            except KeyboardInterrupt as e:
                kept = str(e) if isinstance(e, Interrupted) and str(e) else "completed work is kept"
                how = signal.SIGTERM if signal.SIGTERM in _received else signal.SIGINT
                console.print(f"interrupted by {'SIGTERM' if how == signal.SIGTERM else 'Ctrl-C'}: {kept}; "
                              f"re-run the same command to continue", markup=False)
                raise typer.Exit(128 + how)
    return wrapper


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, caught at a point where a command knows what it kept: its message says what (and
    `run` prints it). A KeyboardInterrupt, so every `except KeyboardInterrupt` treats it as Ctrl-C."""


# Signals received while `interruptible` is in force; `deferred_interrupts` nests by a count.
_received = []
_deferring = [0]


def _on_signal(signum, frame):
    _received.append(signum)
    if _deferring[0]:
        return  # noted: the loop stops at its next step boundary (interrupt_requested)
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible():
    """SIGTERM (how SLURM, Kubernetes and torchrun's agent stop a job, which then kill it after a grace period)
    arrives as Ctrl-C does, a KeyboardInterrupt in the main thread, so every command's one interrupted path
    serves both; `deferred_interrupts` lets a loop finish its step first. Outside the main thread (where Python
    delivers no signals) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _received.clear()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()


@contextlib.contextmanager
def deferred_interrupts():
    """Inside, Ctrl-C and SIGTERM are only noted: the loop asks `interrupt_requested()` where its state is whole
    (after an optimiser step, a written batch), saves and raises Interrupted; one still noted when the block
    ends is raised then. A second signal is noted too: under torchrun each rank gets the agent's SIGTERM
    besides the scheduler's, and a terminal's Ctrl-C reaches a rank twice (directly and from the agent), so
    "twice means now" would cut short the very checkpoint the first asked for; `kill -9` stops a step at once.
    Only under `interruptible` (a command line); elsewhere Ctrl-C raises as usual."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    if _received and not _deferring[0]:
        raise KeyboardInterrupt  # noted after the loop's last check (a signal during its final write)


def interrupt_requested():
    """Whether a Ctrl-C or SIGTERM is waiting for the loop to stop."""
    return bool(_received)


class Timer:
    """Seconds since entering, inside the block; the block's duration, fixed at its end, after it."""

    def __enter__(self):
        self.start, self.end = time.perf_counter(), None
        return self

    @property
    def seconds(self):
        return (self.end or time.perf_counter()) - self.start

    def __exit__(self, *exc):
        self.end = time.perf_counter()
        return False
