"""Where an encoder is tapped: the nodes of a torchvision classifier's eval graph, which of them a decoder
can read and how their outputs are laid out, and the graph module that returns them.

Tap points are data (graph node names), not code: torchvision's `feature_extraction` turns the
model into one graph that returns every requested node from a single forward pass.
"""

import contextlib
import difflib
import functools
import inspect
import io
import math

import torch
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor

from inversion.core import encoder
from inversion.core.errors import UserError
from inversion.core.layouts import ALEXNET_NODES


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


def feature_shapes(arch, input_size, layers, num_classes=None):
    """Per-layer activation shape (without batch), from a weightless forward on the meta device."""
    return {layer: shape for layer, (shape, _) in feature_layouts(arch, input_size, layers, num_classes).items()}


def feature_layouts(arch, input_size, layers, num_classes=None):
    """{layer: (shape without batch, layout)}; a node no decoder can read is refused in one line."""
    found = _classified(arch, input_size, tuple(layers), num_classes)
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


# Probed twice, as batches of 2 and of 3 images: a node whose first dimension is not the batch is not
# per image (a parameter, a constant, windows of several images). The second batch is PROBE_STEP
# pixels larger where the arch accepts it (ViT accepts one size only): the dimensions that grow with
# the input are the spatial ones, which tells (C, H, W) from (H, W, C) and tokens from channels.
PROBE_BATCHES = (2, 3)
PROBE_STEP = 32


@functools.lru_cache(maxsize=64)
def _classified(arch, input_size, layers, num_classes=None):
    """`_classify(_probe(...))`, remembered: tracing a graph costs up to seconds (MaxViT), and one command
    (or test session) asks about the same arch and nodes several times. Plain tuples: nothing to mutate."""
    return _classify(_probe(arch, input_size, None if layers is None else list(layers), num_classes))


def _probe(arch, input_size, layers=None, num_classes=None):
    """({layer or node: output at batch 2}, {... at batch 3}, whether the second input was larger),
    from forwards of an unweighted model on the meta device (no memory, no compute), run node by node
    through the one traced eval graph (`_eval_graph`): no tracing per question."""
    module, qualnames = _eval_graph(arch, num_classes)
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
def _eval_graph(arch, num_classes=None):
    """(graph module, {fx node: node name}) of the arch's eval graph on the meta device, traced once per
    process with feature_extraction's tracer and its defaults: the names and the graph depend on the
    arch alone (not its weights), and a trace costs seconds for MaxViT and ViT."""
    model = encoder.meta_model(arch, num_classes)
    ops = [cls for _, cls in inspect.getmembers(torchvision.ops, inspect.isclass) if issubclass(cls, nn.Module)]
    tracer = NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=ops)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__), dict(tracer.node_to_qualname)
