"""The digits job in plain PyTorch: one process, a DataLoader, a hand-written loop.

    python examples/plain_pytorch.py                 # 10 epochs on the 4,000 training digits
    python examples/plain_pytorch.py --smoke-test    # 1 epoch on 400 digits

lepton_ray_train.py is the same job with lepton_ray; README.md's diff shows every line that
differs (a test checks that it still does).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from digits import Net, accuracy, digits, parse_args
from torch.utils.data import DataLoader


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.split("\n\n")[0])
    dataset, val = digits("train", args.rows["train"]), digits("test", args.rows["test"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Net().to(device)
    loader = DataLoader(dataset, batch_size=100, shuffle=True, num_workers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(args.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
    torch.save(model.state_dict(), "model.pt")
    results = {"val_accuracy": accuracy(model, val, device), "checkpoint": "model.pt"}
    print(f"val_accuracy {results['val_accuracy']:.4f}, weights in {results['checkpoint']}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
