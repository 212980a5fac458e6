"""examples/ run here in their smoke modes, chained so that they share the expensive parts.

The plain PyTorch example runs without Ray. The lepton_ray example trains on the session's Ray
instance, in this process. ``cli.sh`` runs as a user types it, every command attached to that same
instance (``RAY_ADDRESS``: no Ray start per command), and leaves its endpoint up (``serve
--detach``) on the session's Serve port; ``predict_http.py`` is then run against that endpoint.
``submit_job.sh`` is not run: a head of its own and two jobs would cost about a minute more, and
tests/test_jobs.py already runs the same ``ray job submit`` of the pipelines and ``lepton-ray
submit`` on a ``ray start`` head. Here its lines are checked against docs/cluster.md and against
the modules, subcommands and configs that exist.
"""

from __future__ import annotations

import difflib
import importlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.test_docs import code_blocks, command_problems

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
MARK = "# lepton_ray:"


def example(name: str) -> ModuleType:
    """Import examples/<name>.py the way ``python examples/<name>.py`` finds its neighbours."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES))
        return importlib.import_module(name)


# --- the side-by-side pair and the README's diff ----------------------------------------------
def changed_lines(old: str, new: str) -> tuple[list[str], list[str]]:
    """The lines removed from and added to ``old`` to make ``new``, stripped; blank lines and the
    module docstrings left out (each file's says what it is)."""
    old_code, new_code = (text.split('"""', 2)[2].splitlines() for text in (old, new))
    diff = list(difflib.unified_diff(old_code, new_code, lineterm="", n=0))
    minus = [d[1:].strip() for d in diff if d.startswith("-") and not d.startswith("---")]
    plus = [d[1:].strip() for d in diff if d.startswith("+") and not d.startswith("+++")]
    return [x for x in minus if x], [x for x in plus if x]


def readme_diff() -> tuple[list[str], list[str]]:
    """The - and + lines of README.md's first ```diff block, stripped."""
    block = code_blocks((ROOT / "README.md").read_text(), "diff")[0]
    lines = block.splitlines()
    return [x[1:].strip() for x in lines if x[:1] == "-"], [
        x[1:].strip() for x in lines if x[:1] == "+"
    ]


def is_import(line: str) -> bool:
    return line.startswith(("import ", "from "))


def test_changed_lines_reads_a_diff():
    old = '"""doc"""\nimport a\nx = 1\ny = 2\nz = 3\n'
    new = '"""other doc"""\nimport b\nx = 1\ny = 20\nz = 3\n'
    assert changed_lines(old, new) == (["import a", "y = 2"], ["import b", "y = 20"])


def test_readme_diff_is_the_diff_between_the_two_examples():
    """Every line the README's diff removes or adds is the same line, in the same order, in
    plain_pytorch.py -> lepton_ray_train.py; the README may leave out import lines."""
    minus, plus = changed_lines(
        (EXAMPLES / "plain_pytorch.py").read_text(), (EXAMPLES / "lepton_ray_train.py").read_text()
    )
    readme_minus, readme_plus = readme_diff()
    assert [x for x in readme_minus if not is_import(x)] == [x for x in minus if not is_import(x)]
    assert [x for x in readme_plus if not is_import(x)] == [x for x in plus if not is_import(x)]
    assert {x for x in readme_minus + readme_plus if is_import(x)} <= set(minus + plus)


def test_exactly_the_changed_lines_are_marked():
    text = (EXAMPLES / "lepton_ray_train.py").read_text()
    _, plus = changed_lines((EXAMPLES / "plain_pytorch.py").read_text(), text)
    code = text.split('"""', 2)[2]  # after the docstring, which names the mark
    marked = [line.strip() for line in code.splitlines() if MARK in line]
    assert [x for x in plus if MARK not in x and not x.startswith("from digits import")] == []
    assert marked and set(marked) <= set(plus)


def test_plain_pytorch_example_trains_and_saves_weights(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # it saves model.pt where it runs, as the README's loop does
    results = example("plain_pytorch").main(["--smoke-test"])
    assert 0 <= results["val_accuracy"] <= 1
    model = example("digits").Net()
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_the_smoke_subset_holds_every_class():
    """The digits file is sorted by class: a smoke subset must not be the first rows."""
    digits = example("digits")
    for split, rows in digits.SMOKE_ROWS.items():
        labels = digits.digits(split, rows).tensors[1]
        assert len(labels) == rows and set(labels.tolist()) == set(range(10))


# --- predict_http.py's standard-library PNG reader ---------------------------------------------
def png_with_filters(pixels: np.ndarray, filters: list[int]) -> bytes:
    """An 8-bit PNG of (H, W) or (H, W, 3) ``pixels`` whose row y is written with filter
    ``filters[y]`` (0 none, 1 sub, 2 up, 3 average, 4 paeth): Pillow chooses its own."""
    h, w = pixels.shape[:2]
    n = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.reshape(h, w * n).astype(np.int64)
    out = b""
    for y, kind in enumerate(filters):
        row = rows[y]
        left = np.concatenate([np.zeros(n, np.int64), row[:-n]])
        up = rows[y - 1] if y else np.zeros_like(row)
        upleft = np.concatenate([np.zeros(n, np.int64), up[:-n]])
        p = left + up - upleft
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        predictor = [0 * row, left, up, (left + up) // 2, paeth][kind]
        out += bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if n == 1 else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(out))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("shape", [(10, 7), (6, 5, 3)])
def test_png_pixels_reads_every_filter_as_pillow_does(shape):
    from PIL import Image

    read = example("predict_http").png_pixels
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = png_with_filters(pixels, [y % 5 for y in range(shape[0])])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)  # a valid PNG
    assert np.array_equal(np.asarray(read(data), dtype=np.uint8), pixels)
    for path in EXAMPLES.glob("images/*.png"):  # the shipped digits, as Pillow wrote them
        assert np.array_equal(np.asarray(read(path.read_bytes())), np.asarray(Image.open(path)))


def test_png_pixels_refuses_what_it_cannot_read_in_one_line():
    read = example("predict_http").png_pixels
    with pytest.raises(ValueError, match="not a PNG"):
        read(b"\xff\xd8\xff\xe0 a JPEG")
    grey16 = png_with_filters(np.zeros((2, 2), np.uint8), [0, 0]).replace(
        b"\x00\x00\x00\x02\x00\x00\x00\x02\x08", b"\x00\x00\x00\x02\x00\x00\x00\x02\x10"
    )
    with pytest.raises(ValueError, match="send it as a file"):
        read(grey16)


# --- the shell examples --------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["cli.sh", "submit_job.sh"])
def test_shell_examples_parse_and_name_commands_that_exist(script, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # pipelines/ is not installed
    path = EXAMPLES / script
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert command_problems(path, f"```bash\n{path.read_text()}```\n") == []


def test_submit_job_starts_its_head_as_docs_cluster_md_does():
    """The `ray start` and `ray job submit` lines are the ones docs/cluster.md verified."""
    script = (EXAMPLES / "submit_job.sh").read_text()
    docs = (ROOT / "docs" / "cluster.md").read_text()
    start = re.search(r"^\s*(ray start --head .*)$", script, re.MULTILINE).group(1)
    assert start in docs
    assert 'ray job submit --address "$ADDRESS" --working-dir . --' in script
    assert "ray job submit --address http://127.0.0.1:8265 --working-dir . --" in docs
    assert "RAY_AUTH_MODE" in script and "ADDRESS=http://127.0.0.1:8265" in script


# --- the chain on the session's Ray instance -----------------------------------------------------
@pytest.fixture(scope="module")
def lepton_ray_run(ray_session, tmp_path_factory):
    """examples/lepton_ray_train.py --smoke-test, its run under a store of its own."""
    store = tmp_path_factory.mktemp("examples-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEPTON_STORE", str(store))
        return example("lepton_ray_train").main(["--smoke-test"]), store


@pytest.mark.ray
def test_lepton_ray_example_trains_the_same_job_with_a_servable_checkpoint(lepton_ray_run):
    from lepton_ray import load_model

    results, store = lepton_ray_run
    # 400 digits, global batch 100: 4 steps on 2 workers, validated on 200
    assert results["epochs"] == 1 and results["history"][-1]["step"] == 4
    assert results["history"][-1]["world_size"] == 2
    assert 0 <= results["val_accuracy"] <= 1
    assert results["checkpoint"].startswith(str(store / "runs"))
    model, meta = load_model(results["checkpoint"])  # rebuilt from data: what serving does
    assert meta["model"] == {"name": "cnn", "kwargs": {"in_channels": 1, "num_classes": 10}}


@pytest.fixture(scope="module")
def cli_run(ray_session, serve_port, tmp_path_factory):
    """SMOKE=1 examples/cli.sh attached to the session's instance; its endpoint stays up."""
    import ray
    from ray import serve

    from lepton_ray import deploy  # noqa: F401  (Serve must already listen on the session's port)

    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    env = {
        **os.environ,
        "SMOKE": "1",
        "PORT": str(serve_port),
        "LEPTON_STORE": str(tmp_path_factory.mktemp("cli-store")),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    r = subprocess.run(
        ["bash", str(EXAMPLES / "cli.sh")], capture_output=True, text=True, env=env, timeout=400
    )
    yield r, f"http://127.0.0.1:{serve_port}"
    serve.delete("lepton")


def last_json(stdout: str) -> dict:
    """The last JSON object a command printed with ``indent=2`` (it starts at a line ``{``)."""
    return json.loads(stdout[stdout.rindex("\n{\n") + 1 :])


@pytest.mark.ray
def test_cli_example_prepares_trains_serves_and_predicts(cli_run):
    r, _ = cli_run
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert '"val_accuracy"' in r.stdout and "trained: " in r.stdout  # train_results, then its use
    assert re.search(r'^\{"status": ?"ok"', r.stdout, re.MULTILINE)  # curl /healthz
    assert len(last_json(r.stdout)["predictions"]) == len(list(EXAMPLES.glob("images/*.png"))) == 3


@pytest.mark.ray
def test_predict_http_example_gets_the_same_classes_as_files_json_and_base64(
    cli_run, capsys, tmp_path
):
    r, url = cli_run
    assert r.returncode == 0, r.stderr[-3000:]
    base64_classes = [p["class"] for p in last_json(r.stdout)["predictions"]]  # lepton-ray predict
    capsys.readouterr()
    results = example("predict_http").main([url])
    out = capsys.readouterr().out
    assert [Path(x["file"]).name for x in results] == ["2.png", "7.png", "9.png"]
    assert [x["class"] for x in results] == [x["json_class"] for x in results] == base64_classes
    assert out.startswith("model ") and "7.png: " in out
    assert len(example("predict_http").main([url, "--smoke-test"])) == 1
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(
        SystemExit, match=r'^HTTP 415 from .*/v1/predict: \{"error": ?"image 0 is not'
    ):
        example("predict_http").main([url, str(notes)])


# --- the GPT and the DLRM, each from data to its endpoint ----------------------------------------
def deployed_example(name: str, app: str, store: Path, monkeypatch, *args: str) -> dict:
    """examples/<name>.py --smoke-test, its data and runs under ``store``; its Serve app ``app``
    deleted afterwards."""
    from ray import serve

    monkeypatch.setenv("LEPTON_STORE", str(store))
    try:
        return example(name).main(["--smoke-test", *args])
    finally:
        serve.delete(app)


@pytest.mark.ray
def test_gpt_example_trains_deploys_and_streams_a_generation(
    ray_session, serve_port, tmp_path, capsys, monkeypatch
):
    port = ["--port", str(serve_port), "--max-new-tokens", "12"]
    out = deployed_example("gpt_generate", "gpt-example", tmp_path, monkeypatch, *port)
    printed = capsys.readouterr().out
    assert out["val_perplexity"] > 1 and out["url"].endswith("/gpt-example")
    # one event per token, then "done"; what was printed is the prompt, then the streamed text
    assert out["events"] == out["done"]["usage"]["completion_tokens"] + 1
    assert out["done"]["usage"]["completion_tokens"] <= 12
    assert f"The with statement{out['text']}\n-- " in printed


@pytest.mark.ray
def test_dlrm_example_trains_fsdp_compares_auc_deploys_and_scores_features(
    ray_session, serve_port, tmp_path, capsys, monkeypatch
):
    port = ["--port", str(serve_port)]
    out = deployed_example("dlrm_ctr", "ctr-example", tmp_path, monkeypatch, *port)
    printed = capsys.readouterr().out
    assert 0 <= out["val_auc"] <= 1 and 0.5 < out["planted_auc"] <= 1
    assert f"held-out AUC {out['val_auc']:.3f} against the planted model's" in printed
    assert out["served"].startswith(f"{tmp_path}/runs/") and "/exported/" in out["served"]
    probabilities = [p["click_probability"] for p in out["predictions"]]
    assert len(probabilities) == 4 and all(0 < p < 1 for p in probabilities)
