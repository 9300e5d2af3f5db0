"""The frozen AlexNet: how its weights are found, how images are prepared, where we tap it.

Preprocessing is spelled out exactly so anyone can recompute the cached features:
RGB uint8 SxS (data.image_size) -> float in [0, 1] -> bilinear resize to input_size (align_corners=False)
-> ImageNet mean/std normalisation.
"""

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.models import AlexNet_Weights

from .errors import UserError

PREPROCESS_VERSION = 1  # bump when preprocessing changes: it is part of every cache's hash
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGENET = AlexNet_Weights.IMAGENET1K_V1


def hub_checkpoint():
    """Where torchvision's standard loader keeps (and looks for) the ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET.url).name


def load(weights="auto", seed=0):
    """(frozen AlexNet in eval mode, identity dict). The identity travels with every artifact."""
    from .console import warn

    if weights == "random":
        return _random(seed)
    if weights in ("imagenet", "auto"):
        try:
            state = IMAGENET.get_state_dict(progress=False)
        except Exception as e:  # no file, no network: torchvision raises URLError, OSError, ...
            if weights == "auto":
                warn(f"ImageNet AlexNet weights unavailable ({type(e).__name__}); using a RANDOM-INIT "
                     f"encoder (seed {seed}). Results will NOT show what a pretrained AlexNet keeps. "
                     f"Put {Path(IMAGENET.url).name} at {hub_checkpoint()} to use the real weights.")
                return _random(seed)
            raise UserError(f"encoder.weights=imagenet: cannot load {IMAGENET} ({type(e).__name__}); "
                            f"download {IMAGENET.url} to {hub_checkpoint()}") from None
        identity = {"kind": "imagenet", "name": f"AlexNet_Weights.{IMAGENET.name}",
                    "sha256": _sha256(hub_checkpoint()) if hub_checkpoint().is_file() else None}
    else:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"encoder.weights: no such file: {weights} (or use auto, imagenet, random)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"encoder.weights: cannot read {path} as a state_dict ({type(e).__name__})") from None
        identity = {"kind": "file", "path": str(path), "sha256": _sha256(path)}
    model = torchvision.models.alexnet()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise UserError(f"encoder.weights: {weights} does not fit torchvision's AlexNet "
                        f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    return _freeze(model), identity


def describe(identity):
    """One line for logs and figure titles; random weights are never passed off as pretrained."""
    if identity["kind"] == "random":
        return f"AlexNet random init, not ImageNet-pretrained (seed {identity['seed']})"
    if identity["kind"] == "imagenet":
        sha = identity.get("sha256")
        return f"AlexNet ImageNet-pretrained ({identity['name']}{', sha256 ' + sha[:12] if sha else ''})"
    return f"AlexNet weights from {identity['path']} (sha256 {identity['sha256'][:12]})"


def reload(identity):
    """The encoder a cache was built with, or None where it cannot be had again (file gone or changed)."""
    weights = {"random": "random", "imagenet": "imagenet"}.get(identity["kind"], identity.get("path"))
    try:
        model, again = load(weights, seed=identity.get("seed", 0))
    except UserError:
        return None
    return model if again == identity else None


def is_pretrained(identity):
    return identity["kind"] != "random"


def preprocess(images_uint8, input_size):
    """(B, H, W, 3) uint8 -> (B, 3, S, S) normalised float, exactly as documented above."""
    x = images_uint8.permute(0, 3, 1, 2).float().div_(255)
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def taps(model, x, layers):
    """All requested activations from one forward pass.

    conv2 = features[:6] (ReLU + max-pool), conv5 = features (ReLU + max-pool),
    fc6 = classifier[:3] after avgpool + flatten (ReLU), fc8 = logits.
    """
    out = {}
    h = model.features[:6](x)
    out["conv2"] = h
    h = model.features[6:](h)
    out["conv5"] = h
    if "fc6" in layers or "fc8" in layers:
        h = torch.flatten(model.avgpool(h), 1)
        h = model.classifier[:3](h)
        out["fc6"] = h
        out["fc8"] = model.classifier[3:](h)
    return {name: out[name] for name in layers}


def feature_shapes(input_size, layers):
    """Per-layer activation shape (without batch), from a weightless forward on the meta device."""
    with torch.device("meta"):
        model = torchvision.models.alexnet().eval()
        x = torch.empty(1, 3, input_size, input_size)
        return {name: tuple(t.shape[1:]) for name, t in taps(model, x, layers).items()}


def _random(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.alexnet()
    return _freeze(model), {"kind": "random", "seed": seed}


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
