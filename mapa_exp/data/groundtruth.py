"""Ground-truth generative models and their data draws (method.md §10).

A ``GroundTruth`` is an analytic shape f(z) (any callable), replaced by a *surrogate* network of the
methods' own architecture fitted to (z, f(z)) pairs, so the truth lies in the model class. Its
data are generated from the surrogate: z ~ N(0, I), x ~ p(x | f_GT(z)). The surrogate is fitted
deterministically from its seed and cached under a key derived from what it was fitted to; the
draw number selects an independent data set (train / validation / test) from the same truth.

Adding a ground truth needs no package edit: a config with ``f: {_target_: my.module.fn,
_partial_: true}``, a ``likelihood`` and the two dimensions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mapa_exp.errors import ConfigError, check
from mapa_exp.io import ArrayCache, content_key, progress
from mapa_exp.nets import MLP

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split of a draw: ground-truth codes z (n, Dz) and observations x (n, Dx), float32."""

    z: torch.Tensor
    x: torch.Tensor


class GroundTruth:
    def __init__(
        self,
        name: str,
        f: Callable[[torch.Tensor], torch.Tensor],
        likelihood,
        latent_dim: int = 1,
        obs_dim: int = 2,
        n_train: int = 1000,
        n_val: int = 1000,
        n_test: int = 1000,
        draw: int = 0,
        surrogate: dict | None = None,
        net: Callable[..., torch.nn.Module] | None = None,
        cache_dir: str | None = None,
    ):
        check(isinstance(latent_dim, int) and latent_dim >= 1, "dataset.latent_dim", latent_dim, "must be an integer >= 1")
        check(isinstance(obs_dim, int) and obs_dim >= 1, "dataset.obs_dim", obs_dim, "must be an integer >= 1")
        for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            check(isinstance(n, int) and n >= 1, f"dataset.{key}", n, "must be an integer >= 1")
        check(isinstance(draw, int) and draw >= 0, "dataset.draw", draw, "must be an integer >= 0")
        self.name, self.f, self.likelihood = name, f, likelihood
        self.latent_dim, self.obs_dim, self.draw = latent_dim, obs_dim, draw
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.surrogate_cfg = {"fit": True, "seed": 0, "steps": 4000, "n_fit": 4096, "lr": 1e-2, **(surrogate or {})}
        self.net = net or MLP
        self.cache = ArrayCache(cache_dir) if cache_dir else None
        self._decoder: torch.nn.Module | None = None
        self._splits: dict[str, Split] | None = None
        self.surrogate_mse: float | None = None

    # -- the ground-truth decoder f_GT ------------------------------------------------------
    @property
    def decoder(self) -> torch.nn.Module:
        """f_GT: the fitted surrogate (or f itself when ``surrogate.fit`` is false), frozen."""
        if self._decoder is None:
            with torch.enable_grad():  # may be first touched under no_grad
                self._decoder = self._build_decoder()
            for p in self._decoder.parameters():
                p.requires_grad_(False)
        return self._decoder

    def _fit_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(int(self.surrogate_cfg["seed"]))
        z = torch.randn(int(self.surrogate_cfg["n_fit"]), self.latent_dim, generator=g)
        with torch.no_grad():
            try:
                y = self.f(z).float()
            except (RuntimeError, IndexError, ValueError) as exc:  # e.g. a 1-D shape given 2-D codes
                raise ConfigError("dataset.latent_dim", self.latent_dim, f"f cannot take codes of shape "
                                  f"{tuple(z.shape)} ({str(exc).strip().splitlines()[0]})") from exc
        if y.shape != (z.shape[0], self.obs_dim):
            raise ConfigError(
                "dataset.obs_dim", self.obs_dim, f"f({tuple(z.shape)}) returned shape {tuple(y.shape)}; "
                f"expected ({z.shape[0]}, {self.obs_dim}) (check dataset.latent_dim / dataset.obs_dim)"
            )
        if not torch.isfinite(y).all():
            raise ConfigError("dataset.f", getattr(self.f, "__name__", self.f), "returned non-finite values")
        return z, y

    def _build_decoder(self) -> torch.nn.Module:
        z, y = self._fit_inputs()
        if not self.surrogate_cfg["fit"]:
            return _CallableModule(self.f)
        net = self.net(self.latent_dim, self.obs_dim)
        names = [n for n, _ in net.named_parameters()]
        arch = [(n, list(p.shape)) for n, p in net.named_parameters()] + [repr(net)]
        key = content_key(z.numpy(), y.numpy(), arch, self.surrogate_cfg)

        def fit() -> dict[str, np.ndarray]:
            mse = fit_surrogate(net, z, y, self.surrogate_cfg)
            out = {n: p.detach().numpy() for n, p in net.named_parameters()}
            out["__mse__"] = np.array(mse)
            return out

        if self.cache is not None:
            arrays, _ = self.cache.load_or_build("surrogates", f"{self.name}-{key}", fit)
        else:
            arrays = fit()
        net.load_state_dict({n: torch.from_numpy(arrays[n]) for n in names}, strict=False)
        self.surrogate_mse = float(arrays["__mse__"])
        log.info("ground truth %s: surrogate mean squared error %.3g", self.name, self.surrogate_mse)
        return net

    # -- data draws --------------------------------------------------------------------------
    def splits(self) -> dict[str, Split]:
        """The draw's train / val / test splits; draw d always gives the same data."""
        if self._splits is None:
            g = torch.Generator().manual_seed(1_000_003 * (self.draw + 1))
            out = {}
            for split in SPLITS:
                z = torch.randn(self.sizes[split], self.latent_dim, generator=g)
                with torch.no_grad():
                    x = self.likelihood.sample(self.decoder(z), generator=g)
                out[split] = Split(z=z, x=x.float())
            self._splits = out
        return self._splits


class _CallableModule(torch.nn.Module):
    """Wraps an analytic f as a module, for ground truths used without a surrogate."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.f = f

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.f(z)


def fit_surrogate(net: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, cfg: dict) -> float:
    """Fit ``net`` to (z, y) by full-batch Adam with cosine decay; returns the final mean squared error.

    Deterministic: the initial weights come from ``cfg['seed']`` and the batch is fixed.
    """
    t0 = time.perf_counter()
    net.reset_parameters([torch.Generator().manual_seed(int(cfg["seed"]))])
    steps = int(cfg["steps"])
    opt = torch.optim.Adam(net.parameters(), lr=float(cfg["lr"]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in progress(range(steps), f"fitting the ground truth's surrogate ({steps} steps)"):
        opt.zero_grad(set_to_none=True)
        loss = (net(z) - y).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        mse = (net(z) - y).pow(2).sum(-1).mean().item()
    log.info("fitted surrogate in %.1fs (%d steps): mse %.3g", time.perf_counter() - t0, steps, mse)
    return mse
