"""A BERT-style encoder over byte tokens that classifies a text, registered as ``"bert"``.

Shapes as in :mod:`lepton_ray.gpt`: ``B`` batch, ``T`` tokens (≤ ``block_size``), ``C`` width
(``n_embd``), ``nh`` heads, ``hs = C / nh``. The model prepends a ``[CLS]`` token (id
``vocab_size``, one past the bytes, so the data's rows hold text only) and reads ``T + 1``
positions with learned token and position embeddings, through pre-LayerNorm encoder blocks whose
attention is bidirectional: every position attends to every other one that is not padding. The
final hidden state of ``[CLS]`` (position 0) goes through a LayerNorm and a linear head to
``num_classes`` logits.

Padding: byte 0 (``PAD``). A row is its text's UTF-8 bytes then zeros
(:func:`lepton_ray.data.labelled_text.tokenize`), and no text holds byte 0 (the data and the
endpoint refuse U+0000), so the mask is the tokens themselves: keys that are padding are left out
of every softmax (``F.scaled_dot_product_attention``'s boolean ``attn_mask``, True = attend).
``[CLS]`` is never padding, so every row of the softmax has a key. Padding positions still get
hidden states, which nothing reads: appending padding leaves the logits unchanged.

Pre-LN (GPT-2's order) rather than BERT's post-LN: it trains stably without BERT's warm-up
schedule, which a run of seconds does not have. The pieces are named for the strategies:
``blocks`` is an ``nn.ModuleList`` (FSDP shards per block, :func:`lepton_ray.train.strategy.
shard_units`); the model holds no buffers, so it builds on the meta device from its spec.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lepton_ray.gpt import GPT, MLP, CausalSelfAttention

PAD = 0  # byte 0 pads a row; UTF-8 text never holds it


class SelfAttention(CausalSelfAttention):
    """Bidirectional multi-head attention with a key mask: (B, T, C), (B, 1, 1, T) -> (B, T, C).
    The GPT's attention (the same projections and initialisation), without the causal mask."""

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs); keep (B, 1, 1, T) broadcasts over heads and queries
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class EncoderBlock(nn.Module):
    """Pre-LN encoder block: ``x + attn(ln(x), keep)``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), keep)
        return x + self.mlp(self.ln_2(x))


class BERT(nn.Module):
    """Encoder classifier: ``forward(idx (B, T) int64 byte tokens, 0 = padding) -> logits (B,
    num_classes)``, ``T ≤ block_size``.

    Defaults: a small byte-level model (4 layers of width 128, ~0.8M parameters). BERT-base's
    shape is ``n_layer=12, n_head=12, n_embd=768`` (with its WordPiece vocabulary instead of bytes).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 128,
        num_classes: int = 2,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        if num_classes < 1 or block_size < 1 or vocab_size < 1:
            raise ValueError(
                f"vocab_size, block_size and num_classes must be >= 1, got "
                f"{vocab_size}, {block_size}, {num_classes}"
            )
        self.vocab_size, self.block_size, self.num_classes = vocab_size, block_size, num_classes
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.cls_token = vocab_size  # [CLS]: one id past the data's tokens
        self.tok_emb = nn.Embedding(vocab_size + 1, n_embd)
        self.pos_emb = nn.Embedding(block_size + 1, n_embd)  # position 0 is [CLS]
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(n_embd, n_head, dropout, bias) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, num_classes)
        self.apply(GPT._init_weights)  # the GPT's: normal(0.02), zero biases
        # GPT-2's scaled init: each residual projection adds to the stream 2 * n_layer times.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * max(n_layer, 1)))

    def embed(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``idx`` (B, T) -> ([CLS] + tokens embedded with their positions, after dropout (B, T + 1,
        C); the key mask (B, 1, 1, T + 1), True where a position is not padding)."""
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.block_size}")
        cls = torch.full((B, 1), self.cls_token, dtype=idx.dtype, device=idx.device)
        tokens = torch.cat([cls, idx], dim=1)  # (B, T + 1)
        pos = torch.arange(T + 1, dtype=torch.long, device=idx.device)  # (T + 1,)
        keep = (tokens != PAD).view(B, 1, 1, T + 1)
        return self.drop(self.tok_emb(tokens) + self.pos_emb(pos)), keep

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        """Every position's final hidden state, [CLS] first: (B, T) -> (B, T + 1, C)."""
        h, keep = self.embed(idx)
        for block in self.blocks:
            h = block(h, keep)
        return self.ln_f(h)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(idx)[:, 0])  # [CLS] pooling: (B, C) -> (B, num_classes)
