"""The training run's own files, in a folder beside the weights file (`encoders/<name>/` for
`encoders/<name>.pt`): `last.pt` after every epoch (the batch-norm model, optimiser, history), `in-progress.pt`
within an epoch (every `encoder_training.checkpoint_minutes`, and on Ctrl-C or SIGTERM after the step in
hand), `history.json`, and TensorBoard's event files. Every file is written under a temporary name and
renamed; a run resumes only from files made with the same settings and images (`guard`)."""

import json
from pathlib import Path

import torch

from inversion.core import storage
from inversion.core.console import warn
from inversion.core.errors import UserError

LAST, IN_PROGRESS, HISTORY = "last.pt", "in-progress.pt", "history.json"
# What the trained network and the order of its steps depend on: a run resumes only under the same.
GUARDED = ("seed", "encoder.arch", "encoder.input_size", "data.image_size", "split.eval_per_class",
           *(f"encoder_training.{key}" for key in ("epochs", "batch_size", "num_classes", "train_per_class", "lr",
                                                   "momentum", "weight_decay", "label_smoothing", "warmup",
                                                   "min_input_size", "full_size_epochs", "crop_scale",
                                                   "batchnorm")))


def folder(output):
    output = Path(output)
    return output.with_name(output.name.removesuffix(".pt"))


def guard(cfg, fingerprint, world):
    return {"settings": {key: cfg[key] for key in GUARDED}, "images": fingerprint, "world": world}


def save(out, name, state):
    out.mkdir(parents=True, exist_ok=True)
    with storage.replacing(out / name) as tmp:
        torch.save(state, tmp)


def write_history(out, history):
    storage.write_text(out / HISTORY, json.dumps(history, indent=2) + "\n")


def resume_point(out, expected, fresh):
    """(last.pt's state or None, in-progress.pt's state or None) to continue from. A run made with other
    settings or images is refused in one line (`--fresh` starts over); an in-progress file that does not
    continue last.pt is dropped with a warning."""
    if fresh:
        for name in (LAST, IN_PROGRESS):
            (out / name).unlink(missing_ok=True)
        return None, None
    last, partial = _load(out / LAST), _load(out / IN_PROGRESS)
    for state in (last, partial):
        if state is not None and state["guard"] != expected:
            differs = _difference(state["guard"], expected)
            raise UserError(f"{out} holds a training run with other {differs}; re-run with --fresh to start "
                            f"over, or set encoder_training.output to another file")
    done = len(last["history"]) if last else 0
    if partial is not None and partial["epoch"] != done:
        warn(f"{out / IN_PROGRESS} is from epoch {partial['epoch'] + 1}, not {done + 1}; starting that epoch over")
        partial = None
    return last, partial


def _load(path):
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged file: train_encoder.py --fresh writes a new one
        raise UserError(f"{path} cannot be read ({type(e).__name__}); re-run with --fresh") from None


def _difference(stored, expected):
    if stored["images"] != expected["images"]:
        return "images (the dataset or its split changed)"
    if stored["world"] != expected["world"]:
        return f"ranks ({stored['world']} then, {expected['world']} now)"
    keys = [k for k in expected["settings"] if stored["settings"].get(k) != expected["settings"][k]]
    return "settings: " + ", ".join(f"{k} {stored['settings'].get(k)!r} then, {expected['settings'][k]!r} now"
                                    for k in keys)
