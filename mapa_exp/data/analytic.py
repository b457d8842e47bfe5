"""The analytic shapes f(z) of the five synthetic ground truths (method.md §10), as torch functions.

Each maps latents z of shape (n, 1) to observation means of shape (n, 2). They are the targets the
surrogate networks are fitted to; the data themselves come from the surrogates.
"""

from __future__ import annotations

import math

import torch


def std_normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def staircase(z: torch.Tensor, steps: int, sharpness: float) -> torch.Tensor:
    """s(z) = sum_{k=1}^{C-1} (1 + tanh(a (z - c_k))) / 2 with c_k = Phi^{-1}(k / C): C equal-mass steps."""
    normal = torch.distributions.Normal(0.0, 1.0)
    c = normal.icdf(torch.arange(1, steps, dtype=z.dtype) / steps).to(z.device)  # (C-1,)
    return (0.5 * (1 + torch.tanh(sharpness * (z - c)))).sum(-1, keepdim=True)  # (n, 1)


def figure8(z: torch.Tensor) -> torch.Tensor:
    """Lemniscate with its crossing at z = 0 approached again by both tails of z."""
    u = (0.6 + 1.8 * std_normal_cdf(z)) * math.pi
    den = torch.sin(u) ** 2 + 1
    return torch.cat([(math.sqrt(2) / 2) * torch.cos(u) / den, math.sqrt(2) * torch.cos(u) * torch.sin(u) / den], -1)


def circle(z: torch.Tensor) -> torch.Tensor:
    u = 2 * math.pi * std_normal_cdf(z)
    return torch.cat([torch.cos(u), torch.sin(u)], -1)


def absolute_value(z: torch.Tensor) -> torch.Tensor:
    u = 2 * std_normal_cdf(z) - 1
    return torch.cat([u, u.abs()], -1)


def clusters(z: torch.Tensor, steps: int = 5, sharpness: float = 30.0) -> torch.Tensor:
    """C equal-mass clusters on the unit circle joined by thin bridges."""
    angle = 2 * math.pi * staircase(z, steps, sharpness) / steps
    return torch.cat([torch.cos(angle), torch.sin(angle)], -1)


def spiral_dots(
    z: torch.Tensor, steps: int = 8, sharpness: float = 30.0, t0: float = 2 * math.pi, delta: float = math.pi / 2
) -> torch.Tensor:
    """C dots on an Archimedean spiral, t = t0 + delta * s(z), scaled into the unit disc."""
    t = t0 + delta * staircase(z, steps, sharpness)
    t_max = t0 + (steps - 1) * delta
    return torch.cat([t * torch.cos(t), t * torch.sin(t)], -1) / t_max
