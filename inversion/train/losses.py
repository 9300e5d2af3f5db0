"""The training objective beyond pixel MSE: Dosovitskiy & Brox's perceptual losses ("DeePSiM", NIPS 2016).

    loss = loss.pixel * MSE(G(x), y) + loss.feature * MSE(C(G(x)), C(y)) + loss.adversarial * CE(D(G(x)), real)

- C, the comparator: the frozen encoder that built the cache, tapped at `loss.comparator`. The targets'
  comparator features are read from the cache when that node is a cached layer, so only the reconstructions
  go through the encoder (differentiably, with exactly the cache's preprocessing).
- D, the discriminator (their five convolutions, average pooling, dropout, fc 256, dropout, fc 2), trained
  alongside with Adam (2e-4, betas 0.9/0.999) to tell cached images from reconstructions.
- Balancing, from their train.py: r = D's loss (real + fake) / G's adversarial loss; D pauses when
  r < 0.1 and resumes when r > 0.5; G pauses when r > 10.

All MSE terms are PyTorch means (over every element), not Caffe's sums: docs/perceptual-losses.md derives
the weights that match the paper's. Only the objective lives here: training.py runs the loop.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inversion.core import checkpoints, distributed, runtime, seeds
from inversion.core.errors import UserError
from inversion.core.images import to_target

D_LR, D_BETAS = 2e-4, (0.9, 0.999)
PAUSE_D, RESUME_D, PAUSE_G = 0.1, 0.5, 10.0


def active(cfg):
    """Whether the objective differs from today's pixel MSE (weight 1): only then is this module used."""
    return cfg["loss.feature"] > 0 or cfg["loss.adversarial"] > 0 or cfg["loss.pixel"] != 1.0


def check_objective(cfg):
    """Refused before any work: with all three weights 0 the loss is a constant zero, and training would run
    to the end, writing checkpoints, without learning anything."""
    keys = ("loss.pixel", "loss.feature", "loss.adversarial")
    if all(cfg[key] == 0 for key in keys):
        raise UserError(f"{', '.join(keys[:2])} and {keys[2]} are all 0: the training objective would be zero; "
                        f"give at least one a weight above 0 (the default is loss.pixel=1)")


def settings(cfg):
    """What a checkpoint trained with these losses is pinned to."""
    return {key: cfg[key] for key in ("loss.pixel", "loss.feature", "loss.adversarial", "loss.comparator")}


class Discriminator(nn.Module):
    """Image (B, 3, S, S) in [0, 1] -> logits (B, 2) for (fake, real): the DeePSiM discriminator's layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 7, stride=4, padding=3), nn.ReLU(),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(256, 2))

    def forward(self, images):
        return self.classifier(self.features(images * 2 - 1))  # centred, as their mean-subtracted input


class Balance:
    """Their rule for keeping G and D level: a pause state that travels with the checkpoint."""

    def __init__(self, d_on=True):
        self.d_on = d_on

    def update(self, d_loss, g_adv):
        """From the last step's losses: (train D, train G) for the next step."""
        r = d_loss / max(g_adv, 1e-12)
        if self.d_on and r < PAUSE_D:
            self.d_on = False
        elif not self.d_on and r > RESUME_D:
            self.d_on = True
        return self.d_on, r <= PAUSE_G


