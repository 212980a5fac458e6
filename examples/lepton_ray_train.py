"""The digits job of plain_pytorch.py with lepton_ray: data-parallel on Ray, checkpointed.

    python examples/lepton_ray_train.py                 # 10 epochs, 2 workers, local Ray
    python examples/lepton_ray_train.py --smoke-test    # 1 epoch on 400 digits

Every line that differs from plain_pytorch.py is marked ``# lepton_ray:``; README.md's diff shows
them (a test checks that it still does). The run and its checkpoints go under
``$LEPTON_STORE/runs`` (default ``~/.lepton_ray/store``); with ``RAY_ADDRESS`` set it runs on
that cluster instead of a local Ray instance.
"""

from __future__ import annotations

import sys

from digits import Net, digits, parse_args

import lepton_ray  # lepton_ray: instead of torch, F and DataLoader


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.split("\n\n")[0])
    dataset, val = digits("train", args.rows["train"]), digits("test", args.rows["test"])
    trainer = lepton_ray.Trainer(num_workers=2)  # lepton_ray: or (min, max) for elastic, or "auto"
    trainer.fit(Net(), dataset, val, batch_size=100, epochs=args.epochs)  # lepton_ray: global batch
    results = trainer.train_results  # lepton_ray: metrics, history, the checkpoint's URI
    print(f"val_accuracy {results['val_accuracy']:.4f}, weights in {results['checkpoint']}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
