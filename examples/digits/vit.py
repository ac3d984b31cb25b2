"""A small vision transformer over 2x2 patches of the 8x8 digits, and its NTK linearisation.

Tensor names follow the usual layout (``blocks.N.attn.{q,k,v,o}_proj``, ``blocks.N.mlp.fc1/2``),
so the arms of the experiment are name filters, the same globs streamvec's ``--include`` takes.
The MLP's hidden size is twice the width, so its two matrices hold exactly as many weights as
the four attention projections (``4 d^2``): the MLP-only arm is a size-matched control.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch.func import functional_call, jvp

from .data import ALL_DIGITS
from .train import class_mask

# The parameters each arm fine-tunes (the head is always frozen, as in the paper).
ARMS: dict[str, tuple[str, ...]] = {
    "full": ("*",),
    "attention": ("*.attn.*_proj.*",),
    "mlp": ("*.mlp.fc*",),
    "linearised": ("*",),
}


class Attention(torch.nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = torch.nn.Linear(width, width)
        self.k_proj = torch.nn.Linear(width, width)
        self.v_proj = torch.nn.Linear(width, width)
        self.o_proj = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)  # (b, h, t, d/h)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return self.o_proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class MLP(torch.nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(width, hidden)
        self.fc2 = torch.nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = torch.nn.LayerNorm(width)
        self.mlp = MLP(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(torch.nn.Module):
    """16 patches of 2x2 pixels and a class token; pre-norm blocks; a 10-way head."""

    n_outputs = 10

    def __init__(self, width: int = 32, depth: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.patch = torch.nn.Linear(4, width)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, width))
        self.pos = torch.nn.Parameter(0.02 * torch.randn(1, 17, width))
        self.blocks = torch.nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        patches = x.view(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
        h = torch.cat([self.cls.expand(b, -1, -1), self.patch(patches)], dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


def arm_names(net: torch.nn.Module, arm: str) -> list[str]:
    """The parameters an arm trains: those matching its globs, never the head."""
    globs = ARMS[arm]
    return [
        n
        for n, _ in net.named_parameters()
        if not n.startswith("head.") and any(fnmatch.fnmatchcase(n, g) for g in globs)
    ]


class Linearised:
    """``f_lin(x; theta) = f(x; theta0) + J_theta f(x; theta0) (theta - theta0)``.

    Ortiz-Jimenez et al. (2023) fine-tune this first-order model instead of the network; its
    task vectors are ``theta - theta0`` as usual. Evaluated with one ``torch.func.jvp``.
    """

    def __init__(self, net: torch.nn.Module, theta0: dict[str, torch.Tensor]) -> None:
        self.net = net
        self.theta0 = {n: t.detach().clone() for n, t in theta0.items()}

    def __call__(self, x: torch.Tensor, delta: dict[str, torch.Tensor]) -> torch.Tensor:
        names = list(delta)
        rest = {n: t for n, t in self.theta0.items() if n not in delta}

        def f(*params: torch.Tensor) -> torch.Tensor:
            return functional_call(self.net, {**rest, **dict(zip(names, params, strict=True))}, x)

        primals = tuple(self.theta0[n] for n in names)
        result = jvp(f, primals, tuple(delta[n] for n in names))
        return result[0] + result[1]

    def at(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """``f_lin`` at the weights ``module`` holds."""
        with torch.no_grad():
            state = dict(module.named_parameters())
            return self(x, {n: state[n].detach() - t for n, t in self.theta0.items()})


def train_vit(
    net: DigitsViT,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    names: Sequence[str] | None,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int,
    linearised: bool = False,
    classes: Sequence[int] = ALL_DIGITS,
) -> None:
    """Adam on the named parameters (all when None); ``linearised`` trains ``f_lin`` instead.

    For the linearised model the trained quantity is ``delta = theta - theta0``; the module
    ends holding ``theta0 + delta``.
    """
    params = dict(net.named_parameters())
    names = list(params) if names is None else list(names)
    mask = class_mask(classes, net.n_outputs)
    gen = torch.Generator().manual_seed(seed)
    lin: Linearised | None = None
    if linearised:
        lin = Linearised(net, {n: p for n, p in params.items()})
        delta = {n: torch.zeros_like(params[n], requires_grad=True) for n in names}
        opt = torch.optim.Adam(list(delta.values()), lr=lr)
    else:
        for n, p in params.items():
            p.requires_grad_(n in names)
        opt = torch.optim.Adam([params[n] for n in names], lr=lr)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            opt.zero_grad()
            logits = net(x[batch]) if lin is None else lin(x[batch], delta)
            torch.nn.functional.cross_entropy(logits + mask, y[batch]).backward()
            opt.step()
    for p in params.values():
        p.requires_grad_(True)
    if lin is not None:
        with torch.no_grad():
            for n in names:
                params[n].add_(delta[n])
    net.eval()