class Objective:
    """The generator's loss per batch (stepping D on the way), the discriminator's state for checkpoints."""

    def __init__(self, cfg, cache, layer, device, precision="fp32"):
        self.precision = precision  # every network's forward under it (runtime.autocast); losses in fp32
        self.grad_clip = cfg["train.grad_clip"]
        self.weights = {name: cfg[f"loss.{name}"] for name in ("pixel", "feature", "adversarial")}
        self.node = cfg["loss.comparator"]
        self.cached = self.node in cache.attrs["layers"]
        self.comparator = comparator(cfg, cache, self.node, device) if self.weights["feature"] > 0 else None
        self.d = self.d_net = self.d_optimizer = None
        self.balance, self.last = Balance(), (1.0, 1.0)  # r = 1 before the first step: both train
        self.counts = dict.fromkeys(("d_steps", "g_steps", "steps", "samples", "pixel", "feature", "adversarial"), 0)
        if self.weights["adversarial"] > 0:
            torch.manual_seed(seeds.derive_seed(cfg["seed"], layer, 0, 1))  # D's own stream: G's init stays
            self.d = Discriminator().to(device)
            self.d_net = self.d
            self.d_optimizer = runtime.adam(self.d.parameters(), device, lr=D_LR, betas=D_BETAS)

    def start_epoch(self, seed, layer, epoch):
        """D's dropout draws from torch's global generator: seeded per epoch, so a resumed run draws what
        the uninterrupted one would have."""
        torch.manual_seed(seeds.derive_seed(seed, layer, epoch + 1, 1))

    def wrap(self, device):
        """Under torchrun D, like G, is one model over all ranks."""
        if self.d is not None and distributed.launched():
            self.d_net = nn.parallel.DistributedDataParallel(
                self.d, device_ids=[device] if device.type == "cuda" else None)

    def comparator_targets(self, cache, split, indices=None):
        """The targets' comparator features from the cache (in memory), or None when they must be encoded."""
        if self.comparator is None or not self.cached:
            return None
        data = cache[split][self.node][()]
        return data if indices is None else data[indices]

    def step(self, model, optimizer, x, y, target_features, weight):
        """One optimiser step of G (and of D when it is not paused); returns G's loss times `weight`,
        detached, for the epoch's mean. `target_features`: the batch's cached comparator features or None."""
        train_d, train_g = self.balance.update(*self.last)
        target = to_target(y)
        with self._autocast(x):
            out = model(x.float()).float()
        d_loss = g_adv = torch.zeros((), device=out.device)
        if self.d is not None:
            d_loss = self._discriminator_step(out, target, weight, train_d)
        terms = {"pixel": F.mse_loss(out, target)}
        if self.comparator is not None:
            with self._autocast(x):
                if target_features is None:
                    with torch.no_grad():
                        target_features = self.comparator(target)
                reconstructed = self.comparator(out).float()
            terms["feature"] = F.mse_loss(reconstructed, target_features.float())
        if self.d is not None:
            with self._autocast(x):
                logits = self.d_net(out).float()
            terms["adversarial"] = g_adv = F.cross_entropy(
                logits, torch.ones(len(out), dtype=torch.long, device=out.device))
        loss = sum(self.weights[name] * value for name, value in terms.items())
        if len(x) == 0:
            loss = out.sum() * 0
        optimizer.zero_grad(set_to_none=True)
        (loss * weight).backward()
        if train_g:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            optimizer.step()
        # every rank decides the same pauses: from the losses summed over ranks
        d_sum, g_sum, n = distributed.all_sum([d_loss.item() * len(x), g_adv.item() * len(x), len(x)], out.device)
        self.last = (d_sum / max(n, 1), g_sum / max(n, 1))
        self.counts["steps"] += 1
        self.counts["samples"] += len(x)
        for name, value in terms.items() if len(x) else ():  # unweighted: what the weights are chosen by
            self.counts[name] += value.item() * len(x)
        self.counts["d_steps"] += bool(train_d and self.d is not None)
        self.counts["g_steps"] += bool(train_g)
        return loss.detach() * weight

    def _discriminator_step(self, fake, real, weight, train):
        """D's loss on a real and a fake batch (summed, as r wants it); a step unless paused."""
        self.d_net.train()
        with self._autocast(real):
            logits = self.d_net(torch.cat([real, fake.detach()])).float()
        labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).long().to(real.device)
        d_loss = 2 * F.cross_entropy(logits, labels) if len(real) else logits.sum() * 0
        self.d_optimizer.zero_grad(set_to_none=True)
        (d_loss * weight).backward()  # every rank joins D's all-reduce, paused or not
        if train:
            self.d_optimizer.step()
        return d_loss.detach()

    def _autocast(self, x):
        return runtime.autocast(x.device, self.precision)

    def summary(self):
        """Per epoch, for the history: each term's mean before weighting (this rank's samples) and, with
        a discriminator, how often each network stepped; resets the counts."""
        counts, self.counts = self.counts, {key: 0 for key in self.counts}
        n = max(1, counts["samples"])
        means = {f"{name}_term": counts[name] / n for name in ("pixel", "feature", "adversarial")
                 if name == "pixel" or self.weights[name] > 0}
        if self.d is None:
            return means
        return {**means, "d_step_share": round(counts["d_steps"] / max(1, counts["steps"]), 4),
                "g_step_share": round(counts["g_steps"] / max(1, counts["steps"]), 4)}

    def state(self):
        """(what goes into last.pt / best.pt, what goes into optimizer.pt)."""
        if self.d is None:
            return {}, {}
        return ({"discriminator": self.d.state_dict(), "balance": {"d_on": self.balance.d_on, "last": list(self.last)}},
                {"discriminator_optimizer": self.d_optimizer.state_dict()})

    def load(self, checkpoint, optimizer_state):
        if self.d is None:
            return
        self.d.load_state_dict(checkpoint["discriminator"])
        self.balance.d_on = checkpoint["balance"]["d_on"]
        self.last = tuple(checkpoint["balance"]["last"])
        if optimizer_state:
            self.d_optimizer.load_state_dict(optimizer_state["discriminator_optimizer"])


