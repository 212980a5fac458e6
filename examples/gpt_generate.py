"""A GPT from text to a streamed answer: prepare Python's own reference text as byte tokens, train
a small GPT, deploy it, and print a continuation over HTTP token by token as it is generated.

    python examples/gpt_generate.py                        # 4 layers, 3 epochs, 2 workers
    python examples/gpt_generate.py --smoke-test           # 1 layer, 1 epoch on the first 16 KB
    python examples/gpt_generate.py --prompt "The with statement" --port 8000

The data and the run go under ``$LEPTON_STORE`` (default ``~/.lepton_ray/store``); with
``RAY_ADDRESS`` set it runs on that cluster, else on a local Ray instance, whose endpoint stops when
the script ends (serve the checkpoint it prints with ``lepton-ray serve`` to keep one). The same
stream from the command line: ``lepton-ray generate URL "prompt"`` (docs/language.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lepton_ray
from lepton_ray.serve.client import generate
from lepton_ray.storage import default_store

SMOKE_BYTES = 16_000  # the smoke run's text: the first topics of the same reference, about 16 KB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke-test", action="store_true", help="a tiny GPT on 16 KB: checks wiring")
    p.add_argument("--prompt", default="The with statement")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--port", type=int, default=8000, help="HTTP port when this starts Serve")
    return p.parse_args(argv)


def excerpt() -> str:
    """``text:FILE`` of the first topics of pydoc_data.topics, about SMOKE_BYTES of them (a file
    at the same path every run: the same source, so preparing it again does nothing)."""
    from pydoc_data.topics import topics

    text, path = "", Path(tempfile.gettempdir()) / "lepton-ray-pydoc-excerpt.txt"
    for body in topics.values():
        if len(text) >= SMOKE_BYTES:
            break
        text += body + "\n"
    path.write_text(text)
    return f"text:{path}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    store = default_store().rstrip("/")
    source = excerpt() if args.smoke_test else "pydoc-topics"
    name = "pydoc-excerpt" if args.smoke_test else "pydoc-topics"
    data = lepton_ray.prepare(source, f"{store}/datasets/{name}", block_size=64)
    size = {"n_layer": 1, "n_head": 2, "n_embd": 32} if args.smoke_test else {}
    model = lepton_ray.build_model(
        "gpt", **data["train"].model_kwargs(), **({"n_layer": 4, "n_head": 4, "n_embd": 128} | size)
    )
    trainer = lepton_ray.Trainer(1 if args.smoke_test else 2)
    results = trainer.fit(
        model,
        data["train"],
        data["test"],
        batch_size=32,  # blocks of 64 tokens: 2,048 predicted tokens a step
        epochs=1 if args.smoke_test else 3,
        optimizer="adamw",
        lr=3e-3,
        schedule="cosine",
        progress_bar=False,
    )
    print(
        f"held-out perplexity {results['val_perplexity']:.2f} "
        f"(loss {results['val_loss']:.3f} nats), weights in {results['checkpoint']}"
    )

    # One endpoint for the checkpoint; /v1/generate streams Server-Sent Events, one per token.
    url = lepton_ray.deploy(
        results["checkpoint"], port=args.port, name="gpt-example", route_prefix="/gpt-example"
    )
    print(f"serving at {url}\n{args.prompt}", end="", flush=True)
    pieces, done = [], {}
    for event, payload in generate(
        url, args.prompt, max_new_tokens=args.max_new_tokens, temperature=0.8, seed=1
    ):
        print(payload.get("text", ""), end="", flush=True)  # each token as it arrives
        pieces.append(payload.get("text", ""))
        if event == "done":
            done = payload
    usage = done.get("usage", {})
    print(f"\n-- {usage.get('completion_tokens')} tokens ({done.get('finish_reason')})")
    return {
        "checkpoint": results["checkpoint"],
        "val_perplexity": results["val_perplexity"],
        "url": url,
        "events": len(pieces),
        "text": "".join(pieces),
        "done": done,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
