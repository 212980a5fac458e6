"""The DLRM and the click task (pure, no Ray): shapes, the interaction, the spec, the task's bytes,
loss and AUC, and a plain loop recovering the planted signal."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

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


# --- serving: /v1/predict with {"features": ...} ------------------------------------------------
def _click_checkpoint(dest, cards=(5, 7), dense=2) -> tuple[str, DLRM]:
    """A DLRM saved as a real checkpoint (safetensors + manifest) whose data is click rows."""
    from lepton_ray import storage
    from lepton_ray.checkpoint import publish, write_local

    torch.manual_seed(0)
    model = build_model("dlrm", cardinalities=list(cards), dense=dense, embed_dim=4).eval()
    row = 4 * (dense + len(cards))
    data = {"shape": [1, row, 1], "mean": [0.5], "std": [0.2], "classes": ["0", "1"]}
    data |= {"kind": "ctr", "cardinalities": list(cards), "dense": dense}
    local = write_local(f"{dest}-local", model, {"model": spec_of(model), "data": data})
    return publish(local, storage.resolve(str(dest))).uri, model


def test_a_served_dlrm_answers_click_probabilities_of_its_own_logits(tmp_path):
    import json

    from lepton_ray.serve import ServeConfig
    from lepton_ray.serve.codec import ClickSpec, decode_features
    from lepton_ray.serve.runner import ModelRunner

    ckpt, model = _click_checkpoint(tmp_path / "ckpt")
    runner = ModelRunner(ServeConfig(checkpoint=ckpt))
    body = {
        "features": {"dense": [[0.5, -1.0], [2.0, 0.0], [0, 1]], "sparse": [[0, 6], [4, 0], [2, 3]]}
    }
    rows = decode_features(json.dumps(body).encode(), runner.clicks, 8)
    assert isinstance(runner.clicks, ClickSpec) and rows.shape == (3, 1, 16, 1)
    answers = runner.predict_many([rows[:1], rows[1:]])  # two requests batched together
    with torch.no_grad():
        want = model(
            Features(
                torch.tensor(body["features"]["dense"]), torch.tensor(body["features"]["sparse"])
            )
        )
    got = [a["click_probability"] for part in answers for a in part]
    assert [len(part) for part in answers] == [1, 2]
    np.testing.assert_allclose(got, want.sigmoid().numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "body, status, match",
    [
        (b"", 400, "empty request body"),
        (b"{", 400, "not valid JSON"),
        (b'{"instances": [[1]]}', 400, '"features"'),
        (b'{"features": {"dense": [[1, 2]]}}', 400, 'exactly "dense" and "sparse"'),
        (b'{"features": {"dense": [], "sparse": []}}', 400, '"dense" must be a non-empty list'),
        (
            b'{"features": {"dense": [[1]], "sparse": [[0, 0]]}}',
            400,
            r'"dense"\[0\] must be a list of 2',
        ),
        (
            b'{"features": {"dense": [[1, 2]], "sparse": [[0, 0], [0, 0]]}}',
            400,
            '"dense" has 1 rows, "sparse" 2',
        ),
        (b'{"features": {"dense": [[1, "a"]], "sparse": [[0, 0]]}}', 422, "numbers only"),
        (b'{"features": {"dense": [[1, true]], "sparse": [[0, 0]]}}', 422, "numbers only"),
        (b'{"features": {"dense": [[1, 2]], "sparse": [[0, 1.5]]}}', 422, "whole-number ids only"),
        (b'{"features": {"dense": [[1, NaN]], "sparse": [[0, 0]]}}', 422, "NaN or infinite"),
        (
            b'{"features": {"dense": [[1, 1e300]], "sparse": [[0, 0]]}}',
            422,
            "too large for float32",
        ),
        (
            b'{"features": {"dense": [[1, 2]], "sparse": [[0, 7]]}}',
            422,
            r'"sparse"\[0\]\[1\] is 7: table 1 takes ids 0..6',
        ),
        (b'{"features": {"dense": [[1, 2]], "sparse": [[-1, 0]]}}', 422, "table 0 takes ids 0..4"),
        (
            b'{"features": {"dense": [[1, 2]], "sparse": [[0, 99999999999999999999]]}}',
            422,
            "whole-number ids only",
        ),
        (
            b'{"features": {"dense": [[1, 2]], "sparse": [[0, 9223372036854775807]]}}',
            422,
            "table 1",
        ),
        (
            b'{"features": {"dense": [[1, 2], [1, 2], [1, 2]], "sparse": [[0, 0], [0, 0], [0, 0]]}}',
            413,
            "3 rows in one request; the limit is 2",
        ),
    ],
)
def test_bad_features_are_one_json_error_line_of_the_endpoint(body, status, match):
    """Each bad body, through the endpoint's own error handlers (as tests/test_serve_errors.py
    serves them, no Ray): its 4xx and ``{"error": "<one line>"}``."""
    from lepton_ray.serve.app import add_error_handlers
    from lepton_ray.serve.codec import ClickSpec, decode_features

    api = FastAPI()
    add_error_handlers(api)

    @api.post("/v1/predict")
    async def predict(request: Request) -> dict:
        decode_features(await request.body(), ClickSpec([5, 7], 2), 2)
        return {}

    with TestClient(api, raise_server_exceptions=False) as client:
        r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and "\n" not in r.json()["error"]
    assert re.search(match, r.json()["error"]), r.json()
