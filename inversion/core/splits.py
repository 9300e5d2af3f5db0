"""Which images a run uses: the seeded class choice, the decoders' split into training and evaluation
images, and the split of an encoder trained here, which never trains on an image the decoders are
evaluated on."""

import hashlib
from dataclasses import dataclass

import numpy as np

from inversion.core.errors import UserError


@dataclass
class Split:
    wnids: list      # chosen classes, sorted; label i is wnids[i]
    names: list      # their words.txt names
    train: list      # [(member, label)]
    eval: list

    def fingerprint(self, dataset):
        """Content identity of exactly the images in the split, independent of where they live."""
        h = hashlib.sha256()
        for part in (self.train, self.eval):
            for member, label in part:
                h.update(f"{member}\t{label}\t{dataset.crc32(member):08x}\n".encode())
        return h.hexdigest()[:16]


def choose_classes(dataset, seed, num_classes, key="split.num_classes"):
    """`num_classes` of the dataset's classes drawn with `seed`, sorted (label i is the i-th)."""
    all_wnids = dataset.wnids()
    if not 1 <= num_classes <= len(all_wnids):
        raise UserError(f"{key}: {num_classes} is outside 1..{len(all_wnids)}")
    chosen = np.random.default_rng([seed, 0]).choice(len(all_wnids), num_classes, replace=False)
    return sorted(all_wnids[i] for i in chosen)


def held_out(dataset, wnid, seed, eval_per_class, all_wnids):
    """The train/ images of class `wnid` that a dataset without val/ holds out for evaluation. Drawn by the
    class's place among all the dataset's classes (`all_wnids`), not among the classes a split chose: the same
    images for every split.num_classes, so an encoder trained on every class can leave out exactly these."""
    pool = dataset.train_images(wnid)
    if len(pool) <= eval_per_class:
        raise UserError(f"split.eval_per_class: class {wnid} has {len(pool)} train images and no "
                        f"val/, {eval_per_class} requested to hold out (and at least 1 must stay for training)")
    return _subset(pool, eval_per_class, [seed, 1, all_wnids.index(wnid)])


def _pools(dataset, val, wnid, seed, eval_per_class, all_wnids):
    """(training pool, held-out pool) of class `wnid`: train/ and val/, or train/ less what `held_out` names."""
    pool = dataset.train_images(wnid)
    if val is not None:
        return pool, val.get(wnid, [])
    held = held_out(dataset, wnid, seed, eval_per_class, all_wnids)
    kept = set(held)
    return [m for m in pool if m not in kept], held


def make_split(dataset, seed, num_classes, eval_per_class, train_per_class=None):
    """Seeded class choice, then per class: eval images (val/, or held out of train/ where the
    dataset has no val/), and training images from the rest of train/.

    Each draw has its own stream, so changing one setting (say train_per_class) never changes
    which classes are chosen. A held-out image is never also a training image.
    """
    all_wnids, wnids = dataset.wnids(), choose_classes(dataset, seed, num_classes)
    words = dataset.words()
    val = dataset.val_images()
    train, evaluation = [], []
    for label, wnid in enumerate(wnids):
        pool_train, pool_eval = _pools(dataset, val, wnid, seed, eval_per_class, all_wnids)
        if val is not None and len(pool_eval) < eval_per_class:
            raise UserError(f"split.eval_per_class: class {wnid} has {len(pool_eval)} val images, "
                            f"{eval_per_class} requested")
        n_train = len(pool_train) if train_per_class is None else train_per_class
        if len(pool_train) < n_train or n_train == 0:
            held = "" if val is not None else f" after {eval_per_class} held out for eval"
            raise UserError(f"split.train_per_class: class {wnid} has {len(pool_train)} train images{held}, "
                            f"{n_train} requested")
        evaluation += [(m, label) for m in _subset(pool_eval, eval_per_class, [seed, 1, label])]
        train += [(m, label) for m in _subset(pool_train, n_train, [seed, 2, label])]
    return Split(wnids, [words.get(w, w) for w in wnids], train, evaluation)


def classifier_split(dataset, seed, num_classes, train_per_class, eval_per_class):
    """What an encoder trained here learns from and is scored on: the training images of `num_classes`
    classes (None: all, drawn as `choose_classes` draws) and, held out, val/ (all of it) or, without val/,
    exactly the images `make_split` holds out for evaluation under this seed and eval_per_class. No image
    the decoders are evaluated on is ever trained on."""
    all_wnids = dataset.wnids()
    wnids = all_wnids if num_classes is None else choose_classes(dataset, seed, num_classes,
                                                                 "encoder_training.num_classes")
    wnids = sorted(wnids)
    val = dataset.val_images()
    train, evaluation = [], []
    for label, wnid in enumerate(wnids):
        pool, held = _pools(dataset, val, wnid, seed, eval_per_class, all_wnids)
        if train_per_class is not None and len(pool) < train_per_class:
            raise UserError(f"encoder_training.train_per_class: class {wnid} has {len(pool)} training images, "
                            f"{train_per_class} requested")
        n = len(pool) if train_per_class is None else train_per_class
        train += [(m, label) for m in _subset(pool, n, [seed, 3, all_wnids.index(wnid)])]
        evaluation += [(m, label) for m in held]
    words = dataset.words()
    return Split(wnids, [words.get(w, w) for w in wnids], train, evaluation)


def _subset(members, n, seed):
    if n >= len(members):
        return members
    keep = np.random.default_rng(seed).choice(len(members), n, replace=False)
    return [members[i] for i in sorted(keep)]