def comparator(cfg, cache, node, device):
    """Images in [0, 1] -> the cache's encoder's activation at `node`, differentiable, frozen. Refused when
    that encoder cannot be had again exactly (its weights file gone or changed)."""
    from inversion.core import encoder, encoder_graph  # only here: pixel-only training imports neither (nor torchvision)

    identity = cache.attrs["encoder"]
    model = encoder.reload_exactly(identity, cache.path, "the feature loss's comparator is that encoder: set "
                                   "loss.feature=0 or re-run extract_features.py")
    try:
        taps = encoder_graph.extractor(model, identity.get("arch", "alexnet"), [node]).to(device)
    except UserError as e:
        raise UserError(f"loss.comparator: {e}") from None
    for p in taps.parameters():
        p.requires_grad_(False)
    arch, size = identity.get("arch", "alexnet"), cfg["encoder.input_size"]

    def features(images):
        return taps(encoder.preprocess_float(images, size, arch))[node]
    return features


def with_comparator_targets(batches, train_x, train_y, targets, device):
    """Training batches drawn as row indices (see training), gathered into (x, y, comparator targets or
    None, global batch size): the cached comparator features ride along with their images."""
    for idx, _, size in batches:
        rows = idx.cpu().numpy()
        c = None if targets is None else torch.from_numpy(targets[rows]).to(device)
        if isinstance(train_x, torch.Tensor):  # already on the GPU
            rows = idx.to(train_x.device)
        yield torch.as_tensor(train_x[rows]).to(device), torch.as_tensor(train_y[rows]).to(device), c, size


def check_inputs(cfg, train_x):
    """The perceptual losses draw rows by index, which needs the training split in memory, and its
    comparator targets for the same rows, which train.holdout would reorder."""
    from inversion.train.batching import is_streamed

    if is_streamed(train_x):
        raise UserError("loss.feature / loss.adversarial need the training split in memory: set "
                        "train.in_memory=true (or a smaller split)")
    if cfg["train.holdout"]:
        raise UserError(f"train.holdout={cfg['train.holdout']} is for tuning pixel-only decoders; set "
                        f"train.holdout=0 with loss.feature / loss.adversarial")


def initial_weights(folder, layer, guard):
    """`train.init_from`: the checkpoint a new decoder starts from (fine-tuning), `folder`/<layer>/best.pt,
    trained on the same cache with the same architecture."""
    path = Path(folder) / layer / checkpoints.BEST
    if not path.is_file():
        raise UserError(f"train.init_from: no {path} (run train_decoders.py --layers {layer} with "
                        f"output.dir={Path(folder).parent} first)")
    checkpoint = checkpoints.load(path)
    for key in ("cache_hash", "decoder"):
        if checkpoints.mismatch(checkpoint, {key: guard[key]}):
            what = "cache" if key == "cache_hash" else "decoder architecture (decoder.width, decoder.fc_width)"
            raise UserError(f"train.init_from: {path} was trained with another {what} than this run")
    return checkpoint
