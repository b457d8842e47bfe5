"""Per-member random streams: every random draw of a training run comes from a generator of its own seed.

A run (a *member* of a stack; a lone run is a stack of one) draws from independent streams derived from
its ``seed``, never from torch's global generator:

* ``init``  -- network initialisation, one stream per network (``generator(seed, "init", name)``);
* ``data``  -- the training epochs: shuffling, MAPA's tail samples and the VAE's reparameterisation noise,
  in the order the steps need them (its state travels with the checkpoint);
* ``eval``  -- a validation pass during training, one stream per epoch, so that validating (or how
  often) never changes the training trajectory;
* ``final`` -- the final bounds of ``results.json``, so that they depend only on the weights.

Members of a stack therefore draw exactly what each would draw trained alone, whatever the other members
do; the streams are derived with NumPy's ``SeedSequence`` (independent for different seeds and names).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

STREAMS = ("init", "data", "eval", "final")


def stream_seed(seed: int, stream: str, *extra: int | str) -> int:
    """A 63-bit seed for ``stream`` of run ``seed`` (``extra``: e.g. a network name or an epoch)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; one of {STREAMS}")
    words = [int(seed), STREAMS.index(stream)] + [zlib.crc32(e.encode()) if isinstance(e, str) else int(e)
                                                   for e in extra]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, stream: str, *extra: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded for ``stream`` of run ``seed`` (see the module doc)."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, stream, *extra))
    return g


def generators(seeds, stream: str, *extra: int | str, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per member seed."""
    return [generator(s, stream, *extra, device=device) for s in seeds]
