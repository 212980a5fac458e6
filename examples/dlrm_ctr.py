"""A click model from data to an endpoint: generate click data with a planted signal, train a DLRM
whose embedding tables FSDP shards across 2 workers, compare its held-out AUC with the planted
model's, deploy it and POST feature rows to /v1/predict.

    python examples/dlrm_ctr.py                    # 100,000 rows, 4 tables of 100 ids, 3 epochs
    python examples/dlrm_ctr.py --smoke-test       # 2,000 rows, 3 tables of 21 ids, 1 epoch, 1 worker
    python examples/dlrm_ctr.py --port 8000

The data and the run go under ``$LEPTON_STORE`` (default ``~/.lepton_ray/store``); with
``RAY_ADDRESS`` set it runs on that cluster, else on a local Ray instance, whose endpoint stops when
the script ends. The same request from the command line: ``lepton-ray predict URL --features
'{"dense": [[...]], "sparse": [[...]]}'`` (docs/recommendation.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

import lepton_ray
from lepton_ray.data import ctr, read_arrays
from lepton_ray.storage import default_store
from lepton_ray.train.sharded import export  # what `lepton-ray export` runs

SOURCES = {
    False: "synthetic-ctr:rows=100000,tables=4,cardinality=100,dense=4,seed=0",
    True: "synthetic-ctr:rows=2000,tables=3,cardinality=21,dense=4,seed=0",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke-test", action="store_true", help="2,000 rows, 1 epoch, 1 worker: checks wiring"
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port when this starts Serve")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    store = default_store().rstrip("/")
    source = SOURCES[args.smoke_test]
    name = "ctr-example-smoke" if args.smoke_test else "ctr-example"
    data = lepton_ray.prepare(source, f"{store}/datasets/{name}")
    planted = data["test"].manifest["planted_auc"]  # the planted model's AUC: the ceiling

    # cardinalities and dense come from the data; each table is an FSDP unit, sharded by rows
    model = lepton_ray.build_model("dlrm", **data["train"].model_kwargs(), embed_dim=8)
    trainer = lepton_ray.Trainer(1 if args.smoke_test else 2, strategy="fsdp")
    results = trainer.fit(
        model,
        data["train"],
        data["test"],
        batch_size=256,
        epochs=1 if args.smoke_test else 3,
        optimizer="adamw",
        lr=0.01,
        weight_decay=0.0,
        schedule="constant",
        progress_bar=False,
    )
    auc = results["history"][-1]["val_auc"]
    print(f"held-out AUC {auc:.3f} against the planted model's {planted:.3f}")

    # Every rank wrote its rows of the tables; Serve reads one file: consolidate, then deploy.
    checkpoint = results["checkpoint"]
    one_file = export(checkpoint, f"{results['run']}/exported/{checkpoint.rsplit('/', 1)[-1]}").uri
    url = lepton_ray.deploy(
        one_file, port=args.port, name="ctr-example", route_prefix="/ctr-example"
    )
    print(f"serving at {url}")

    rows, labels, _ = read_arrays(data["test"])  # a few held-out rows, as a client would send them
    dense, sparse = ctr.unpack(rows[:4], data["test"].manifest["dense"])
    body = {"features": {"dense": dense.tolist(), "sparse": sparse.tolist()}}
    request = urllib.request.Request(
        url + "/v1/predict",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        answer = json.loads(r.read())
    for p, y in zip(answer["predictions"], labels[:4], strict=True):
        print(f"click probability {p['click_probability']:.3f}  (clicked: {int(y)})")
    return {
        "checkpoint": results["checkpoint"],
        "served": one_file,
        "val_auc": auc,
        "planted_auc": planted,
        "url": url,
        "predictions": answer["predictions"],
        "labels": labels[:4].tolist(),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
