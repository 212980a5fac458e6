"""The GPT (pure, no Ray): shapes, causality, weight tying through checkpoints, init, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load

from lepton_ray import checkpoint, storage
from lepton_ray.gpt import GPT, Block
from lepton_ray.models import build_model, from_spec, spec_of

TINY = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return build_model("gpt", **{**TINY, **kw}).eval()


def test_shapes_and_interface():
    m = _tiny()
    idx = torch.randint(0, 256, (3, 16))
    out = m(idx)
    assert out.shape == (3, 16, 256) and out.dtype == torch.float32
    h = m.embed(idx)
    assert h.shape == (3, 16, 32)
    for block in m.blocks:
        assert isinstance(block, Block)
        h = block(h)
    torch.testing.assert_close(m.logits(h), out)
    assert m(idx[:, :5]).shape == (3, 5, 256)  # shorter than block_size is fine
    with pytest.raises(ValueError, match="longer than block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_causal_changing_token_t_leaves_earlier_logits():
    m = _tiny()
    idx = torch.randint(0, 256, (2, 16))
    base = m(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        out = m(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])  # position t itself sees the change


def test_attention_matches_explicit_masked_softmax():
    """The SDPA path equals attention written out with a lower-triangular mask."""
    m = _tiny()
    attn = m.blocks[0].attn
    x = torch.randn(2, 16, 32)
    B, T, C = x.shape
    q, k, v = attn.qkv(x).split(C, dim=2)
    q, k, v = (t.view(B, T, 2, C // 2).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // 2)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(attn(x), attn.proj(y), rtol=1e-5, atol=1e-6)


def test_head_is_tied_to_token_embedding():
    m = _tiny()
    assert m.head.weight is m.tok_emb.weight
    names = [n for n, _ in m.named_parameters()]
    assert "head.weight" not in names  # one Parameter, counted once
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    # A gradient step moves both names together.
    m.train()
    m(torch.randint(0, 256, (2, 16))).sum().backward()
    with torch.no_grad():
        m.head.weight -= 0.1 * m.head.weight.grad
    assert torch.equal(m.head.weight, m.tok_emb.weight)


def test_tie_survives_safetensors_checkpoint(tmp_path):
    m = _tiny(seed=1)
    idx = torch.randint(0, 256, (2, 16))
    d = checkpoint.write_local(tmp_path / "ckpt", m, {"model": spec_of(m)})
    saved = st_load((d / checkpoint.WEIGHTS).read_bytes())
    assert "tok_emb.weight" in saved and "head.weight" not in saved  # written once
    checkpoint.publish(d, storage.resolve(str(tmp_path / "pub")))
    loaded, meta = checkpoint.load_model(str(tmp_path / "pub"))
    assert meta["model"] == {"name": "gpt", "kwargs": TINY}
    assert loaded.head.weight is loaded.tok_emb.weight
    torch.testing.assert_close(loaded(idx), m(idx), rtol=0, atol=0)
    # A state dict that names both (torch's own form) loads strictly too, keeping the tie.
    other = _tiny(seed=2)
    other.load_state_dict(m.state_dict())
    assert other.head.weight is other.tok_emb.weight
    torch.testing.assert_close(other(idx), m(idx), rtol=0, atol=0)


def test_built_from_a_spec():
    spec = {"name": "gpt", "kwargs": {**TINY, "dropout": 0.1, "bias": True}}
    m = from_spec(spec)
    assert isinstance(m, GPT) and m.blocks[0].attn.qkv.bias is not None
    assert spec_of(m) == spec


def test_init_follows_nanogpt():
    torch.manual_seed(0)
    m = GPT(vocab_size=256, block_size=64, n_layer=8, n_head=4, n_embd=256)
    std = {n: p.std().item() for n, p in m.named_parameters()}
    assert std["tok_emb.weight"] == pytest.approx(0.02, rel=0.05)
    assert std["blocks.0.attn.qkv.weight"] == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert std["blocks.3.attn.proj.weight"] == pytest.approx(scaled, rel=0.05)
    assert std["blocks.3.mlp.proj.weight"] == pytest.approx(scaled, rel=0.05)
    assert torch.equal(m.ln_f.weight, torch.ones(256))
    # Untrained logits are near uniform: the loss on the next tokens starts near ln(vocab).
    idx = torch.randint(0, 256, (4, 65))
    loss = F.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    assert loss.item() == pytest.approx(math.log(256), abs=0.1)


def test_flops_per_token_is_nanogpt_estimate():
    m = GPT(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    n = m.num_params(non_embedding=True)
    assert n == m.num_params() - 1024 * 768 == 123_587_328  # nanoGPT's "123.59M"
    assert m.flops_per_token() == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert m.flops_per_token(seq_len=512) == 6 * n + 12 * 12 * 12 * 64 * 512


def test_bad_shape_refused():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPT(n_embd=30, n_head=4)
