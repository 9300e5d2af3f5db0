"""The encoder weights file that train_encoder.py writes and `encoder.weights` reads: one torch.save dict.

Keys (KEYS): `state_dict` (loads into `torchvision.models.<arch>(num_classes=N)` exactly: training-only
modules such as batch norm are folded away before saving), `arch`, `num_classes`, `classes` (class ids in
label order), `epochs`, `top1` and `top5` (fractions on the held-out images), `seed`, `dataset` (its file
name, format and content fingerprint), `seconds` (training time), `machine`, `versions`, `precision` and
`config_hash`, and `history` (one entry per epoch: loss, top-1, top-5, seconds). A file with `state_dict` and `arch` is such a file; anything else `encoder.weights` names
is read as a plain state_dict.
"""

import hashlib
from pathlib import Path

import torch

from inversion.core import storage
from inversion.core.errors import UserError

KEYS = ("state_dict", "arch", "num_classes", "classes", "epochs", "top1", "top5", "seed", "dataset", "seconds",
        "machine", "versions", "precision", "config_hash", "history")
FOLDER = "encoders"


def default_path(cfg, data_path):
    """Where train_encoder.py writes, and `encoder.weights: auto` looks, for this arch and dataset:
    encoder_training.output, else encoders/<arch>-<dataset>.pt, with the settings that change which images
    it learns from in the name when they are not the defaults (all classes, all images, seed 0)."""
    if cfg["encoder_training.output"]:
        return Path(cfg["encoder_training.output"])
    stem = Path(data_path).name.removesuffix(".zip")
    parts = [cfg["encoder.arch"], stem]
    if cfg["encoder_training.num_classes"] is not None:
        parts.append(f"{cfg['encoder_training.num_classes']}classes")
    if cfg["encoder_training.train_per_class"] is not None:
        parts.append(f"{cfg['encoder_training.train_per_class']}perclass")
    if cfg["seed"] != 0 and cfg["encoder_training.num_classes"] is not None:
        parts.append(f"seed{cfg['seed']}")
    return Path(FOLDER) / f"{'-'.join(parts)}.pt"


def save(path, record):
    """Write the file atomically (temporary name, then rename): a file under the final name is whole."""
    missing = [key for key in KEYS if key not in record]
    if missing:
        raise ValueError(f"an encoder weights file needs {', '.join(missing)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with storage.replacing(path) as tmp:
        torch.save({key: record[key] for key in KEYS}, tmp)
    return path


def read(path):
    """The dict in `path`: an encoder weights file (`is_record`) checked for its keys, or a plain state_dict;
    a one-line UserError naming the file when it is missing, damaged or incomplete."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"encoder.weights: no such file: {path} (or use auto, imagenet, random)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged or foreign file
        raise UserError(f"encoder.weights: cannot read {path} as a weights file or state_dict "
                        f"({type(e).__name__}); train it again with python train_encoder.py") from None
    if not isinstance(content, dict):
        raise UserError(f"encoder.weights: {path} holds a {type(content).__name__}, not a state_dict")
    if not is_record(content):
        return content
    missing = [key for key in KEYS if key not in content]
    if missing:
        raise UserError(f"encoder.weights: {path} lacks {', '.join(missing)}; train it again with "
                        f"python train_encoder.py")
    if len(content["classes"]) != content["num_classes"]:
        raise UserError(f"encoder.weights: {path} names {len(content['classes'])} classes for "
                        f"num_classes {content['num_classes']}")
    return content


def is_record(content):
    """A file train_encoder.py wrote, rather than a plain state_dict (whose keys are parameter names)."""
    return "state_dict" in content and "arch" in content


def identity(path, record):
    """What a cache and every artifact record of the encoder: enough to describe it and to load it again."""
    return {"arch": record["arch"], "kind": "trained", "path": str(path), "sha256": sha256(path),
            "num_classes": record["num_classes"], "classes": list(record["classes"]), "epochs": record["epochs"],
            "top1": record["top1"], "top5": record["top5"], "dataset": record["dataset"]["name"],
            "seed": record["seed"]}


def describe(identity, display):
    """e.g. 'AlexNet trained here on Tiny ImageNet (200 classes, 16 epochs, top-1 41.3 %)'."""
    epochs = identity["epochs"]
    return (f"{display} trained here on {identity['dataset']} ({identity['num_classes']} classes, "
            f"{epochs} epoch{'s' * (epochs != 1)}, top-1 {100 * identity['top1']:.1f} %)")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
