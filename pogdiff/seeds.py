"""Every seed the project derives, in one place: one derivation per kind of key, and who keys what.

A seed here is a pure function of a base seed (``--seed``) and keys, never of the machine, the batch size or the
order things run in, so that a resumed run replays the stream of an uninterrupted one and paired models see the
same noise. The returned integers are pinned by ``tests/test_seeds.py``: they drive the bitwise resume tests, the
validation grids and the demo's published numbers, so none of these functions may change what it returns.

Three derivations, by what the keys are:

- :func:`derive_seed` (integer keys, numpy ``SeedSequence`` hashing, 63 bits): the one to use for new streams.
- :func:`text_seed` (keys that are names, e.g. an identity: sha256 of their text). Two historical forms of it
  exist, :func:`image_seed` and :func:`pseudonym_hash`; they differ only in separator, byte order and width,
  and keep those so that their values stay as they were.
- :func:`validation_seed` (arithmetic, ``base + 1000 * prompt + image``): kept readable on purpose, so that a
  user can regenerate one cell of a validation grid with a plain diffusers pipeline and that seed.

Key layout, by caller (the keys after the base seed):

========================================  =====================================  ==========================
caller                                    call                                   stream
========================================  =====================================  ==========================
``sampling.EpochSampler.indices``         ``derive_seed(seed, epoch)``           the epoch's sample order
``data.TrainDataset`` (crop / flip)       ``derive_seed(seed, epoch, row)``      a row's augmentation
``sampling.RowCaptions.choice``           ``derive_seed(seed, epoch, row,        a row's caption
                                          CAPTION_STREAM)``
``train_pogdiff.py`` (one step)           ``derive_seed(seed, epoch, step,       the step's seed (noise,
                                          rank)``                                timesteps, neighbours)
``train_pogdiff.py``, ``bench_step.py``   ``derive_seed(step_seed, 1)``          the step's CPU generator
``density.fit_text_density``              ``derive_seed(seed, 1)``               the density VAE's noise
``benchmarks/bench_step.py``              ``derive_seed(seed, step)``            the step's seed
``evaluate_pogdiff.py``                   ``image_seed(seed, identity, i)``      image i of an identity
``longtail`` (pseudonyms, picks)          ``pseudonym_hash(seed, name)``         a name's pseudonym / draw
``validation`` (grids)                    ``validation_seed(seed, prompt, i)``   sample i of a prompt
========================================  =====================================  ==========================
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

CAPTION_STREAM = 2
"""Last key of the caption-choice stream, ``derive_seed(seed, epoch, row, CAPTION_STREAM)``, which keeps it apart
from the crop/flip stream ``derive_seed(seed, epoch, row)``."""

SEED_STRIDE = 1000
"""Validation seeds of consecutive prompts are this far apart, so up to this many images per prompt never
collide."""


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from `seed` and integer keys (epoch, step, rank, ...), well mixed.

    Streams keyed by different tuples are statistically independent (numpy's SeedSequence hashing), so e.g. the
    noise of step 3 on rank 1 never repeats that of step 1 on rank 3. `seed` is taken modulo 2**64 (a negative
    seed wraps); the keys must be non-negative.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *[int(k) for k in keys]]).generate_state(
        2
    )
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFFFFFFFFFFFFFF)


def text_seed(
    *keys: object, separator: str = "/", byteorder: Literal["little", "big"] = "little", bits: int = 63
) -> int:
    """A `bits`-bit seed from keys of any kind (names, numbers): the first 8 bytes of the sha256 of
    ``separator.join(str(key) for key in keys)`` (UTF-8), read in `byteorder` and cut to the top `bits` bits.

    Stable across Python versions and machines (unlike ``hash``), for keys that are text and so cannot go to
    :func:`derive_seed`.
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits}.")
    digest = hashlib.sha256(separator.join(str(key) for key in keys).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], byteorder) >> (64 - bits)


def image_seed(seed: int, identity: str, index: int) -> int:
    """The seed of generated image `index` of `identity` (``evaluate_pogdiff.py``): stable across runs, machines,
    batch sizes and models.

    Every model gets the same initial noise for the same (identity, index), so models are compared on paired
    samples, and a rerun that generates only missing images matches a full run. :func:`text_seed` with its
    defaults (``"seed/identity/index"``, little-endian, 63 bits).
    """
    return text_seed(seed, identity, index)


def pseudonym_hash(*keys: object) -> int:
    """The long-tail builder's stable 64-bit hash of (seed, name, ...), which picks a name's pseudonym and seeds
    its per-identity draws: :func:`text_seed` with keys joined by NUL, big-endian, all 64 bits."""
    return text_seed(*keys, separator="\0", byteorder="big", bits=64)


def validation_seed(base_seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of sample ``image_index`` of validation prompt ``prompt_index``: ``base_seed + 1000 *
    prompt_index + image_index``.

    It does not depend on the step, so every validation draws the same initial noise for the same cell and a
    change between two grids is the model's, not the noise's. Distinct for ``image_index < 1000``.
    """
    if prompt_index < 0 or not 0 <= image_index < SEED_STRIDE:
        raise ValueError(
            f"prompt_index must be >= 0 and image_index in [0, {SEED_STRIDE}), got {prompt_index}, {image_index}."
        )
    return int(base_seed) + SEED_STRIDE * int(prompt_index) + int(image_index)
