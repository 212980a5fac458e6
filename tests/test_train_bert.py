"""Training and serving the BERT classifier: a sharded (FSDP) step equals one process's (gloo,
no Ray), the command line and the config build it from the data, and one run on the shared Ray
instance: examples/bert_classify.py --smoke-test trains a tiny BERT with 2 workers on the built-in
corpus, deploys it and sends the held-out texts over HTTP.

The Ray run's margin: the majority class is 1/3 of the held-out texts and a rule on their lengths
reaches ~0.40 at 64 bytes (tests/test_text_data.py); one epoch of this model (34 steps of 128
texts, one layer of 64) reached 0.645 here, and must reach 0.5."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lepton_ray.config import OptimConfig, ScalingConfig, TrainConfig
from lepton_ray.data import labelled_text, prepare
from lepton_ray.models import build_model
from lepton_ray.train import batching
from lepton_ray.train.step import TrainStep
from lepton_ray.train.task import TextClassification
from tests.test_examples import example
from tests.test_fsdp import init, sharded_model, spawn

B, T, STEPS = 7, 12, 3  # 7 texts on 2 ranks: 4 + 3
# No biases: a key bias has no gradient (softmax ignores a shift common to all keys) but float
# noise, which AdamW turns into steps of the full learning rate, different in each run.
TINY = dict(vocab_size=256, block_size=T, num_classes=3, n_layer=2, n_head=2, n_embd=16, bias=False)
TEXTS = [
    "def f(x): return x",
    "Return the sum of a and b.",
    "The with statement",
    "if a:\n    b()",
    "a",
    "A docstring that is longer than the block",
    "x = [i for i in y]",
]


# --- FSDP: the sharded step equals one process on the global batch ------------------------------
def _config(world: int, strategy: str) -> TrainConfig:
    return TrainConfig(
        batch_size=B,
        max_micro_batch=2,  # micro-batches on every rank
        strategy=strategy,
        optim=OptimConfig(optimizer="adamw", lr=0.01, schedule="constant", grad_clip=0.5),
        scaling=ScalingConfig(num_workers=world),
    )


def _batches() -> list[dict[str, torch.Tensor]]:
    """STEPS batches of B texts, tokenized and padded as the data path does, in the feeds' layout
    (uint8 N, 1, 1, T)."""
    rows = torch.from_numpy(labelled_text.tokenize(TEXTS, T)).view(B, 1, 1, T)
    return [
        {"image": rows.roll(s, 0), "label": torch.tensor([0, 1, 2, 0, 1, 1, 0]).roll(s + 1)}
        for s in range(STEPS)
    ]


def _run(model, world: int, rank: int, strategy: str) -> list[float]:
    task = TextClassification(torch.device("cpu"))
    step = TrainStep(model, _config(world, strategy), world, rank, STEPS, task=task)
    start = sum(batching.worker_batch(B, world, r) for r in range(rank))
    mine = slice(start, start + batching.worker_batch(B, world, rank))
    losses = []
    for batch in _batches():
        x, y = task.inputs({k: v[mine] for k, v in batch.items()})
        sums = torch.zeros(3, dtype=torch.float64)
        step(x, y, sums)
        if world > 1:
            dist.all_reduce(sums)
        losses.append(float(sums[0] / sums[2]))
    return losses


def _train_sharded(rank: int, world: int, rendezvous: str, out: str) -> None:
    init(rank, world, rendezvous)
    torch.manual_seed(0 if rank == 0 else rank)  # only rank 0's weights count
    model = sharded_model(build_model("bert", **TINY))
    losses = _run(model, world, rank, "fsdp")
    weights = {k: v.full_tensor().tolist() for k, v in model.state_dict().items()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "weights": weights}, f)
    dist.destroy_process_group()


def test_fsdp_bert_step_equals_one_process_on_the_global_batch(tmp_path):
    """Each encoder block sharded (FSDP2 over gloo, 2 processes), uneven shares, micro-batches,
    clipping and AdamW over 3 steps of padded texts: one process's losses and weights."""
    torch.manual_seed(0)
    reference = build_model("bert", **TINY)
    want = _run(reference, 1, 0, "ddp")
    spawn(_train_sharded, 2, str(tmp_path / "w2.json"))
    got = json.loads((tmp_path / "w2.json").read_text())
    assert got["losses"] == pytest.approx(want, abs=1e-5)
    assert want[-1] < want[0]  # it learns
    for name, w in reference.state_dict().items():
        assert torch.allclose(torch.tensor(got["weights"][name]), w, atol=1e-5), name


