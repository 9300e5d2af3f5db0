"""The frozen encoder: which torchvision classifier, how its weights are found, how images are
prepared (encoder_graph.py: where it is tapped).

Preprocessing is spelled out exactly so anyone can recompute the cached features:
RGB uint8 SxS -> float in [0, 1] -> bilinear resize to input_size (align_corners=False)
-> normalisation with the mean/std of the arch's ImageNet weights.
"""

import copy
import difflib
import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from inversion.core import encoder_weights
from inversion.core.errors import UserError

PREPROCESS_VERSION = 1  # bump when preprocessing changes: it is part of every cache's hash


def classifiers():
    """Every image-classification model torchvision can build (its top-level `models` namespace)."""
    return torchvision.models.list_models(module=torchvision.models)


def imagenet_weights(arch):
    """The arch's DEFAULT ImageNet weights enum (metadata only: nothing is downloaded here)."""
    if arch not in classifiers():
        close = difflib.get_close_matches(arch, classifiers(), n=3)
        raise UserError(f"encoder.arch: unknown torchvision classifier {arch!r}"
                        f"{' (nearest: ' + ', '.join(close) + ')' if close else ''}")
    return torchvision.models.get_model_weights(arch).DEFAULT


def hub_checkpoint(arch="alexnet"):
    """Where torchvision's standard loader keeps (and looks for) the arch's ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(imagenet_weights(arch).url).name


def load(arch="alexnet", weights="auto", seed=0, trained=None):
    """(frozen model in eval mode, identity dict). The identity travels with every artifact. `auto`: the
    ImageNet weights from torchvision's cache; else the file train_encoder.py wrote for this arch and
    dataset (`trained`, its default path) where there is one; else random init, loudly."""
    if weights == "random":
        return _random(arch, seed)
    num_classes = None
    if weights in ("imagenet", "auto"):
        here = Path(trained) if trained is not None and Path(trained).is_file() else None
        state, identity = _imagenet_state(arch, weights, seed, trained, quiet=here is not None)
        if state is None and here is not None:
            state, identity, num_classes = _file_state(here, arch)
        elif state is None:
            return _random(arch, seed)
    else:
        state, identity, num_classes = _file_state(Path(weights), arch)
    model = meta_model(arch, num_classes)  # no init to overwrite: the state's tensors become the weights
    try:
        model.load_state_dict(state, assign=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise UserError(f"encoder.weights: {identity.get('path', hub_checkpoint(arch))} does not fit torchvision's "
                        f"{arch} ({first[1].strip() if len(first) > 1 else first[0]})") from None
    return _freeze(model.float()), identity


def _imagenet_state(arch, weights, seed, trained=None, quiet=False):
    """(state_dict, identity) of the arch's ImageNet weights the standard way (the torch hub cache, else a
    download), or (None, None) under `auto` where neither is there: the caller then loads the file trained
    here (`quiet`: there is one) or, with a loud warning naming where `trained` would be, random weights. A
    file that is there but cannot be read is an error naming it, never a silent fallback."""
    from inversion.core.console import warn

    default, path = imagenet_weights(arch), hub_checkpoint(arch)
    try:
        state = default.get_state_dict(progress=False)  # torchvision reads the hub cache, else downloads
    except Exception as e:  # noqa: BLE001
        # no network here: torchvision raises URLError, OSError, ...; a damaged file raises others
        if path.is_file():
            raise UserError(f"encoder.weights={weights}: {path} cannot be read ({type(e).__name__}); "
                            f"replace it with a good copy of {default.url}") from None
        if weights == "imagenet":
            raise UserError(f"encoder.weights=imagenet: cannot load {default} ({type(e).__name__}); "
                            f"download {default.url} to {path}") from None
        if quiet:
            return None, None
        warn(f"ImageNet {display_name(arch)} weights unavailable ({type(e).__name__}); using a RANDOM-INIT "
             f"encoder (seed {seed}). Results will NOT show what a pretrained {display_name(arch)} keeps. "
             f"Put {path.name} at {path} to use the real weights, or train one here with python train_encoder.py"
             f"{f' (it writes {trained})' if trained else ''}.")
        return None, None
    return state, {"arch": arch, "kind": "imagenet", "name": f"{type(default).__name__}.{default.name}",
                   "sha256": encoder_weights.sha256(path) if path.is_file() else None}


def _file_state(path, arch):
    """(state_dict, identity, num_classes or None) of a weights file, or a one-line error naming it: a file
    train_encoder.py wrote (its own arch and class count), or a plain state_dict of torchvision's arch."""
    record = encoder_weights.read(path)
    if not encoder_weights.is_record(record):
        return record, {"arch": arch, "kind": "file", "path": str(path), "sha256": encoder_weights.sha256(path)}, None
    if record["arch"] != arch:
        raise UserError(f"encoder.weights: {path} holds a trained {record['arch']}, not encoder.arch {arch}; "
                        f"set encoder.arch={record['arch']} or train a {arch} with python train_encoder.py")
    return record["state_dict"], encoder_weights.identity(path, record), record["num_classes"]


