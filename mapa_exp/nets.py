"""Networks: the one MLP every encoder, decoder, g_phi and ground-truth surrogate is built from."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}


class MLP(nn.Sequential):
    """in_dim -> hidden... -> out_dim with the chosen activation between layers (spec §11: 2 x 50, LeakyReLU)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (50, 50), activation: str = "leaky_relu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"net.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        dims = [int(in_dim), *[int(h) for h in hidden], int(out_dim)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.in_dim, self.out_dim = dims[0], dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_dim) -> (..., out_dim)
        return super().forward(x)
