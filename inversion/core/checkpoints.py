"""Decoder checkpoint files: what each holds, which command reads which, and what a damaged one costs.

A decoder's folder, `output.dir/decoders/<layer>/`:
- `best.pt`: the epoch with the lowest eval loss: weights (with the input statistics), history, the decoder's
  spec, the settings it is pinned to, provenance. What render.py, reconstruct.py and
  invert_by_optimisation.py read. When the best epoch is the last one it is a hard link to `last.pt`, so the
  weights are on disk once.
- `last.pt`: the last finished epoch, the same contents: where train_decoders.py resumes.
- `optimizer.pt`: Adam's state at the end of an epoch, and which epoch. Only resume reads it, so no command
  that draws or decodes loads optimiser state (twice the weights' size).
- `history.jsonl`: the history as text, one epoch a line.
- `in-progress.pt`: an epoch part-way (`train.checkpoint_minutes`, or Ctrl-C / SIGTERM): weights, both
  optimisers, the step within the epoch and what the rest of the epoch needs to run as it would have. Only
  resume reads it, and only on top of the `last.pt` it continues; it is removed once that epoch is saved, so
  no command that draws, decodes or reads the history ever takes part of an epoch for a whole one.

Every file is written under a temporary name and renamed (`storage.replacing`): a kill or a full disk leaves
the previous epoch's files. Checkpoints written before `optimizer.pt` existed hold the optimiser state in
`last.pt` and `best.pt` themselves; they resume and render unchanged.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from inversion.core import decoders, storage
from inversion.core.console import warn
from inversion.core.decoders import FC_WIDTH, OUT_SIZE, Decoder
from inversion.core.errors import UserError
from inversion.core.layouts import default_layout, map_shape

LAST, BEST, OPTIMIZER, HISTORY, IN_PROGRESS = "last.pt", "best.pt", "optimizer.pt", "history.jsonl", "in-progress.pt"


def folder(cfg, layer=""):
    """A decoder's folder (or, without a layer, the folder of all of them)."""
    return Path(cfg["output.dir"]) / "decoders" / layer


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be loaded: cut short by a bad copy, or not a decoder checkpoint."""


def save(out, checkpoint, optimizer_state, is_best):
    """Write an epoch's files: `last.pt` and `optimizer.pt` both whole before either is renamed into place
    (a full disk leaves the previous epoch's pair), then `best.pt` as a link to `last.pt` if this epoch is
    the best so far, then the history."""
    out = Path(out)
    epoch = len(checkpoint["history"])
    with storage.replacing(out / OPTIMIZER) as optimizer_tmp, storage.replacing(out / LAST) as last_tmp:
        torch.save({"epoch": epoch, **optimizer_state}, optimizer_tmp)
        torch.save(checkpoint, last_tmp)
    if is_best:
        link(out / LAST, out / BEST)
    storage.write_text(out / HISTORY, "".join(json.dumps(h) + "\n" for h in checkpoint["history"]))


def link(source, target):
    """`target` becomes the same file as `source` (a hard link, renamed into place; a copy where the file
    system has no hard links)."""
    with storage.replacing(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def load(path, mmap=False):
    """The checkpoint dict, or a one-line DamagedCheckpoint naming the file. `mmap` maps the tensors
    instead of reading them: what inference wants, so start-up does not grow with the checkpoint."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001
        # a cut-short zip raises RuntimeError, others EOFError, pickle errors
        raise DamagedCheckpoint(f"{path} is damaged and cannot be loaded ({storage.reason(e)})") from e
    if not isinstance(checkpoint, dict) or not {"model", "history", "decoder"} <= set(checkpoint):
        raise DamagedCheckpoint(f"{path} is damaged and cannot be loaded (not a decoder checkpoint)")
    return checkpoint


def make_spec(layer, in_shape, layout, width, out_size, fc_width):
    """What a decoder is built from, as its checkpoint records it: the layout only where it is not the
    default one and fc_width only where the decoder has fc layers, so neither pins a decoder it does not
    shape (and checkpoints from before either existed keep their spec)."""
    spec = {"layer": layer, "in_shape": list(in_shape), **decoders.spec(in_shape, layout), "width": width,
            "out_size": out_size}
    return {**spec, "fc_width": fc_width} if _uses_fc(spec) else spec


def spec(checkpoint):
    """The decoder's spec, with the defaults of checkpoints written before a setting existed."""
    recorded = {"out_size": OUT_SIZE, **checkpoint["decoder"]}
    return {"fc_width": FC_WIDTH, **recorded} if _uses_fc(recorded) else recorded


def _uses_fc(decoder_spec):
    shape = decoder_spec["in_shape"]
    layout = decoder_spec.get("layout") or default_layout(shape)
    return decoders.uses_fc(map_shape(shape, layout))


def build(decoder_spec, device=None):
    return Decoder(tuple(decoder_spec["in_shape"]), decoder_spec["width"], out_size=decoder_spec["out_size"],
                   layout=decoder_spec.get("layout"), fc_width=decoder_spec.get("fc_width", FC_WIDTH)).to(device)


def load_decoder(path):
    """(decoder in eval mode on the CPU, checkpoint dict) for inference. The decoder is built on the meta
    device and takes the file's memory-mapped tensors as its own: nothing is allocated or initialised twice,
    and a file's optimiser state (older checkpoints) is never read."""
    checkpoint = load(path, mmap=True)
    try:
        with torch.device("meta"):
            model = build(spec(checkpoint))
        model.load_state_dict(checkpoint["model"], assign=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DamagedCheckpoint(f"{path} is damaged and cannot be loaded ({storage.reason(e)})") from e
    return model.eval(), checkpoint


def resume_point(out, guard, fresh):
    """(checkpoint, optimiser state or None) to resume from, or None to start over. The optimiser state
    belongs to the checkpoint's epoch, or resume is not exact: then the weights resume with a fresh
    optimiser, with a warning. A damaged `last.pt` is moved aside for an intact `best.pt`; with neither,
    a one-line error points at --fresh."""
    out = Path(out)
    last = out / LAST
    if fresh or not last.exists():
        return None
    layer = guard["decoder"]["layer"]
    try:
        checkpoint, source = load(last), last
    except DamagedCheckpoint as damaged:
        checkpoint, source = _instead_of_damaged(out, guard, damaged), out / BEST
    key = mismatch(checkpoint, guard)
    if key:
        raise UserError(f"{source} was trained with {key} {_pinned(checkpoint, key)}, now {guard[key]}; "
                        f"pass --fresh to start this decoder over (train_decoders.py --layers {layer} --fresh)")
    return checkpoint, _optimizer_state(out, checkpoint, source)


def mismatch(checkpoint, guard):
    """The first guarded setting a checkpoint was trained with that differs from now, else None."""
    return next((key for key in guard if _pinned(checkpoint, key) != guard[key]), None)


def _pinned(checkpoint, key):
    if key == "decoder":
        return spec(checkpoint)
    return checkpoint.get(key, 0.0 if key == "holdout" else None)  # holdout: checkpoints from before the key


def _optimizer_state(out, checkpoint, source):
    if "optimizer" in checkpoint:  # written before optimizer.pt existed
        return {key: checkpoint[key] for key in checkpoint if key.endswith("optimizer")}
    epoch = len(checkpoint["history"])
    try:
        state = torch.load(out / OPTIMIZER, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        # missing or cut short (any of torch.load's errors): either way there is no state to resume
        state, why = None, storage.reason(e)
    else:
        why = f"it belongs to epoch {state.get('epoch')}"
        state = state if state.get("epoch") == epoch else None
    if state is None:
        warn(f"{out / OPTIMIZER} cannot resume {source.name} (epoch {epoch}): {why}; resuming the weights "
             f"with a fresh optimiser state, so the rest of this run differs from an uninterrupted one")
        return None
    return {key: value for key, value in state.items() if key != "epoch"}


def _instead_of_damaged(out, guard, damaged):
    """An intact `best.pt` when `last.pt` is damaged; the damaged file is moved aside, not overwritten, and
    `last.pt` becomes `best.pt` again (so a run with no epoch left still finds a last.pt)."""
    last, best, layer = out / LAST, out / BEST, guard["decoder"]["layer"]
    try:
        checkpoint = load(best) if best.exists() else None
    except DamagedCheckpoint:
        checkpoint = None
    if checkpoint is None or mismatch(checkpoint, guard):
        raise UserError(f"{damaged}; no intact {best.name} to resume from: pass --fresh to start {layer} over "
                        f"(train_decoders.py --layers {layer} --fresh)")
    aside = last.with_name(last.name + ".damaged")
    last.replace(aside)
    link(best, last)
    warn(f"{damaged}; moved it to {aside.name} and resuming from {best} (epoch {len(checkpoint['history'])})")
    return checkpoint


def save_in_progress(out, state):
    with storage.replacing(Path(out) / IN_PROGRESS) as tmp:
        torch.save(state, tmp)


def drop_in_progress(out):
    (Path(out) / IN_PROGRESS).unlink(missing_ok=True)


def load_in_progress(out, guard, completed, order):
    """The in-progress state that continues epoch `completed` + 1 from the `completed` epochs resumed, or None
    (the epoch then starts at its beginning): one of another epoch (left by a kill between an epoch's save and
    its removal, or ahead of a `best.pt` resumed instead of a damaged `last.pt`) or one whose batch order
    (`order`: batch size, seed, world size, streaming) or guarded settings differ is not used, with a warning
    where it had steps to offer."""
    path = Path(out) / IN_PROGRESS
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - cut short or not a checkpoint: either way nothing to resume
        warn(f"{path} cannot be loaded ({storage.reason(e)}); epoch {completed + 1} starts at its beginning")
        return None
    if state.get("completed", -1) < completed:
        return None  # an epoch since finished: its last.pt holds more
    key = mismatch(state, guard) or next((k for k in order if state.get("order", {}).get(k) != order[k]), None)
    if state["completed"] > completed or key:
        why = (f"it continues epoch {state['completed'] + 1}, not {completed + 1}" if not key else
               f"it was written with {key} {state['order'].get(key) if key in order else _pinned(state, key)}, "
               f"now {order[key] if key in order else guard[key]}")
        warn(f"{path} is not used ({why}); epoch {completed + 1} starts at its beginning")
        return None
    return state