def describe(identity):
    """One line for logs and figure titles; random weights are never passed off as pretrained."""
    arch = display_name(identity.get("arch", "alexnet"))
    if identity["kind"] == "random":
        return f"{arch} random init, not ImageNet-pretrained (seed {identity['seed']})"
    if identity["kind"] == "imagenet":
        sha = identity.get("sha256")
        return f"{arch} ImageNet-pretrained ({identity['name']}{', sha256 ' + sha[:12] if sha else ''})"
    if identity["kind"] == "trained":
        return encoder_weights.describe(identity, arch)
    return f"{arch} weights from {identity['path']} (sha256 {identity['sha256'][:12]})"


def short_name(identity):
    """A column label for figures that put encoders side by side: random init, ImageNet, trained here, a file."""
    kind = identity["kind"]
    if kind == "trained":
        return f"trained here (top-1 {100 * identity['top1']:.0f} %)"
    return {"random": "random init", "imagenet": "ImageNet"}.get(kind) or Path(identity["path"]).stem


def reload(identity):
    """The encoder a cache was built with, or None where it cannot be had again (file gone or changed)."""
    weights = {"random": "random", "imagenet": "imagenet"}.get(identity["kind"], identity.get("path"))
    try:
        model, again = load(identity.get("arch", "alexnet"), weights, seed=identity.get("seed", 0))
    except UserError:
        return None
    return model if again == identity else None


def reload_exactly(identity, cache_path, remedy):
    """The encoder a cache was built with, loaded again, for work that must see exactly the cached
    features' encoder; else a one-line UserError saying why not and what to do (`remedy`)."""
    model = reload(identity)
    if model is not None:
        return model
    if identity["kind"] in ("file", "trained"):
        reason = (f"{identity['path']} is gone" if not Path(identity["path"]).is_file()
                  else f"{identity['path']} has changed since (its sha256 is no longer {identity['sha256'][:12]})")
    elif identity["kind"] == "imagenet":
        reason = "those ImageNet weights cannot be loaded again, or differ"
    else:
        reason = "it cannot be built again"
    raise UserError(f"cache {cache_path} was built with {describe(identity)}, but {reason}; {remedy}")


def is_pretrained(identity):
    return identity["kind"] != "random"


@functools.cache
def normalisation(arch):
    """(mean, std) from the arch's own ImageNet transforms, so features match what it was trained on."""
    transforms = imagenet_weights(arch).transforms()
    return tuple(transforms.mean), tuple(transforms.std)


def preprocess(images_uint8, input_size, arch="alexnet"):
    """(B, S, S, 3) uint8 -> (B, 3, input_size, input_size) normalised float, as documented above."""
    return preprocess_float(images_uint8.permute(0, 3, 1, 2).float().div_(255), input_size, arch)


def preprocess_float(x, input_size, arch="alexnet"):
    """The same pipeline from (B, 3, S, S) floats in [0, 1], differentiable: inversion by
    optimisation pushes gradients through exactly the preprocessing the cache was built with."""
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    mean, std = normalisation_tensors(arch, x.device)
    return (x - mean) / std


def normalisation_tensors(arch, device):
    """The arch's normalisation as (1, 3, 1, 1) tensors on `device`."""
    mean, std = normalisation(arch)
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


@torch.inference_mode()
def encode(taps, images, input_size, arch, device, dtype=torch.float32):
    """uint8 images (B, S, S, 3) -> {layer: numpy features}, cast on the device before the copy.
    On CUDA the images go through pinned memory, so the copy is asynchronous."""
    x = torch.from_numpy(images)
    if device.type == "cuda":
        x = x.pin_memory()
    x = preprocess(x.to(device, non_blocking=True), input_size, arch)
    return {k: v.to(dtype).cpu().numpy() for k, v in taps(x).items()}


def meta_model(arch, num_classes=None):
    """The arch built on the meta device: no memory, no init; weights are assigned or shapes probed."""
    try:
        with torch.device("meta"):
            return build(arch, num_classes).eval()
    except NotImplementedError:  # an init that reads tensor values (regnet's widths): built, then moved
        return build(arch, num_classes).eval().to("meta")


def build(arch, num_classes=None):
    """torchvision's `arch`, untrained, with `num_classes` outputs (None: ImageNet's 1000)."""
    imagenet_weights(arch)  # a clear error for an unknown arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. googlenet's note about its init scheme
        return torchvision.models.get_model(arch, **({} if num_classes is None else {"num_classes": num_classes}))


def _random(arch, seed):
    """The seeded random-init model: new modules over the weights built once per process. The weights
    are frozen and nothing writes them; moving a copy to a device gives that copy new tensors."""
    model = _random_model(arch, seed)
    own = {id(t): nn.Parameter(t.detach(), requires_grad=False) if isinstance(t, nn.Parameter) else t.detach()
           for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, own), {"arch": arch, "kind": "random", "seed": seed}


@functools.lru_cache(maxsize=4)
def _random_model(arch, seed):
    """Built once: the init draws tens of millions of numbers (0.4 s for AlexNet on a 2-core CPU), and
    one command (render: scores, feature errors, comparators) loads the encoder several times. A command
    uses one; a few are kept for processes that switch between archs or seeds (the test suite)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _freeze(build(arch))


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def display_name(arch):
    return "AlexNet" if arch == "alexnet" else arch
