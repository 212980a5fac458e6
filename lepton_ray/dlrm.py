"""A DLRM-style click model (Naumov et al., 2019), registered as ``"dlrm"``.

Shapes: ``N`` rows, ``D`` dense features, ``T`` tables, ``d`` the embedding width, ``F`` the
features that meet (``T`` embeddings, plus the bottom MLP's output when ``D > 0``).

    dense (N, D) -> bottom MLP -> (N, d)  --+
    ids (N, T) -> T embedding tables -> T x (N, d) --+--> stack (N, F, d)
    pairwise dots of the F vectors (strict lower triangle of (N, F, F)) -> (N, F(F-1)/2)
    [bottom output, dots] -> top MLP -> (N,) click logits

The input is a :class:`Features` (``dense`` float32, ``sparse`` int64 ids): one object the
training step can cut into micro-batches (``x[a:b]``) like a tensor. The tables are an
``nn.ModuleList`` named ``tables``, so FSDP shards each table by rows as a unit of its own
(:func:`lepton_ray.train.strategy.shard_units`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Features:
    """One batch of click rows: ``dense`` (N, D) float, ``sparse`` (N, T) int64 ids."""

    dense: torch.Tensor
    sparse: torch.Tensor

    def __len__(self) -> int:
        return len(self.sparse)

    def __getitem__(self, rows: slice) -> Features:
        return Features(self.dense[rows], self.sparse[rows])

    def to(self, device: torch.device | str) -> Features:
        return Features(self.dense.to(device), self.sparse.to(device))


def _mlp(sizes: Sequence[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Embedding tables (``cardinalities``, width ``embed_dim``), a bottom MLP over ``dense``
    features (hidden sizes ``bottom``, output ``embed_dim``), dot interaction, a top MLP (hidden
    sizes ``top``) to one logit. About ``sum(cardinalities) * embed_dim`` parameters in the tables;
    the default MLPs add ~6k."""

    def __init__(
        self,
        cardinalities: Sequence[int] = (100, 100, 100, 100),
        dense: int = 4,
        embed_dim: int = 16,
        bottom: Sequence[int] = (64,),
        top: Sequence[int] = (64, 32),
    ):
        super().__init__()
        if not cardinalities or min(cardinalities) < 1:
            raise ValueError(f"cardinalities must be >= 1 each, got {list(cardinalities)}")
        self.cardinalities, self.dense, self.embed_dim = list(cardinalities), dense, embed_dim
        self.tables = nn.ModuleList(nn.Embedding(c, embed_dim) for c in cardinalities)
        self.bottom = _mlp([dense, *bottom, embed_dim], last_relu=True) if dense else None
        f = len(cardinalities) + (1 if dense else 0)
        rows, cols = torch.tril_indices(f, f, offset=-1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        width = (embed_dim if dense else 0) + f * (f - 1) // 2
        self.top = _mlp([width, *top, 1], last_relu=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for t in self.tables:  # DLRM's init: uniform in +-1/sqrt(rows)
            bound = t.num_embeddings**-0.5
            t.weight.uniform_(-bound, bound)

    def forward(self, x: Features) -> torch.Tensor:
        vectors = [table(x.sparse[:, k]) for k, table in enumerate(self.tables)]  # T x (N, d)
        if self.bottom is not None:
            z = self.bottom(x.dense)  # (N, d)
            vectors.insert(0, z)
        stack = torch.stack(vectors, dim=1)  # (N, F, d)
        dots = torch.bmm(stack, stack.transpose(1, 2))  # (N, F, F)
        pairs = dots[:, self.pair_rows, self.pair_cols]  # (N, F(F-1)/2)
        h = torch.cat([z, pairs], dim=1) if self.bottom is not None else pairs
        return self.top(h).squeeze(-1)  # (N,)
