"""The whole path on the embedded default: data -> elastic DDP training -> Serve -> HTTP accuracy.

    python -m pipelines.demo                       # local object store, local Ray, port 8000
    python -m pipelines.demo --store s3://bucket/lepton --endpoint-url http://127.0.0.1:9000
    python -m pipelines.demo --smoke-test          # 1 epoch, a quick check of the wiring
    python -m pipelines.demo --verbose             # Ray's own output too (else in its log folder)

Prepares the 5,000 built-in MNIST digits into object storage, trains a CNN with 2 Ray Train
workers fed by Ray Data (with augmentation), checkpoints to the store, deploys the final
checkpoint with Ray Serve, sends the 1,000 held-out digits over HTTP and prints the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from lepton_ray.console import VERBOSE_HELP, entry_point
from lepton_ray.errors import LeptonError, one_line

APP = "lepton"  # the Serve application (lepton_ray's default name): redeploying replaces it
# What the printed summary keeps of train_results (run() returns them all).
SUMMARY_KEYS = ("epochs", "train_loss", "val_accuracy", "samples_per_second", "checkpoint", "run")


def say(line: str) -> None:
    """A stage's line, flushed: in order with the progress lines on stderr in a log."""
    print(line, flush=True)


def run(
    store: str,
    *,
    endpoint_url: str | None = None,
    epochs: int = 10,
    workers: int = 2,
    batch_size: int = 100,
    port: int = 8000,
    keep_serving: bool = False,
    log=say,
) -> dict[str, Any]:
    """Run the demo end to end and return its summary (also used by the tests)."""
    from ray import serve

    from lepton_ray import Trainer, build_model, deploy, prepare
    from lepton_ray.data import read_arrays
    from lepton_ray.runtime import ensure_ray
    from lepton_ray.serve.client import evaluate

    t0 = time.perf_counter()
    ensure_ray()
    store = store.rstrip("/")
    infos = prepare("mnist5k", f"{store}/datasets/mnist5k", endpoint_url=endpoint_url)
    train, test = infos["train"], infos["test"]
    log(f"[data] {train.num_rows} train / {test.num_rows} test digits at {store}/datasets/mnist5k")

    trainer = Trainer(workers)
    model = build_model("cnn", in_channels=train.shape[2], num_classes=train.num_classes)
    results = trainer.fit(
        model,
        train,
        test,
        batch_size=batch_size,
        epochs=epochs,
        storage=f"{store}/runs",
        endpoint_url=endpoint_url,
    )
    for h in results["history"]:
        log(
            f"[train] epoch {h['epoch']:>2}  loss {h['train_loss']:.4f}  acc {h['train_accuracy']:.4f}  "
            f"val_acc {h.get('val_accuracy', float('nan')):.4f}  {h['samples_per_second']:.0f} samples/s"
        )
    log(f"[train] checkpoint {results['checkpoint']}")

    url = deploy(results["checkpoint"], name=APP, port=port, endpoint_url=endpoint_url)
    log(f"[serve] {url}/v1/predict")
    images, labels, _ = read_arrays(test)
    served = evaluate(url, images, labels, list(test.classes))
    log(
        f"[http] accuracy {served['accuracy']:.4f} ({served['correct']}/{served['total']} in {served['requests']} requests)"
    )
    if not keep_serving:
        # The application only: Serve's controller, killed by serve.shutdown(), leaves Ray printing
        # an error for its pending shutdown task; a local instance stops with this process anyway.
        serve.delete(APP)
    summary = {
        "train_results": {k: v for k, v in results.items() if k != "history"},
        "http_accuracy": served["accuracy"],
        "endpoint": url,
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    from lepton_ray.storage import default_store

    p = argparse.ArgumentParser(
        prog="python -m pipelines.demo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--store",
        default=None,
        help="object store root (path or s3://bucket/prefix); default $LEPTON_STORE or ~/.lepton_ray/store",
    )
    p.add_argument(
        "--endpoint-url", default=None, help="S3-compatible endpoint (else $LEPTON_S3_ENDPOINT)"
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=100, help="global batch")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--keep-serving", action="store_true", help="leave the endpoint up (Ctrl-C to stop)"
    )
    p.add_argument(
        "--smoke-test", action="store_true", help="1 epoch: checks the wiring, not the accuracy"
    )
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = p.parse_args(argv)
    entry_point(args.verbose)
    try:
        summary = run(
            args.store or default_store(),
            endpoint_url=args.endpoint_url,
            epochs=1 if args.smoke_test else args.epochs,
            workers=args.workers,
            batch_size=args.batch_size,
            port=args.port,
            keep_serving=args.keep_serving,
        )
    except LeptonError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    res = summary["train_results"]  # the rest of it is in the run's folder
    shown = {k: res[k] for k in SUMMARY_KEYS if k in res}
    print(json.dumps(summary | {"train_results": shown}, indent=2))
    if args.keep_serving:
        print("serving; press Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
