"""scikit-learn's handwritten digits, binarized: a real binary data set that ships with scikit-learn (no download).

1797 images of 8 x 8 pixels with intensities 0..16; a pixel is 1 when its intensity is >= ``threshold``
(default 8, half the range), giving 64-D binary observations for a Bernoulli likelihood and MAPA's
Hamming kernel. ``draw`` d chooses which ``n_val`` and ``n_test`` images are held out (a permutation
seeded by d); the remaining 1797 - n_val - n_test (1197 by default) are the training set.
"""

from __future__ import annotations

import numpy as np

from mapa_exp.data.files import ObservedDataset, carve_splits
from mapa_exp.errors import check
from mapa_exp.math.likelihoods import Bernoulli


def binarized_digits(threshold: float = 8) -> np.ndarray:
    """All 1797 digits as a (1797, 64) float32 array of 0s and 1s (pixel >= threshold)."""
    from sklearn.datasets import load_digits

    return (load_digits().data >= threshold).astype(np.float32)


class Digits(ObservedDataset):
    def __init__(self, likelihood=None, name: str = "digits", latent_dim: int = 2, draw: int = 0,
                 n_val: int = 300, n_test: int = 300, threshold: float = 8):
        check(0 < threshold <= 16, "dataset.threshold", threshold, "must lie in (0, 16] (pixel intensities are 0..16)")
        x = binarized_digits(threshold)
        n = len(x)
        for key, v in (("n_val", n_val), ("n_test", n_test)):
            check(isinstance(v, int) and 1 <= v < n, f"dataset.{key}", v, f"must be an integer in [1, {n})")
        check(n_val + n_test < n, "dataset.n_test", n_test, f"leaves no training images (n_val={n_val}, 1797 in all)")
        arrays = carve_splits({"x_train": x}, {"val": n_val / n, "test": n_test / n}, draw, "dataset", name)
        super().__init__(name, likelihood or Bernoulli(), {s: arrays[f"x_{s}"] for s in ("train", "val", "test")},
                         latent_dim=latent_dim, draw=draw, key="dataset", value=name)
