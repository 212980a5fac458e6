"""The BERT-style classifier and its serving path (pure, no Ray): bidirectional attention, the
padding mask, [CLS] pooling, the spec; the text task; ``{"texts": [...]}`` decoding and its 4xx
answers through the endpoint's error handlers; a served checkpoint answering its own logits."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from lepton_ray.bert import BERT
from lepton_ray.data import labelled_text
from lepton_ray.models import build_model, from_spec, spec_of
from lepton_ray.serve.codec import InputSpec, decode_body, decode_texts, to_model_input
from lepton_ray.train.task import TextClassification, for_data

CPU = torch.device("cpu")
TINY = dict(vocab_size=256, block_size=16, num_classes=3, n_layer=2, n_head=2, n_embd=32)


def _model(**kw) -> BERT:
    torch.manual_seed(0)
    return build_model("bert", **(TINY | kw)).eval()


def _tokens(*texts: str, block: int = 16) -> torch.Tensor:
    return torch.from_numpy(labelled_text.tokenize(list(texts), block).astype(np.int64))


# --- the model -----------------------------------------------------------------------------------
def test_cls_pooling_shapes():
    m = _model()
    x = _tokens("hello", "a longer sentence")
    h = m.encode(x)
    assert h.shape == (2, 17, 32)  # [CLS] + 16 positions
    logits = m(x)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, m.head(h[:, 0]))  # the head reads [CLS] only
    assert m(_tokens("x", block=5)).shape == (1, 3)  # shorter than the block: fine
    with pytest.raises(ValueError, match="longer than block_size 16"):
        m(torch.ones(1, 17, dtype=torch.long))


def test_bidirectional_a_later_token_changes_earlier_positions():
    """Changing token 6 changes the hidden state of position 2 (and [CLS]); a GPT's logits at
    position 2 stay as they were (causal)."""
    m = _model()
    a, b = _tokens("abcdefghij"), _tokens("abcdefXhij")
    ha, hb = m.encode(a), m.encode(b)
    assert not torch.allclose(ha[:, 1 + 2], hb[:, 1 + 2])  # +1: [CLS] is position 0
    assert not torch.allclose(ha[:, 0], hb[:, 0])
    torch.manual_seed(0)
    gpt = build_model("gpt", vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32).eval()
    with torch.no_grad():
        torch.testing.assert_close(gpt(a)[:, :6], gpt(b)[:, :6])


def test_padding_is_masked_appending_padding_leaves_the_logits():
    m = _model()
    text = _tokens("hello world", block=11)
    padded = torch.cat([text, torch.zeros(1, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(m(padded), m(text), rtol=1e-5, atol=1e-6)
        # without the mask the padding would be attended to: its embedding is not zero
        h, keep = m.embed(padded)
        assert keep[0, 0, 0].tolist() == [True] * 12 + [False] * 5
    # rows of one batch padded to different lengths answer as they do alone
    batch = _tokens("hi", "a much longer text here")
    with torch.no_grad():
        torch.testing.assert_close(m(batch)[:1], m(_tokens("hi", block=2)), rtol=1e-5, atol=1e-6)


def test_built_from_a_spec_and_on_the_meta_device():
    m = _model()
    spec = spec_of(m)
    assert spec == {"name": "bert", "kwargs": TINY}
    again = from_spec(spec)
    again.load_state_dict(m.state_dict())
    x = _tokens("same weights, same logits")
    torch.testing.assert_close(again.eval()(x), m(x))
    with torch.device("meta"):  # what FSDP does: no weights allocated, no buffers to fill
        meta = from_spec(spec)
    assert all(p.is_meta for p in meta.parameters()) and not list(meta.buffers())


def test_fsdp_shards_each_block():
    from lepton_ray.train.strategy import shard_units

    m = _model(n_layer=3)
    assert shard_units(m) == list(m.blocks) and len(m.blocks) == 3


def test_bad_shape_refused():
    with pytest.raises(ValueError, match="multiple of n_head"):
        BERT(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        BERT(num_classes=0)


# --- the task ------------------------------------------------------------------------------------
def test_text_task_hands_the_model_int64_tokens_and_labels():
    task = for_data({"kind": "text-label", "block_size": 8, "mean": [0.1], "std": [0.2]}, CPU)
    assert isinstance(task, TextClassification)
    rows = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0], [255, 9, 9, 9, 9, 9, 9, 9]], dtype=torch.uint8)
    batch = {"image": rows.view(2, 1, 1, 8), "label": torch.tensor([2, 0]), "id": torch.arange(2)}
    x, y = task.inputs(batch)
    assert x.dtype == torch.int64 and torch.equal(x, rows.long())  # never normalised
    assert y.tolist() == [2, 0]
    logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, 5.0, 0.0]])
    assert float(task.correct(logits, y)) == 1.0  # classification's counts


def test_fit_probes_a_text_classifier_with_tokens(tmp_path):
    from lepton_ray.data import prepare
    from lepton_ray.errors import DataError
    from lepton_ray.train.trainer import _check_model

    csv = tmp_path / "a.csv"
    csv.write_text("text,label\nspam spam,bad\nhello there,good\nbuy now,bad\n")
    info = prepare(f"text-csv:{csv}", str(tmp_path / "ds"), block_size=12)["train"]
    assert info.model_kwargs() == {"vocab_size": 256, "block_size": 12, "num_classes": 2}
    _check_model(build_model("bert", **info.model_kwargs(), n_layer=1, n_embd=16), info)
    with pytest.raises(DataError, match=r"outputs \(3,\) per image but the dataset has 2 classes"):
        _check_model(build_model("bert", **(info.model_kwargs() | {"num_classes": 3})), info)
    with pytest.raises(DataError, match="block_size 8 is shorter than the dataset's rows of 12"):
        _check_model(build_model("bert", **(info.model_kwargs() | {"block_size": 8})), info)
    with pytest.raises(DataError, match="cannot take the dataset's token blocks"):
        _check_model(build_model("cnn"), info)


# --- serving: {"texts": [...]} ------------------------------------------------------------------
SPEC = InputSpec([1, 8, 1], [0.0], [1.0], ["code", "docstring", "reference"], kind="text-label")


def test_texts_decode_with_the_data_paths_tokenizer():
    body = json.dumps({"texts": ["hi", "héllo wörld!", "x" * 20]}).encode()
    rows = decode_texts(body, "application/json", SPEC, 8)
    assert rows.shape == (3, 1, 8, 1) and rows.dtype == np.uint8
    want = labelled_text.tokenize(["hi", "héllo wörld!", "x" * 20], 8)
    assert np.array_equal(rows.reshape(3, 8), want)
    assert rows[0, 0, :, 0].tolist() == [104, 105, 0, 0, 0, 0, 0, 0]
    x = to_model_input(rows, SPEC)
    assert x.dtype == np.int64 and x.shape == (3, 8)


@pytest.mark.parametrize(
    "body, ctype, status, match",
    [
        (b"", "application/json", 400, "empty request body"),
        (b"{", "application/json", 400, "not valid JSON"),
        (b'["a"]', "application/json", 400, r'body must be \{"texts"'),
        (b'{"instances": [[1]]}', "application/json", 400, "classifies text.*not 'instances'"),
        (b'{"texts": ["a"], "x": 1}', "application/json", 400, "not 'texts', 'x'"),
        (b'{"texts": "abc"}', "application/json", 400, '"texts" must be a non-empty list'),
        (b'{"texts": []}', "application/json", 400, '"texts" must be a non-empty list'),
        (b'{"texts": ["a", 7]}', "application/json", 422, r"texts\[1\] is int, not a string"),
        (b'{"texts": ["a", null]}', "application/json", 422, r"texts\[1\] is NoneType"),
        (b'{"texts": [""]}', "application/json", 422, r"texts\[0\] is empty"),
        (b'{"texts": ["a\\u0000b"]}', "application/json", 422, r"texts\[0\] holds U\+0000"),
        (b'{"texts": ["\\ud800"]}', "application/json", 422, "lone surrogate"),
        (b'{"texts": ["a", "b", "c"]}', "application/json", 413, "3 texts in one request; the limit is 2"),
        (b"\x89PNG\r\n", "image/png", 415, "classifies text: send JSON .* not image/png"),
        (b"\x00\x01", "application/octet-stream", 415, "classifies text"),
        (b"--x\r\n", "multipart/form-data; boundary=x", 415, "classifies text"),
    ],
)  # fmt: skip
def test_bad_texts_are_one_json_error_line_of_the_endpoint(body, ctype, status, match):
    from lepton_ray.serve.app import add_error_handlers

    api = FastAPI()
    add_error_handlers(api)

    @api.post("/v1/predict")
    async def predict(request: Request) -> dict:
        decode_texts(await request.body(), request.headers["content-type"], SPEC, 2)
        return {}

    with TestClient(api, raise_server_exceptions=False) as client:
        r = client.post("/v1/predict", content=body, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and "\n" not in r.json()["error"]
    assert re.search(match, r.json()["error"]), r.json()


def test_texts_sent_to_an_image_model_are_named():
    from lepton_ray.serve.codec import RequestError

    image = InputSpec([2, 2, 1], [0.5], [0.2], ["a", "b"])
    with pytest.raises(RequestError, match='classifies images: send "instances" or "images"') as e:
        decode_body(b'{"texts": ["hello"]}', "application/json", image, 8)
    assert e.value.status == 400


def _text_checkpoint(dest) -> tuple[str, BERT]:
    """A BERT saved as a real checkpoint (safetensors + manifest) whose data is labelled text."""
    from lepton_ray import storage
    from lepton_ray.checkpoint import publish, write_local

    model = _model(block_size=8)
    data = {"shape": [1, 8, 1], "mean": [0.3], "std": [0.2], "kind": "text-label"}
    data |= {"classes": ["code", "docstring", "reference"], "block_size": 8, "vocab_size": 256}
    local = write_local(f"{dest}-local", model, {"model": spec_of(model), "data": data})
    return publish(local, storage.resolve(str(dest))).uri, model


def test_a_served_bert_answers_the_classes_of_its_own_logits(tmp_path):
    from lepton_ray.serve import ServeConfig
    from lepton_ray.serve.runner import ModelRunner

    ckpt, model = _text_checkpoint(tmp_path / "ckpt")
    runner = ModelRunner(ServeConfig(checkpoint=ckpt, top_k=2))
    assert runner.spec.kind == "text-label"
    texts = ["def f(x):\n    return x", "Return the sum.", "The ``with`` statement"]
    rows = decode_texts(json.dumps({"texts": texts}).encode(), "application/json", runner.spec, 8)
    answers = runner.predict_many([rows[:1], rows[1:]])  # two requests batched together
    assert [len(a) for a in answers] == [1, 2]
    with torch.no_grad():
        p = model(_tokens(*texts, block=8)).softmax(1)
    for got, want in zip([a for part in answers for a in part], p, strict=True):
        assert got["index"] == int(want.argmax()) and got["class"] == SPEC.classes[got["index"]]
        assert [c["class"] for c in got["top_k"]] == [
            SPEC.classes[int(i)] for i in want.argsort(descending=True)[:2]
        ]
        assert got["top_k"][0]["probability"] == pytest.approx(float(want.max()), abs=1e-6)
