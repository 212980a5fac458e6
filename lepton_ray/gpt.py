"""A nanoGPT-style decoder-only Transformer over byte tokens, registered as ``"gpt"``.

Shapes follow nanoGPT's ``model.py``: ``B`` batch, ``T`` time (≤ ``block_size``), ``C`` width
(``n_embd``), ``nh`` heads, ``hs = C / nh``. Pre-LayerNorm blocks, causal attention through
``F.scaled_dot_product_attention(is_causal=True)`` (flash / memory-efficient kernels where the
device has them), a 4x GELU MLP, and the output head's weight tied to the token embedding.

The pieces are named so that other strategies can cut the model apart without knowing it:
``embed(idx) -> h`` (token + position embeddings, dropout), ``blocks`` (an ``nn.ModuleList``;
FSDP shards per block, pipeline parallelism gives each stage a slice), ``logits(h)`` (final
LayerNorm and head). ``forward(idx) = logits(blocks(embed(idx)))``.

Weight tying and checkpoints: ``head.weight`` *is* ``tok_emb.weight`` (one Parameter), so
``state_dict()`` holds the same tensor under both names. safetensors refuses shared tensors;
:func:`lepton_ray.checkpoint.write_local` writes the first name only, and this module's load hook
fills a missing ``head.weight`` from ``tok_emb.weight``, so ``load_state_dict`` of either form
keeps the tie (it copies into the one shared Parameter).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TIED = {"head.weight": "tok_emb.weight"}  # alias -> the name checkpoints keep


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)  # a residual projection
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)  # a residual projection
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN Transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``; (B, T, C) in and out."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only Transformer: ``forward(idx (B, T) int64) -> logits (B, T, vocab_size)``.

    Defaults are a small byte-level model (vocab 256, context 256, 4 layers of width 128: ~0.8M
    parameters); GPT-2 small is ``GPT(vocab_size=50304, block_size=1024, n_layer=12, n_head=12,
    n_embd=768)``.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one Parameter under two names
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual projection adds to the stream 2 * n_layer times.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        self.register_load_state_dict_pre_hook(_fill_tied)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings of ``idx`` (B, T) int64, after dropout: (B, T, C)."""
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and the tied head: (B, T, C) -> (B, T, vocab_size)."""
        return self.head(self.ln_f(h))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        for block in self.blocks:
            h = block(h)
        return self.logits(h)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied head counted once; ``non_embedding`` also leaves out the position
        embedding (nanoGPT's count, the ``N`` of :meth:`flops_per_token`'s reference)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) at sequence length ``seq_len``
        (``block_size`` if not given), as nanoGPT's ``estimate_mfu`` (PaLM, appendix B)::

            6 * N + 12 * L * H * Q * T

        ``N`` = ``num_params(non_embedding=True)`` (as nanoGPT counts it), ``L`` layers, ``H``
        heads, ``Q`` = head size, ``T`` = sequence length: 6N for the weight matmuls (2 forward,
        4 backward), 12·L·H·Q·T for attention's scores and weighted sum. E.g. GPT-2 small
        (N = 123.59M, L = H = 12, Q = 64, T = 1024): 741.5M + 113.2M ≈ 0.855 GFLOP per token.
        """
        T = self.block_size if seq_len is None else seq_len
        Q = self.n_embd // self.n_head
        return 6 * self.num_params(non_embedding=True) + 12 * self.n_layer * self.n_head * Q * T


def _fill_tied(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """Load hook: a state dict that keeps a tied weight once (as checkpoints do) loads strictly."""
    for alias, kept in TIED.items():
        if prefix + alias not in state_dict and prefix + kept in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + kept]
