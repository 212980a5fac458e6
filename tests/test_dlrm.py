"""The DLRM and the click task (pure, no Ray): shapes, the interaction, the spec, the task's bytes,
loss and AUC, and a plain loop recovering the planted signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lepton_ray.data import ctr
from lepton_ray.dlrm import DLRM, Features
from lepton_ray.models import build_model, from_spec, spec_of
from lepton_ray.train.task import ClickThrough, for_data

CPU = torch.device("cpu")


def _features(n: int, cards=(5, 7), dense: int = 3, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, c, (n,), generator=g) for c in cards], 1)
    return Features(torch.randn(n, dense, generator=g), ids)


def test_dlrm_gives_one_logit_per_row_and_is_a_registered_spec():
    model = build_model("dlrm", cardinalities=[5, 7], dense=3, embed_dim=4)
    x = _features(6)
    assert model(x).shape == (6,)
    assert [t.weight.shape for t in model.tables] == [(5, 4), (7, 4)]
    spec = spec_of(model)
    assert spec == {"name": "dlrm", "kwargs": {"cardinalities": [5, 7], "dense": 3, "embed_dim": 4}}
    again = from_spec(spec)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(x), model(x))
    no_dense = DLRM([5, 7, 9], dense=0, embed_dim=4)
    assert no_dense(Features(torch.zeros(2, 0), torch.tensor([[0, 1, 2], [4, 6, 8]]))).shape == (2,)


def test_interaction_is_every_pairwise_dot_once():
    model = DLRM([3, 3], dense=2, embed_dim=4, bottom=(), top=())
    x = _features(5, (3, 3), 2)
    z = model.bottom(x.dense)
    e0, e1 = model.tables[0](x.sparse[:, 0]), model.tables[1](x.sparse[:, 1])
    # F = 3 vectors (bottom output, two tables) -> 3 dots after the bottom output
    want = torch.cat([z, (e0 * z).sum(1, keepdim=True), (e1 * z).sum(1, keepdim=True)], 1)
    want = torch.cat([want, (e1 * e0).sum(1, keepdim=True)], 1)
    lin = model.top[0]
    assert lin.in_features == 4 + 3
    torch.testing.assert_close(model(x), (want @ lin.weight.T + lin.bias).squeeze(-1))


def test_features_cut_into_micro_batches_like_a_tensor():
    x = _features(10)
    part = x[2:5]
    assert len(part) == 3
    torch.testing.assert_close(part.dense, x.dense[2:5])
    torch.testing.assert_close(part.sparse, x.sparse[2:5])


def _batch(rows: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    """As the feeds hand rows: uint8 CHW of the (1, R, 1) 'image', i.e. (N, 1, 1, R)."""
    return {
        "image": torch.from_numpy(rows.transpose(0, 3, 1, 2).copy()),
        "label": torch.from_numpy(labels),
    }


def test_click_task_reads_the_row_bytes_exactly():
    dense = np.array([[1.5, -2.25], [np.pi, 0.0]], np.float32)
    ids = np.array([[0, 2**31 - 1, 7], [3, 1, 0]])
    task = for_data({"kind": "ctr", "dense": 2}, CPU)
    assert isinstance(task, ClickThrough)
    x, y = task.inputs(_batch(ctr.pack(dense, ids), np.array([1, 0])))
    assert x.dense.dtype == torch.float32 and x.sparse.dtype == torch.int64
    np.testing.assert_array_equal(x.dense.numpy(), dense)
    np.testing.assert_array_equal(x.sparse.numpy(), ids)
    assert y.tolist() == [1, 0]


def test_click_loss_correct_and_exact_validation_auc():
    task = ClickThrough(CPU, 1)
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    y = torch.tensor([1, 1, 0, 0])
    torch.testing.assert_close(
        task.loss(logits, y), F.binary_cross_entropy(logits.sigmoid(), y.float())
    )
    assert int(task.correct(logits, y)) == 2  # 2.0 -> 1 right, -1.0 -> 0 wrong, 0.5 wrong, -3 right
    assert task.metrics({}) == {}  # no validation pass yet: no AUC
    task.loss_sum(logits[:2], y[:2])  # the validation path, in two batches
    total = task.loss_sum(logits[2:], y[2:])
    torch.testing.assert_close(
        total, F.binary_cross_entropy_with_logits(logits[2:], y[2:].float(), reduction="sum")
    )
    assert task.metrics({}) == {"val_auc": ctr.auc(logits.numpy(), y.numpy())}  # 0.75
    assert task.metrics({}) == {}  # forgotten: the next epoch ranks its own pass


def test_a_plain_loop_recovers_the_planted_signal():
    """The model can learn what the data plants (the Ray test checks the same through FSDP)."""
    source = "synthetic-ctr:rows=8000,tables=3,cardinality=20,dense=4"
    _, splits, manifest = ctr.load(source)
    task = ClickThrough(CPU, 4)
    x, y = task.inputs(_batch(*splits["train"][1](0, 8000)[:2]))
    xv, yv = task.inputs(_batch(*splits["test"][1](0, 800)[:2]))
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend (seconds more on 2 busy cores)
    model = DLRM([20, 20, 20], dense=4, embed_dim=8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    for _ in range(2):
        perm = torch.randperm(8000)
        for s in range(0, 8000, 256):
            idx = perm[s : s + 256]
            loss = task.loss(model(Features(x.dense[idx], x.sparse[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        got = ctr.auc(model(xv).numpy(), yv.numpy())
    torch.set_num_threads(threads)
    ceiling = manifest["planted_auc"]  # 0.899 for this source
    assert 0.5 + 0.6 * (ceiling - 0.5) < got <= ceiling + 0.01, (got, ceiling)


@pytest.mark.parametrize("cards", [[], [3, 0]])
def test_bad_cardinalities_refused(cards):
    with pytest.raises(ValueError, match="cardinalities"):
        DLRM(cards)


def test_fsdp_shards_each_table_as_a_unit_of_its_own():
    from lepton_ray.train.strategy import shard_units

    model = DLRM([5, 7, 9], dense=2)
    assert shard_units(model) == list(model.tables)


def test_fit_refuses_a_model_that_cannot_take_the_click_rows(tmp_path):
    from lepton_ray.data import prepare
    from lepton_ray.errors import DataError
    from lepton_ray.train.trainer import _check_model

    info = prepare("synthetic-ctr:rows=20,tables=2,cardinality=5,dense=3", str(tmp_path))["train"]
    _check_model(build_model("dlrm", **info.model_kwargs()), info)  # the one it fits
    with pytest.raises(DataError, match=r"cannot take the dataset's click rows \(3 dense"):
        _check_model(build_model("cnn"), info)
    with pytest.raises(DataError, match=r"tables hold \[5, 4\] ids, the dataset's \[5, 5\]"):
        _check_model(DLRM([5, 4], dense=3), info)
    with pytest.raises(DataError, match=r"cannot take the dataset's click rows"):
        _check_model(DLRM([5, 5, 5], dense=3), info)  # a third table: no ids for it
