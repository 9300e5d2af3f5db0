"""Seeds: one random stream per purpose, so that what one layer or epoch draws does not depend on the others."""

import zlib

import numpy as np


def derive_seed(seed, name, *stream):
    """One random stream per (seed, name, *stream), e.g. (seed, layer, epoch): what one layer draws does
    not depend on which other layers run, so training one layer alone equals training it with others."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode()), *stream]).generate_state(1)[0])
