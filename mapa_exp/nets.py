"""Networks: the one MLP every encoder, decoder, g_phi and ground-truth surrogate is built from, stack-native,
and ``NetSpec``, which says what shape each role's MLP has (the ``net`` config group).

``MLP(in_dim, out_dim, hidden, activation, members=E)`` is E independent networks of the same shape in one
module: all their parameters live in a single tensor ``params`` of shape (E, P), member e's layers are views
of row e, and a forward pass runs every member's layer as one batched matrix product (``torch.bmm``).
Because nothing reduces across members, each member's gradient and (element-wise) Adam update are those it
would get alone. A lone training run is a stack of one (``members=1``).

Shapes:

* ``members=E`` (a stack): ``forward(x)`` takes (E, ..., in_dim) and returns (E, ..., out_dim); with
  ``members=slice(lo, hi)`` it runs only those members on x of shape (hi - lo, ..., in_dim);
* ``members=None`` (one plain network, e.g. a ground-truth surrogate): (..., in_dim) -> (..., out_dim);
* ``member(e)`` is member e as a plain network (a view sharing the parameters): what evaluation uses.

Initialisation follows ``torch.nn.Linear`` (weights and biases uniform in ±1/sqrt(fan_in), drawn layer by
layer, weights as (out, in) then biases); member e draws from its own generator, so it is initialised as it
would be alone.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mapa_exp.errors import check

# activation -> (in-place function, whether autograd keeps the result it needs for the backward pass)
ACTIVATIONS = {
    "leaky_relu": lambda h: F.leaky_relu_(h),
    "relu": lambda h: F.relu_(h),
    "tanh": lambda h: h.tanh_(),
    "elu": lambda h: F.elu_(h),
    "silu": lambda h: F.silu(h),  # its backward needs the input: not in place
}


class MLP(nn.Module):
    """E independent MLPs in_dim -> hidden... -> out_dim (method.md §11: 2 x 50, LeakyReLU); see the module doc."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (50, 50), activation: str = "leaky_relu",
                 members: int | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"net.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        dims = [int(in_dim), *[int(h) for h in hidden], int(out_dim)]
        self.in_dim, self.out_dim, self.activation = dims[0], dims[-1], activation
        self.shapes = list(zip(dims[:-1], dims[1:]))  # (fan_in, fan_out) per layer
        self.stacked = members is not None
        self.members = int(members) if members is not None else 1
        n_params = sum(a * b + b for a, b in self.shapes)
        self.params = nn.Parameter(torch.empty(self.members, n_params))  # (E, P)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generators: Sequence[torch.Generator | None] | None = None) -> None:
        """nn.Linear's initialisation, member e from ``generators[e]`` (torch's global generator when None)."""
        gens = list(generators) if generators is not None else [None] * self.members
        if len(gens) != self.members:
            raise ValueError(f"{len(gens)} generators for {self.members} members")
        for e, g in enumerate(gens):
            chunks = []
            for a, b in self.shapes:
                bound = 1 / math.sqrt(a)
                chunks.append(torch.empty(b, a).uniform_(-bound, bound, generator=g).T.reshape(-1))  # stored (in, out)
                chunks.append(torch.empty(b).uniform_(-bound, bound, generator=g))
            self.params[e].copy_(torch.cat(chunks))

    def layers(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views (W (E, in, out), b (E, 1, out)) of each layer in a (E, P) parameter tensor."""
        E, out, off = params.shape[0], [], 0
        for a, b in self.shapes:
            W = params[:, off : off + a * b].view(E, a, b)
            off += a * b
            out.append((W, params[:, off : off + b].view(E, 1, b)))
            off += b
        return out

    def forward(self, x: torch.Tensor, members: slice | None = None) -> torch.Tensor:
        if not self.stacked:
            return self._run(x.reshape(1, -1, self.in_dim), self.params).reshape(*x.shape[:-1], self.out_dim)
        params = self.params if members is None else self.params[members]
        return self._run(x.reshape(params.shape[0], -1, self.in_dim), params).reshape(*x.shape[:-1], self.out_dim)

    def _run(self, h: torch.Tensor, params: torch.Tensor) -> torch.Tensor:  # (E, n, in) -> (E, n, out)
        layers = self.layers(params)
        act = ACTIVATIONS[self.activation]
        for i, (W, b) in enumerate(layers):
            h = torch.bmm(h, W).add_(b)  # bias added in place: bmm's backward does not need its output
            if i < len(layers) - 1:
                h = act(h)
        return h

    def member(self, e: int) -> "MemberView":
        """Member e as a plain network (..., in_dim) -> (..., out_dim), sharing this stack's parameters."""
        return MemberView(self, e)

    def extra_repr(self) -> str:
        hidden = [b for _, b in self.shapes[:-1]]
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, hidden={hidden}, activation={self.activation}, "
                f"members={self.members if self.stacked else None}")


class MemberView(nn.Module):
    """One member of a stacked ``MLP`` as a plain network (no parameters of its own)."""

    def __init__(self, stack: MLP, e: int):
        super().__init__()
        if not 0 <= e < stack.members:
            raise IndexError(f"member {e} of a stack of {stack.members}")
        self._stack = [stack]  # not a submodule: the view owns nothing
        self.e = e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stack = self._stack[0]
        return stack._run(x.reshape(1, -1, stack.in_dim), stack.params[self.e : self.e + 1]).reshape(
            *x.shape[:-1], stack.out_dim)


ROLES = ("encoder", "decoder")  # "encoder": the VAE/IWAE encoder, or MAPA's g_phi


class NetSpec:
    """The MLP of each role: ``hidden`` and ``activation`` for every network, overridden per role.

    ``NetSpec(hidden=[50, 50], decoder={"hidden": [512, 512, 512]})`` gives the default encoder (or g_phi)
    and a 3 x 512 decoder. ``spec(in_dim, out_dim, members=E, role="decoder")`` builds the network."""

    def __init__(self, hidden: Sequence[int] = (50, 50), activation: str = "leaky_relu",
                 encoder: dict | None = None, decoder: dict | None = None):
        self.default = {"hidden": [int(h) for h in hidden], "activation": activation}
        self.roles = {}
        for role, given in (("encoder", encoder), ("decoder", decoder)):
            given = {k: v for k, v in dict(given or {}).items() if v is not None}
            unknown = sorted(set(given) - set(self.default))
            check(not unknown, f"net.{role}.{unknown[0] if unknown else ''}", None, "no such key (hidden, activation)")
            shape = self.roles[role] = {**self.default, **given}
            key = f"net.{role}" if given else "net"
            hidden = [int(h) for h in shape["hidden"]]
            check(all(h >= 1 for h in hidden), f"{key}.hidden", hidden, "every width must be >= 1")
            check(shape["activation"] in ACTIVATIONS, f"{key}.activation", shape["activation"],
                  f"must be one of {sorted(ACTIVATIONS)}")

    def shape(self, role: str | None) -> dict:
        """``{"hidden": [...], "activation": ...}`` of a role (the default for None)."""
        if role is not None and role not in self.roles:
            raise ValueError(f"role={role!r}: must be one of {ROLES}")
        return self.roles[role] if role is not None else self.default

    def __call__(self, in_dim: int, out_dim: int, members: int | None = None, role: str | None = None) -> MLP:
        shape = self.shape(role)
        return MLP(in_dim, out_dim, hidden=shape["hidden"], activation=shape["activation"], members=members)

    def __repr__(self) -> str:
        return f"NetSpec(encoder={self.roles['encoder']}, decoder={self.roles['decoder']})"
