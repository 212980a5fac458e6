"""Next-token training: the task's arithmetic (pure), then one small GPT run on Ray that must beat
the unigram entropy of held-out text and leave a checkpoint that computes the same loss."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lepton_ray import Trainer, build_model, load_model
from lepton_ray.config import ScalingConfig, build_train_config
from lepton_ray.data import prepare, read_arrays
from lepton_ray.train.step import TrainStep, evaluate
from lepton_ray.train.task import Classification, NextToken, for_data

CPU = torch.device("cpu")
TINY = dict(n_layer=2, n_head=2, n_embd=32)


def _blocks(n: int, t: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A feed's batch of n token blocks: uint8 (N, 1, 1, T + 1), as the device cache hands them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (n, 1, 1, t + 1), generator=g, dtype=torch.uint8)
    return {"image": tokens, "label": torch.zeros(n, dtype=torch.int64), "id": torch.arange(n)}


# --- the task (pure) -----------------------------------------------------------------------------
def test_next_token_inputs_loss_and_counts():
    task = NextToken(CPU, block_size=8)
    batch = _blocks(3, 8)
    x, y = task.inputs(batch)
    flat = batch["image"].view(3, 9).long()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, 8)
    assert torch.equal(x, flat[:, :-1]) and torch.equal(y, flat[:, 1:])
    logits = torch.randn(3, 8, 256)
    expected = F.cross_entropy(logits.reshape(24, 256), y.reshape(24))
    torch.testing.assert_close(task.loss(logits, y), expected)
    # Per row: the loss sum is rows x mean token loss; "correct" the share of positions right.
    torch.testing.assert_close(task.loss_sum(logits, y), expected * 3)
    right = logits.argmax(-1) == y
    assert float(task.correct(logits, y)) == pytest.approx(right.sum().item() / 8)
    logits[0, :, :] = -10.0
    logits[0, torch.arange(8), y[0]] = 10.0  # row 0 all right
    assert float(task.correct(logits, y)) == pytest.approx(1 + right[1:].sum().item() / 8)


def test_next_token_metrics():
    m = NextToken(CPU, 64).metrics({"train_loss": 2.0, "samples_per_second": 10.0, "val_loss": 1.5})
    assert m == {
        "perplexity": pytest.approx(math.exp(2.0)),
        "tokens_per_second": 640.0,
        "val_perplexity": pytest.approx(math.exp(1.5)),
    }
    assert Classification().metrics({"train_loss": 1.0}) == {}


def test_the_data_kind_chooses_the_task():
    assert isinstance(for_data({"kind": "text", "block_size": 16}, CPU), NextToken)
    assert isinstance(for_data({"mean": [0.5], "std": [0.2]}, CPU), Classification)


def test_micro_batches_equal_one_step_on_the_whole_batch():
    """The global-batch arithmetic holds for tokens: 4 micro-batches of 2 blocks step the
    weights as one batch of 8 does."""
    torch.manual_seed(0)
    model = build_model("gpt", vocab_size=256, block_size=8, **TINY)
    task = NextToken(CPU, 8)
    x, y = task.inputs(_blocks(8, 8))
    after = []
    for micro in (None, 2):
        m = copy.deepcopy(model)
        cfg = build_train_config(
            scaling=ScalingConfig(num_workers=1), batch_size=8, max_micro_batch=micro,
            optimizer="sgd", momentum=0.0, lr=0.5, weight_decay=0.0, schedule="constant",
        )  # fmt: skip
        step = TrainStep(m, cfg, world=1, rank=0, total_steps=1, task=task)
        sums = torch.zeros(3, dtype=torch.float64)
        step(x, y, sums)
        after.append((m.state_dict(), sums))
    for k, v in after[0][0].items():
        torch.testing.assert_close(after[1][0][k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[1][1], after[0][1])
    assert after[0][1][2] == 8  # rows


def test_evaluate_on_token_blocks_is_the_mean_token_loss():
    torch.manual_seed(0)
    model = build_model("gpt", vocab_size=256, block_size=8, **TINY)
    batches = [_blocks(3, 8, seed=1), _blocks(5, 8, seed=2)]
    loss, acc = evaluate(model, batches, NextToken(CPU, 8))
    tokens = torch.cat([b["image"].view(len(b["image"]), -1).long() for b in batches])
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    y = tokens[:, 1:]
    assert loss == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(), rel=1e-5
    )
    assert acc == pytest.approx((logits.argmax(-1) == y).float().mean().item(), rel=1e-6)


# --- one real run ------------------------------------------------------------------------------
def _unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the byte frequencies of ``tokens``: what a model that ignores context
    at best achieves on them."""
    counts = np.bincount(tokens.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.ray
def test_a_tiny_gpt_beats_the_unigram_entropy_of_held_out_text(ray_session, tmp_path):
    """Python's own reference text at 64 tokens a block, ~200 steps on one CPU worker."""
    infos = prepare("pydoc-topics", str(tmp_path / "data"), block_size=64)
    held, _, _ = read_arrays(infos["test"])
    targets = held.reshape(len(held), -1)[:, 1:]
    entropy = _unigram_entropy(targets)
    assert 3.0 < entropy < 3.6  # English-like bytes

    torch.manual_seed(0)
    model = build_model("gpt", vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)
    trainer = Trainer(1, storage=str(tmp_path / "runs"))
    res = trainer.fit(
        model, infos["train"], infos["test"], batch_size=32, epochs=1, optimizer="adamw",
        lr=3e-3, weight_decay=0.0, schedule="cosine", warmup_fraction=0.05, progress_bar=False,
    )  # fmt: skip
    h = res["history"][-1]
    assert h["step"] == infos["train"].num_rows // 32 >= 200
    assert res["val_loss"] < entropy - 0.2, (res["val_loss"], entropy)
    assert h["perplexity"] == pytest.approx(math.exp(h["train_loss"]))
    assert h["val_perplexity"] == pytest.approx(math.exp(h["val_loss"]))
    assert h["tokens_per_second"] == pytest.approx(h["samples_per_second"] * 64)
    assert 0.2 < h["val_accuracy"] < 1
    for key in ("perplexity", "val_perplexity", "tokens_per_second"):  # in train_results too
        assert res[key] == h[key]

    # The checkpoint is the model that was validated: same held-out loss, from its logits.
    loaded, meta = load_model(res["checkpoint"])
    assert meta["data"]["kind"] == "text" and meta["data"]["block_size"] == 64
    assert meta["config"]["data"]["augment"] == []  # text is never augmented
    assert loaded.head.weight is loaded.tok_emb.weight
    tokens = torch.from_numpy(held.reshape(len(held), -1).astype(np.int64))
    with torch.no_grad():
        logits = loaded(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert loss == pytest.approx(res["val_loss"], abs=1e-4)


def test_cli_train_builds_a_gpt_from_the_text_dataset(tmp_path, monkeypatch, capsys):
    """``lepton-ray train --model gpt``: vocab_size and block_size come from the data, the other
    kwargs from --set; what fit() is handed (fit itself is the Ray test's)."""
    import lepton_ray
    from lepton_ray import cli
    from lepton_ray.gpt import GPT

    src = tmp_path / "a.txt"
    src.write_text("abcdefgh " * 40)
    prepare(f"text:{src}", str(tmp_path / "ds"), block_size=16)
    seen = {}

    def fake_fit(model, train, val, cfg):
        seen.update(model=model, train=train, val=val, cfg=cfg)
        return {"train_loss": 1.0, "history": []}

    monkeypatch.setattr(lepton_ray, "fit", fake_fit)
    argv = ["train", "--data", str(tmp_path / "ds" / "train"), "--model", "gpt"]
    argv += ["--set", "model.kwargs.n_layer=1", "--set", "model.kwargs.n_embd=32"]
    assert cli.main([*argv, "--storage", str(tmp_path / "runs")]) == 0
    m = seen["model"]
    assert isinstance(m, GPT) and (m.vocab_size, m.block_size, len(m.blocks)) == (256, 16, 1)
    assert seen["train"].kind == "text"
    capsys.readouterr()
    bad = [*argv[:5], "--set", "model.kwargs.block_size=8"]
    assert cli.main(bad) == 2
    assert capsys.readouterr().err.strip() == (
        "lepton-ray: error: model.kwargs.block_size: comes from the dataset; leave it out"
    )
