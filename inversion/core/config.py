"""The pipeline's settings: plain data, validated once, at the edge.

A config is a flat dict keyed by dotted names (``cfg["train.lr"]``). Flat keys make
``--set`` overrides, error messages and hashing of config subsets one-liners.
"""

import copy
import hashlib
import json
from pathlib import Path

import yaml

from inversion.core.errors import UserError
from inversion.core.layouts import ALEXNET_NODES

LAYERS = ("conv2", "conv5", "fc6", "fc8")  # the default four

# key: (default, accepted types, extra check or None, what is expected). config.yaml holds the same defaults.
_NUM = (int, float)
SCHEMA = {
    "seed": (0, int, lambda v: v >= 0, "an integer >= 0"),
    "data.path": (None, (str, type(None)), None, "a path or null"),
    "data.format": ("auto", str, lambda v: v in ("auto", "tiny-imagenet", "imagefolder"), "auto, tiny-imagenet or imagefolder"),
    "data.image_size": (64, int, lambda v: v >= 16 and v & (v - 1) == 0,
                        "a power of two >= 16: decoders double their grid with each up-convolution"),
    # The upper limits of the split follow the data: make_split names the class that falls short.
    "split.num_classes": (20, int, lambda v: v >= 1, "an integer >= 1"),
    "split.eval_per_class": (50, int, lambda v: v >= 1, "an integer >= 1"),
    "split.train_per_class": (None, (int, type(None)), lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "encoder.arch": ("alexnet", str, lambda v: v != "", "a torchvision classifier name, e.g. alexnet, resnet18"),
    "encoder.weights": ("auto", str, lambda v: v != "", "auto, imagenet, random or a file path"),
    "encoder.input_size": (224, int, lambda v: 64 <= v <= 1024, "an integer in 64..1024"),
    "layers": (list(LAYERS), list, lambda v: len(v) > 0 and all(isinstance(x, str) and x for x in v),
               "`all` or a non-empty list of layer names"),
    "cache.dir": ("cache", str, None, "a folder path"),
    "cache.dtype": ("float16", str, lambda v: v in ("float16", "float32"), "float16 or float32"),
    # Not in CACHE_KEYS: the values are the same, so a cache of any compression is a hit for every setting.
    "cache.compression": ("none", str, lambda v: v in ("none", "lzf", "blosc2-zstd"), "none, lzf or blosc2-zstd"),
    "extract.batch_size": (64, int, lambda v: v >= 1, "an integer >= 1"),
    "extract.workers": ("auto", (str, int), lambda v: v == "auto" or (isinstance(v, int) and v >= 1),
                        "auto or an integer >= 1"),
    "device": ("auto", str, lambda v: v in ("auto", "cpu", "mps") or v.startswith("cuda"), "auto, cpu, cuda, cuda:N or mps"),
    # What training, decoding and the baseline compute in (runtime.resolve_precision); weights stay fp32.
    "precision": ("auto", str, lambda v: v in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
    "decoder.width": (0.5, _NUM, lambda v: 0 < v <= 4, "a number in (0, 4]"),
    "decoder.fc_width": (4096, int, lambda v: v >= 16 and v % 16 == 0, "a multiple of 16 (the paper's 4096)"),
    "train.epochs": ("auto", (str, int), lambda v: v == "auto" or (isinstance(v, int) and v >= 0),
                     "auto or an integer >= 0"),
    "train.batch_size": (32, int, lambda v: v >= 1, "an integer >= 1"),
    "train.lr": (3e-4, _NUM, lambda v: v > 0, "a number > 0"),
    "train.betas": ([0.9, 0.999], list, lambda v: len(v) == 2 and all(isinstance(b, _NUM) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "train.weight_decay": (0.0, _NUM, lambda v: v >= 0, "a number >= 0"),
    "train.schedule": ("none", str, lambda v: v in ("none", "cosine"), "none or cosine"),
    "train.warmup": (0.0, _NUM, lambda v: 0 <= v < 1, "a number in [0, 1) (a fraction of the steps)"),
    "train.holdout": (0.0, _NUM, lambda v: 0 <= v < 1, "a number in [0, 1) (a fraction of the train split)"),
    "train.in_memory": ("auto", (str, bool), lambda v: v in ("auto", True, False), "auto, true or false"),
    "train.shuffle_buffer": (4096, int, lambda v: v >= 1, "an integer >= 1"),
    "train.tensorboard": (True, bool, None, "true or false"),
    # Clip the global L2 norm of each step's gradient (null: off): a guard against the rare spikes that can derail
    # Adam, as a trained encoder's fc6 did once (docs/decoders-and-training.md#gradient-clipping).
    "train.grad_clip": (1.0, (int, float, type(None)), lambda v: v is None or v > 0, "null or a number > 0"),
    "train.init_from": (None, (str, type(None)), None, "null or a decoders folder (e.g. outputs/decoders)"),
    # An in-progress checkpoint within an epoch at most this often (training.py); null: at each epoch's end only.
    "train.checkpoint_minutes": (None, (int, float, type(None)), lambda v: v is None or v > 0,
                                 "null or a number of minutes > 0"),
    # Training objective (docs/perceptual-losses.md): pixel only, weight 1, is the 2016 paper's.
    "loss.pixel": (1.0, _NUM, lambda v: v >= 0, "a number >= 0"),
    "loss.feature": (0.0, _NUM, lambda v: v >= 0, "a number >= 0"),
    "loss.adversarial": (0.0, _NUM, lambda v: v >= 0, "a number >= 0"),
    "loss.comparator": ("conv5", str, lambda v: v != "", "a layer (node) of the cache's encoder, e.g. conv5"),
    "render.num_images": (20, int, lambda v: v >= 1, "an integer >= 1"),
    "render.grid_size": (8, int, lambda v: 1 <= v <= 32, "an integer in 1..32"),
    "render.top1": ("auto", (str, bool), lambda v: v in ("auto", True, False), "auto, true or false"),
    "render.analyses": (False, bool, None, "true or false"),
    "render.compare_with": ([], list, lambda v: all(isinstance(x, str) and x for x in v),
                            "a list of other runs' output.dir folders"),
    "output.dir": ("outputs", str, None, "a folder path"),
    # train_encoder.py (docs/encoder-training.md): a classifier trained here, where ImageNet weights cannot be had.
    "encoder_training.epochs": (13, int, lambda v: v >= 1, "an integer >= 1"),
    "encoder_training.batch_size": (128, int, lambda v: v >= 2, "an integer >= 2"),
    "encoder_training.num_classes": (None, (int, type(None)), lambda v: v is None or v >= 2, "null (all) or an integer >= 2"),
    "encoder_training.train_per_class": (None, (int, type(None)), lambda v: v is None or v >= 1, "null (all) or an integer >= 1"),
    "encoder_training.output": (None, (str, type(None)), None, "null (encoders/<arch>-<dataset>.pt) or a file path"),
    "encoder_training.lr": (0.02, _NUM, lambda v: v > 0, "a number > 0"),
    "encoder_training.momentum": (0.9, _NUM, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "encoder_training.weight_decay": (5e-5, _NUM, lambda v: v >= 0, "a number >= 0"),
    "encoder_training.label_smoothing": (0.1, _NUM, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "encoder_training.warmup": (0.03, _NUM, lambda v: 0 <= v < 1, "a fraction of the steps in [0, 1)"),
    "encoder_training.min_input_size": (160, int, lambda v: 32 <= v <= 1024, "an integer in 32..1024"),
    "encoder_training.full_size_epochs": (3, int, lambda v: v >= 1, "an integer >= 1"),
    "encoder_training.crop_scale": ([0.35, 1.0], list, lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
                                    "[min, max] fractions of the image's area, 0 < min <= max <= 1"),
    "encoder_training.batchnorm": ("auto", (str, bool), lambda v: v in ("auto", True, False), "auto, true or false"),
    "encoder_training.checkpoint_minutes": (None, (int, float, type(None)), lambda v: v is None or v > 0,
                                            "null or a number of minutes > 0"),
    "encoder_training.tensorboard": (True, bool, None, "true or false"),
    # Inversion by optimisation (invert_by_optimisation.py); docs/optimisation-baseline.md says which constants are M&V's.
    "optimisation.iterations": (200, int, lambda v: v >= 1, "an integer >= 1"),
    "optimisation.optimizer": ("adam", str, lambda v: v in ("adam", "sgd"), "adam or sgd"),
    "optimisation.lr": (0.03, _NUM, lambda v: v > 0, "a number > 0"),
    "optimisation.momentum": (0.9, _NUM, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optimisation.alpha": (6, _NUM, lambda v: v >= 1, "a number >= 1"),
    "optimisation.beta": (2, _NUM, lambda v: v >= 1, "a number >= 1"),
    "optimisation.lambda_alpha": (1e-3, _NUM, lambda v: v >= 0, "a number >= 0"),
    "optimisation.lambda_tv": (3.0, _NUM, lambda v: v >= 0, "a number >= 0"),
    "optimisation.jitter": (2, int, lambda v: v >= 0, "an integer >= 0 (pixels)"),
    "optimisation.init": ("mean", str, lambda v: v in ("mean", "decoder"), "mean or decoder"),
    "optimisation.init_std": (0.01, _NUM, lambda v: v >= 0, "a number >= 0"),
    # {layer: {key: value}}: any optimisation.* key above, for that layer only (M&V tune per layer);
    # each inner value is checked by the key's own check (_check_per_layer).
    "optimisation.layers": ({"conv5": {"lambda_tv": 0.3, "iterations": 800}, "fc6": {"lambda_tv": 0.3, "iterations": 800}}, dict, lambda v: all(isinstance(k, str) and k for k in v),
                            "a mapping {layer: {optimisation key: value}}"),
}
# Keys whose value is a mapping: a YAML file's nesting stops there instead of naming sub-keys.
_MAPPINGS = tuple(key for key, (_, types, *_) in SCHEMA.items() if types is dict)

# The settings that shape a feature cache; hashed into its file name.
CACHE_KEYS = ("seed", "data.format", "data.image_size", "split.num_classes", "split.eval_per_class",
              "split.train_per_class", "encoder.arch", "encoder.weights", "encoder.input_size", "layers", "cache.dtype")


def defaults():
    return {key: copy.deepcopy(default) for key, (default, *_) in SCHEMA.items()}


def load(path="config.yaml", overrides=()):
    """Read a YAML file, apply ``key=value`` overrides, validate everything. Raises UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    cfg = defaults()
    for key, value in _flatten(raw).items():
        _check_known(key, f"{path}: ")
        cfg[key] = value
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot parse value {text!r}") from None
        if not _set_inside_mapping(cfg, key, value):
            _check_known(key, "--set: ")
            cfg[key] = value
    cfg["layers"] = _expand_all(cfg["layers"], cfg["encoder.arch"])
    for key, value in cfg.items():
        cfg[key] = _coerce(key, value)
        _validate(key, cfg[key])
    if len(set(cfg["layers"])) != len(cfg["layers"]):
        raise UserError(f"layers: repeated layer in {cfg['layers']}")
    check_layers(cfg, cfg["layers"], "layers")
    check_layers(cfg, [cfg["loss.comparator"]], "loss.comparator")
    cfg["optimisation.layers"] = _check_per_layer(cfg, cfg["optimisation.layers"])
    return cfg


def chosen_layers(cfg, text):
    """The `--layers` option of every command line: a checked list, or None for all of `layers`."""
    chosen = text.split(",") if text else None
    check_layers(cfg, chosen or [], "--layers")
    return chosen


def check_layers(cfg, layers, where):
    """AlexNet's names are known here; other archs' node names are checked against their graph
    when the encoder is built (that needs torchvision, which this module does not import)."""
    if cfg["encoder.arch"] != "alexnet":
        return
    unknown = [x for x in layers if x not in ALEXNET_NODES]
    if unknown:
        raise UserError(f"{where}: unknown layer {unknown[0]!r} (known: {', '.join(ALEXNET_NODES)}, or all)")


def _expand_all(layers, arch):
    if layers != "all" and layers != ["all"]:
        return layers
    if arch != "alexnet":
        raise UserError(f"layers: `all` is defined for alexnet only; list {arch}'s node names "
                        f"(python extract_features.py --list-layers)")
    return list(ALEXNET_NODES)


def digest(obj):
    """Stable short hash of plain data: names caches, pins checkpoints and reports to settings."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _set_inside_mapping(cfg, key, value):
    """`--set optimisation.layers.conv5.jitter=4`: one entry of a mapping key, merged into what the file
    set (the whole mapping is `--set 'optimisation.layers={conv5: {jitter: 4}}'`). False for other keys."""
    base = next((m for m in _MAPPINGS if key.startswith(m + ".")), None)
    if base is None:
        return False
    outer, sep, inner = key[len(base) + 1:].rpartition(".")  # rpartition: layer names may hold dots
    if not sep or not outer or not inner:
        raise UserError(f"--set {key}: expected {base}.<layer>.<key>=value")
    mapping = cfg[base] if isinstance(cfg[base], dict) else {}
    entry = mapping.get(outer) if isinstance(mapping.get(outer), dict) else {}
    cfg[base] = {**mapping, outer: {**entry, inner: value}}
    return True


def _check_per_layer(cfg, per_layer):
    """optimisation.layers, each inner value checked (and coerced) as its global optimisation.* key is,
    so a per-layer value can be nothing the global key could not be. Names the full dotted key."""
    known = [key.split(".", 1)[1] for key in SCHEMA if key.startswith("optimisation.") and key not in _MAPPINGS]
    check_layers(cfg, list(per_layer), "optimisation.layers")
    checked = {}
    for layer, values in per_layer.items():
        if not isinstance(values, dict):
            raise UserError(f"config key optimisation.layers.{layer}: invalid value {values!r} "
                            f"(expected a mapping of optimisation keys, e.g. {{lambda_tv: 10, jitter: 4}})")
        checked[layer] = {}
        for key, value in values.items():
            if key not in known:
                raise UserError(f"config key optimisation.layers.{layer}.{key}: unknown key "
                                f"(expected one of {', '.join(known)})")
            checked[layer][key] = _coerce(f"optimisation.{key}", value)
            _validate(f"optimisation.{key}", checked[layer][key], f"optimisation.layers.{layer}.{key}")
    return checked


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in _MAPPINGS:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _check_known(key, where):
    if key not in SCHEMA:
        raise UserError(f"{where}unknown config key {key!r}")


def _coerce(key, value):
    """YAML 1.1 reads `1e-3` as a string; accept it where a number is expected."""
    if isinstance(value, str) and float in _as_tuple(SCHEMA[key][1]):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _validate(key, value, name=None):
    """`name`: the key to name in the error when it is not `key` (a per-layer value checked as `key`)."""
    _, types, check, expected = SCHEMA[key]
    if isinstance(value, bool) and bool not in _as_tuple(types):
        ok = False  # YAML's true/false must not pass as the number 1/0
    else:
        ok = isinstance(value, types) and (check is None or check(value))
    if not ok:
        raise UserError(f"config key {name or key}: invalid value {value!r} (expected {expected})")


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)
