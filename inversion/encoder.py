"""The frozen encoder: which torchvision classifier, how its weights are found, how images are
prepared, and where it is tapped.

Preprocessing is spelled out exactly so anyone can recompute the cached features:
RGB uint8 SxS -> float in [0, 1] -> bilinear resize to input_size (align_corners=False)
-> normalisation with the mean/std of the arch's ImageNet weights.

Tap points are data (graph node names), not code: torchvision's `feature_extraction` turns the
model into one graph that returns every requested node from a single forward pass.
"""

import contextlib
import copy
import difflib
import functools
import hashlib
import inspect
import io
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor

from .config import ALEXNET_NODES
from .decoders import map_shape
from .errors import UserError

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


def load(arch="alexnet", weights="auto", seed=0):
    """(frozen model in eval mode, identity dict). The identity travels with every artifact."""
    if weights == "random":
        return _random(arch, seed)
    if weights in ("imagenet", "auto"):
        state, identity = _imagenet_state(arch, weights, seed)
        if state is None:
            return _random(arch, seed)
    else:
        state, identity = _file_state(Path(weights), arch)
    model = _meta_model(arch)  # no init to overwrite: the state's tensors become the weights (float32, as built)
    try:
        model.load_state_dict(state, assign=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise UserError(f"encoder.weights: {identity.get('path', hub_checkpoint(arch))} does not fit torchvision's "
                        f"{arch} ({first[1].strip() if len(first) > 1 else first[0]})") from None
    return _freeze(model.float()), identity


def _imagenet_state(arch, weights, seed):
    """The arch's ImageNet state_dict the standard way (the torch hub cache, else a download). `auto` falls
    back to random weights (state None, a loud warning) only when neither is there; a file that is there
    but cannot be read is an error naming it, never a silent fallback."""
    from .console import warn

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
        warn(f"ImageNet {_display(arch)} weights unavailable ({type(e).__name__}); using a RANDOM-INIT "
             f"encoder (seed {seed}). Results will NOT show what a pretrained {_display(arch)} keeps. "
             f"Put {path.name} at {path} to use the real weights.")
        return None, None
    return state, {"arch": arch, "kind": "imagenet", "name": f"{type(default).__name__}.{default.name}",
                   "sha256": _sha256(path) if path.is_file() else None}


def _file_state(path, arch):
    """(state_dict, identity) of a weights file, or a one-line error naming it."""
    if not path.is_file():
        raise UserError(f"encoder.weights: no such file: {path} (or use auto, imagenet, random)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        # torch.load raises many types for a damaged or foreign file
        raise UserError(f"encoder.weights: cannot read {path} as a state_dict ({type(e).__name__})") from None
    return state, {"arch": arch, "kind": "file", "path": str(path), "sha256": _sha256(path)}


def describe(identity):
    """One line for logs and figure titles; random weights are never passed off as pretrained."""
    arch = _display(identity.get("arch", "alexnet"))
    if identity["kind"] == "random":
        return f"{arch} random init, not ImageNet-pretrained (seed {identity['seed']})"
    if identity["kind"] == "imagenet":
        sha = identity.get("sha256")
        return f"{arch} ImageNet-pretrained ({identity['name']}{', sha256 ' + sha[:12] if sha else ''})"
    return f"{arch} weights from {identity['path']} (sha256 {identity['sha256'][:12]})"


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
    if identity["kind"] == "file":
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


def nodes(arch, layers):
    """{layer: graph node}. AlexNet's layer names map through docs/configuration.md's table; other archs'
    layers are node names already (a module name such as `layer2` means its last node)."""
    if arch == "alexnet":
        return {layer: ALEXNET_NODES.get(layer, layer) for layer in layers}
    return {layer: layer for layer in layers}


def extractor(model, arch, layers):
    """A graph module returning {layer: activation} for every layer from one forward pass."""
    wanted = nodes(arch, layers)
    _check_nodes(arch, wanted)
    return create_feature_extractor(model, return_nodes={node: layer for layer, node in wanted.items()},
                                    suppress_diff_warning=True)


def feature_shapes(arch, input_size, layers):
    """Per-layer activation shape (without batch), from a weightless forward on the meta device."""
    return {layer: shape for layer, (shape, _) in feature_layouts(arch, input_size, layers).items()}


def feature_layouts(arch, input_size, layers):
    """{layer: (shape without batch, layout)}; a node no decoder can read is refused in one line."""
    found = _classified(arch, input_size, tuple(layers))
    for layer in layers:
        shape, layout, reason = found[layer]
        if layout is None:
            raise UserError(f"layers: node {nodes(arch, [layer])[layer]!r} of {arch} outputs "
                            f"{'x'.join(map(str, shape)) + ', ' if shape else ''}{reason}; pick another "
                            f"(python extract_features.py --list-layers)")
    return {layer: found[layer][:2] for layer in layers}


def list_nodes(arch, input_size):
    """[(node, shape without batch or None, layout or None, why not where None)] for every node of
    the arch's eval graph, in network order."""
    return [(name, *value) for name, value in _classified(arch, input_size, None).items()]


def layout_text(shape, layout):
    """How a layout reads in listings: `C x H x W`, `H x W x C`, `tokens 1+14x14 x 768`, `vector`."""
    if layout in ("tokens", "cls_tokens"):
        channels, grid, _ = map_shape(shape, layout)
        return f"tokens {'1+' * (layout == 'cls_tokens')}{grid}x{grid} x {channels}"
    return {"chw": "C x H x W", "hwc": "H x W x C", "vector": "vector"}[layout]


# Probed twice, as batches of 2 and of 3 images: a node whose first dimension is not the batch is not
# per image (a parameter, a constant, windows of several images). The second batch is PROBE_STEP
# pixels larger where the arch accepts it (ViT accepts one size only): the dimensions that grow with
# the input are the spatial ones, which tells (C, H, W) from (H, W, C) and tokens from channels.
PROBE_BATCHES = (2, 3)
PROBE_STEP = 32


@functools.lru_cache(maxsize=64)
def _classified(arch, input_size, layers):
    """`_classify(_probe(...))`, remembered: tracing a graph costs up to seconds (MaxViT), and one command
    (or test session) asks about the same arch and nodes several times. Plain tuples: nothing to mutate."""
    return _classify(_probe(arch, input_size, None if layers is None else list(layers)))


def _probe(arch, input_size, layers=None):
    """({layer or node: output at batch 2}, {... at batch 3}, whether the second input was larger),
    from forwards of an unweighted model on the meta device (no memory, no compute), run node by node
    through the one traced eval graph (`_eval_graph`): no tracing per question."""
    module, qualnames = _eval_graph(arch)
    if layers is None:
        picked = {name: node for node, name in qualnames.items() if node.op != "placeholder"}
    else:
        wanted = nodes(arch, layers)
        _check_nodes(arch, wanted)
        picked = {layer: _last_node(qualnames, node) for layer, node in wanted.items()}

    def run(batch, size):
        interpreter = fx.Interpreter(module, garbage_collect_values=False)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # FX prints a failing node's source
            interpreter.run(torch.zeros(batch, 3, size, size, device="meta"))
        return {name: interpreter.env[node] for name, node in picked.items()}
    first = run(PROBE_BATCHES[0], input_size)
    try:
        return first, run(PROBE_BATCHES[1], input_size + PROBE_STEP), True
    except Exception:  # noqa: BLE001 - the arch refuses another size (ViT asserts, MaxViT cannot partition)
        return first, run(PROBE_BATCHES[1], input_size), False


def _last_node(qualnames, query):
    """The graph node `query` names: itself, or for a module name its last node (feature_extraction's rule)."""
    depth = query.count(".")
    return next(node for node, name in reversed(qualnames.items())
                if ".".join(name.split(".")[:depth + 1]) == query)


def _meta_model(arch):
    try:
        with torch.device("meta"):
            return _build(arch).eval()
    except NotImplementedError:  # an init that reads tensor values (regnet's widths): built, then moved
        return _build(arch).eval().to("meta")


def _classify(probe):
    """{name: (shape without batch or None, layout or None, why not)} from `_probe`'s two forwards."""
    first, second, resized = probe
    found = {}
    for name, a in first.items():
        b = second[name]
        if not isinstance(a, torch.Tensor):
            found[name] = (None, None, f"{type(a).__name__}, not one tensor")
        elif a.dim() == 0 or a.dim() != b.dim() or (a.shape[0], b.shape[0]) != PROBE_BATCHES:
            found[name] = (None, None, "a tensor whose first dimension is not the batch (not per image)")
        else:
            shape = tuple(a.shape[1:])
            spatial = tuple(i for i, (m, n) in enumerate(zip(a.shape[1:], b.shape[1:])) if m != n) if resized else None
            found[name] = (shape, *_layout(shape, spatial))
    return found


def _layout(shape, spatial):
    """(layout, None) or (None, why no decoder reads it). `spatial`: the dimensions that grew with
    the input, () for none (an adaptive pool fixed them), None where the arch takes one size only."""
    if len(shape) == 1:
        return "vector", None
    if len(shape) == 2 and spatial in (None, (0,)):
        patches = shape[0] - 1
        if patches >= 1 and math.isqrt(patches) ** 2 == patches:
            return "cls_tokens", None
        if math.isqrt(shape[0]) ** 2 == shape[0]:
            return "tokens", None
        return None, f"{shape[0]} rows: neither tokens on a square grid nor a class token and such tokens"
    if len(shape) == 2:
        return None, "a 2-D output whose first dimension is not tokens (not a map, tokens or a vector)"
    if len(shape) == 3:
        if spatial == (1, 2) or (not spatial and shape[1] == shape[2]):
            return "chw", None
        if spatial == (0, 1) or (not spatial and shape[0] == shape[1]):
            return "hwc", None
        return None, "a 3-D output without a square spatial pair (not a map, tokens or a vector)"
    return None, f"{len(shape)}-D per image (windows or channel groups; not a map, tokens or a vector)"


def network_order(arch, layers):
    """`layers` sorted by where they sit in the forward pass (the figures' column order)."""
    graph = _graph_nodes(arch)
    wanted = nodes(arch, layers)

    def position(layer):  # a module name stands where its last node does
        node = wanted[layer]
        return max((i for i, name in enumerate(graph) if name == node or name.startswith(node + ".")),
                   default=len(graph))
    return sorted(layers, key=position)


def _check_nodes(arch, wanted):
    known = list(_graph_nodes(arch))
    modules = {".".join(n.split(".")[:k]) for n in known for k in range(1, n.count(".") + 1)}
    for layer, node in wanted.items():
        if node not in known and node not in modules:
            close = difflib.get_close_matches(node, known + sorted(modules), n=3, cutoff=0.5)
            raise UserError(f"layers: {node!r} is not a node of {type(_eval_graph(arch)[0]).__name__}"
                            f"{' (nearest: ' + ', '.join(close) + ')' if close else ''}; "
                            f"see python extract_features.py --list-layers")


def _graph_nodes(arch):
    """The arch's eval-graph node names in network order (the input first)."""
    return tuple(_eval_graph(arch)[1].values())


@functools.lru_cache(maxsize=16)
def _eval_graph(arch):
    """(graph module, {fx node: node name}) of the arch's eval graph on the meta device, traced once per
    process with feature_extraction's tracer and its defaults: the names and the graph depend on the
    arch alone (not its weights), and a trace costs seconds for MaxViT and ViT."""
    model = _meta_model(arch)
    ops = [cls for _, cls in inspect.getmembers(torchvision.ops, inspect.isclass) if issubclass(cls, nn.Module)]
    tracer = NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=ops)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__), dict(tracer.node_to_qualname)


def _build(arch):
    imagenet_weights(arch)  # a clear error for an unknown arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. googlenet's note about its init scheme
        return torchvision.models.get_model(arch)


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
        return _freeze(_build(arch))


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _display(arch):
    return "AlexNet" if arch == "alexnet" else arch


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