# --- the command line and the config build it from the data -------------------------------------
def test_cli_train_builds_a_bert_from_labelled_text(tmp_path, monkeypatch, capsys):
    """``lepton-ray train --model bert``: vocab_size, block_size and num_classes come from the
    data, the rest from --set; what fit() is handed (fit itself is the Ray test's)."""
    import lepton_ray
    from lepton_ray import cli
    from lepton_ray.bert import BERT

    src = tmp_path / "a.csv"
    src.write_text("text,label\n" + "".join(f"text {i},{'abc'[i % 3]}\n" for i in range(30)))
    prepare(f"text-csv:{src}", str(tmp_path / "ds"), block_size=16)
    seen = {}

    def fake_fit(model, train, val, cfg):
        seen.update(model=model, train=train, cfg=cfg)
        return {"train_loss": 1.0, "history": []}

    monkeypatch.setattr(lepton_ray, "fit", fake_fit)
    argv = ["train", "--data", str(tmp_path / "ds" / "train"), "--model", "bert"]
    argv += ["--set", "model.kwargs.n_layer=1", "--set", "model.kwargs.n_embd=32"]
    assert cli.main([*argv, "--storage", str(tmp_path / "runs")]) == 0
    m = seen["model"]
    assert isinstance(m, BERT) and (m.block_size, m.num_classes, len(m.blocks)) == (16, 3, 1)
    assert seen["train"].kind == "text-label"
    capsys.readouterr()
    assert cli.main([*argv[:5], "--set", "model.kwargs.num_classes=2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lepton-ray: error: model.kwargs.num_classes: comes from the dataset; leave it out"
    )


def test_the_pipeline_config_and_a_dlrms_data_args():
    from lepton_ray.config import load_config
    from lepton_ray.errors import ConfigError
    from tests.test_pipelines import CONFIGS_DIR

    cfg = load_config(CONFIGS_DIR / "python_snippets_bert.yaml", smoke_test=True)
    assert cfg.model.name == "bert" and cfg.dataset.source == "python-snippets"
    assert cfg.dataset_uri.endswith("/datasets/python-snippets-smoke")
    for key in ("cardinalities", "dense"):  # a DLRM's, given by its click data
        with pytest.raises(ConfigError, match=f"model.kwargs.{key}: comes from the dataset"):
            load_config(None, ["model.name=dlrm", f"model.kwargs.{key}=[3]"])


# --- one real run ---------------------------------------------------------------------------------
@pytest.mark.ray
def test_example_trains_a_bert_that_beats_the_majority_and_serves_texts(
    ray_session, serve_port, tmp_path, monkeypatch, capsys
):
    from ray import serve

    from lepton_ray import load_model, open_dataset

    monkeypatch.setenv("LEPTON_STORE", str(tmp_path))
    try:
        out = example("bert_classify").main(["--smoke-test", "--port", str(serve_port)])
    finally:
        if "bert" in serve.status().applications:
            serve.delete("bert")
    res = out["results"]
    h = res["history"][-1]
    train = open_dataset(str(tmp_path / "datasets" / "python-snippets" / "train"))
    assert h["world_size"] == 2 and h["step"] == train.num_rows // 128  # one epoch
    assert res["val_accuracy"] >= 0.5, res["val_accuracy"]  # majority: 1/3
    # The endpoint answered every held-out text as the run's validation did: same rows, same model.
    assert out["texts"] > 400
    assert out["http_accuracy"] == pytest.approx(res["val_accuracy"], abs=1.5 / out["texts"])
    assert "held-out texts over HTTP: accuracy" in capsys.readouterr().out
    model, meta = load_model(res["checkpoint"])
    assert meta["data"]["kind"] == "text-label" and meta["data"]["block_size"] == 64
    assert meta["data"]["classes"] == ["code", "docstring", "reference"]
    assert meta["config"]["data"]["augment"] == []  # text is never augmented
    assert np.isfinite(model(torch.zeros(1, 64, dtype=torch.long)).detach().numpy()).all()
