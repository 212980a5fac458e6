"""Text classification end to end: labelled text, a BERT-style encoder, an endpoint, texts over HTTP.

    python examples/bert_classify.py                  # 3 epochs, 128 tokens, 2 layers of 64
    python examples/bert_classify.py --smoke-test     # 1 epoch, 64 tokens, 1 layer of 64

The built-in corpus (``python-snippets``: paragraphs of Python's own sources, docstrings and
language reference, each labelled by what it is; a third each) is prepared into the store, a
small BERT is trained on it with 2 workers, its best checkpoint is deployed, and the held-out
paragraphs are sent to ``POST /v1/predict`` as ``{"texts": [...]}``, as they are: the endpoint
cuts and pads them to the model's block as the data path did. Prints the endpoint's accuracy on
them, which is the run's ``val_accuracy``: the same rows, the same model. The store is
``$LEPTON_STORE`` (default ``~/.lepton_ray/store``); with ``RAY_ADDRESS`` set it runs on that
cluster instead of a local Ray instance.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

import torch

import lepton_ray
from lepton_ray.data import labelled_text, read_ids
from lepton_ray.storage import default_store

FULL = {"block_size": 128, "epochs": 3, "batch_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64}
SMOKE = {"block_size": 64, "epochs": 1, "batch_size": 128, "n_layer": 1, "n_head": 2, "n_embd": 64}


def predict(url: str, texts: list[str], per_request: int = 64) -> list[str]:
    """The class the endpoint gives each text, ``per_request`` texts a POST."""
    out = []
    for i in range(0, len(texts), per_request):
        body = json.dumps({"texts": texts[i : i + per_request]}).encode()
        request = urllib.request.Request(
            f"{url}/v1/predict", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            out += [p["class"] for p in json.loads(r.read())["predictions"]]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke-test", action="store_true", help="1 epoch of a tiny model")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=8000, help="where Serve listens, if this starts it")
    args = p.parse_args(argv)
    shape = SMOKE if args.smoke_test else FULL
    store = default_store()

    # Labelled text -> Parquet rows of byte tokens: {"train", "test"} (a seeded tenth held out).
    data = lepton_ray.prepare(
        "python-snippets",
        f"{store}/datasets/python-snippets",
        block_size=shape["block_size"],
    )
    # vocab_size, block_size and num_classes come from the data; the rest is the model's shape.
    torch.manual_seed(0)  # the same initial weights every run
    model = lepton_ray.build_model(
        "bert",
        **data["train"].model_kwargs(),
        **{k: shape[k] for k in ("n_layer", "n_head", "n_embd")},
    )
    trainer = lepton_ray.Trainer(args.workers, storage=f"{store}/runs")
    results = trainer.fit(
        model, data["train"], data["test"], batch_size=shape["batch_size"], epochs=shape["epochs"],
        optimizer="adamw", lr=3e-3, weight_decay=0.0, schedule="cosine", warmup_fraction=0.05,
        progress_bar=False,
    )  # fmt: skip

    url = lepton_ray.deploy(
        results["checkpoint"], port=args.port, name="bert", route_prefix="/bert"
    )
    texts, labels = labelled_text.python_snippets()  # the raw texts: row ids index them
    held_out = read_ids(data["test"])
    answers = predict(url, [texts[i] for i in held_out])
    accuracy = sum(a == labels[i] for a, i in zip(answers, held_out, strict=True)) / len(answers)
    print(
        f"{len(answers)} held-out texts over HTTP: accuracy {accuracy:.3f} (val_accuracy "
        f"{results['val_accuracy']:.3f}; the majority class is 1/3) at {url}"
    )
    return {"results": results, "url": url, "http_accuracy": accuracy, "texts": len(answers)}


if __name__ == "__main__":
    main(sys.argv[1:])
