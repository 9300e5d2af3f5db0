"""TensorBoard event files for watching decoders train: `output.dir/tensorboard/<layer>/`.

One run per layer, one point per epoch (step = the epoch number, as in history.jsonl): the train and eval
loss, the learning rate and samples/s of that history line, and a fixed set of eval images beside their
reconstructions (the same seeded images every epoch). The settings and provenance go in as text once per
session.

Why it looks the way it does:
- Only rank 0 writes, and `tensorboard` is imported only then (lazily): training imports no image or dataset
  code, and a missing package costs one warning, never the run.
- An epoch is logged before its checkpoint is saved, and a resumed run opens its writer with
  `purge_step` = the first epoch it trains: TensorBoard then drops whatever an interrupted run logged past
  the last checkpoint, so no step appears twice and the scalars always equal history.jsonl.
- Images are PNG-encoded here with zlib (`torch.utils.tensorboard`'s image helpers need PIL).
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from inversion.core import distributed, seeds
from inversion.core.console import warn
from inversion.core.images import to_target

NUM_IMAGES = 8  # eval images shown each epoch
SCALARS = {"loss/train": "train_loss", "loss/eval": "eval_loss", "lr": "lr", "samples_per_s": "samples_per_s"}
_warned = []


def folder(cfg, layer=""):
    return Path(cfg["output.dir"]) / "tensorboard" / layer


def open_log(cfg, layer, start, provenance, eval_x, eval_y):
    """A TrainingLog for the layer whose next epoch is `start` + 1, or None where there is nothing to write:
    `train.tensorboard` is false, this is not rank 0, or the `tensorboard` package is missing (warned once)."""
    if not cfg["train.tensorboard"] or not distributed.is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if not _warned:
            warn(f"no TensorBoard logs: {e} (pip install tensorboard, or set train.tensorboard=false)")
            _warned.append(True)
        return None
    writer = SummaryWriter(str(folder(cfg, layer)), purge_step=start + 1 if start else None)
    rows = np.sort(np.random.default_rng(seeds.derive_seed(cfg["seed"], "tensorboard", 0))
                   .choice(len(eval_x), min(NUM_IMAGES, len(eval_x)), replace=False))
    if isinstance(eval_x, torch.Tensor):
        rows = torch.from_numpy(rows).to(eval_x.device)
    log = TrainingLog(writer, eval_x[rows], eval_y[rows])
    settings = json.dumps(cfg, indent=2, sort_keys=True)
    writer.add_text("config", _code(settings), start + 1)
    writer.add_text("provenance", _code(json.dumps(provenance, indent=2, sort_keys=True)), start + 1)
    return log


class TrainingLog:
    def __init__(self, writer, inputs, originals):
        self.writer, self.inputs, self.originals = writer, inputs, originals

    def epoch(self, model, entry):
        """Log one history line (its scalars) and the model's reconstructions of the fixed eval images."""
        step = entry["epoch"]
        for tag, key in SCALARS.items():
            self.writer.add_scalar(tag, entry[key], step)
        self._add_png("reconstructions", _side_by_side(self.originals, _decode(model, self.inputs)), step)
        self.writer.flush()  # on disk before the checkpoint (see the module docstring)

    def close(self):
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _add_png(self, tag, hwc_uint8, step):
        from tensorboard.compat.proto.summary_pb2 import Summary
        h, w, c = hwc_uint8.shape
        image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=png(hwc_uint8))
        # SummaryWriter's own add_image goes through PIL; its file writer takes a ready summary.
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


@torch.no_grad()
def _decode(model, inputs):
    model.eval()
    device = next(model.parameters()).device
    return model(torch.as_tensor(inputs).to(device).float()).float().clamp(0, 1).cpu()


def _side_by_side(originals, reconstructions):
    """uint8 (S, S, 3) originals over float (B, 3, S, S) reconstructions -> one uint8 (2S, B*S, 3) strip:
    originals on the top row, their reconstructions below."""
    top = to_target(torch.as_tensor(originals).cpu())
    grid = torch.cat([torch.cat(list(top), 2), torch.cat(list(reconstructions), 2)], 1)
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def png(hwc_uint8):
    """A uint8 (H, W, 3) array as PNG bytes: 8-bit RGB, no filtering, zlib-compressed."""
    h, w, _ = hwc_uint8.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(hwc_uint8))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _code(text):
    """TensorBoard renders text as Markdown: indent to keep JSON as a code block."""
    return "\n".join("    " + line for line in text.splitlines())
