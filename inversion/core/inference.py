"""Trained decoders at work: loading them for a cache, and decoding features into images. What render.py,
reconstruct.py and invert_by_optimisation.py share; none of them trains or reads optimiser state."""

import numpy as np
import torch

from inversion.core import checkpoints, runtime
from inversion.core.console import warn
from inversion.core.errors import UserError


def load_decoders(cfg, cache, layers):
    """{layer: (decoder, checkpoint)} from each layer's `best.pt`, for the layers that have a readable one
    trained on this very cache; warns about the rest, and refuses when none is left. Each decoder carries
    the `precision` setting it decodes in (`decode` reads it), so the stages that hand models and a device
    on to each other need not thread the setting through as well."""
    decoders, skipped = {}, []
    for layer in layers:
        path = checkpoints.folder(cfg, layer) / checkpoints.BEST
        if layer not in cache.attrs["layers"]:
            skipped.append(f"{layer}: not in cache {cache.path}; skipped")
        elif not path.exists():
            skipped.append(f"{layer}: no checkpoint at {path}; skipped (run train_decoders.py --layers {layer})")
        else:
            try:
                decoders[layer] = checkpoints.load_decoder(path)
                decoders[layer][0].precision = cfg["precision"]
            except checkpoints.DamagedCheckpoint as e:
                skipped.append(f"{layer}: {e}; skipped (re-run train_decoders.py --layers {layer} to replace it)")
    for message in skipped:
        warn(message)
    if not decoders:
        raise UserError(f"no decoder checkpoints under {checkpoints.folder(cfg)} for {', '.join(layers)}; "
                        f"run `python train_decoders.py` with the same --config/--set options first")
    stale = [layer for layer, (_, ckpt) in decoders.items() if ckpt["cache_hash"] != cache.attrs["cache_hash"]]
    if stale:
        raise UserError(f"checkpoints for {', '.join(stale)} were trained on another cache than {cache.path}; "
                        f"re-run `python train_decoders.py --fresh`")
    return decoders


@torch.no_grad()
def decode(model, features, batch, device, perturb=None):
    """Decoder outputs for `features` (an array, HDF5 dataset or tensor, (N, *shape)), `batch` rows at a
    time, each batch first passed through `perturb` if given; clamped to [0, 1], a CPU float tensor
    (N, 3, S, S). In the precision the model carries (`load_decoders`; fp32 for one built elsewhere)."""
    model = model.to(device).eval()
    precision = runtime.resolve_precision(getattr(model, "precision", "fp32"), device)
    outs = []
    for start in range(0, len(features), batch):
        x = torch.as_tensor(np.asarray(features[start:start + batch])).float()
        x = (perturb(x) if perturb else x).to(device)
        with runtime.autocast(device, precision):
            outs.append(model(x).float().clamp_(0, 1).cpu())
    return torch.cat(outs)
