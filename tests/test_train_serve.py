"""Ray tier: real Ray Train runs (2 CPU workers, gloo) and a real Serve endpoint, kept small.

One small training run is shared by the API, checkpoint and serving tests of this module.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

from lepton_ray import Trainer, build_model, load_model
from lepton_ray.data import load_mnist5k, prepare
from lepton_ray.errors import ConfigError, DataError
from tests.conftest import free_port

pytestmark = pytest.mark.ray


class DigitsTensorDataset(torch.utils.data.Dataset):
    """A torch Dataset of (CHW float tensor in [0, 1], label), like torchvision's ToTensor output."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 255.0, int(
            self.labels[i]
        )


@pytest.fixture(scope="module")
def small_run(ray_session, tmp_path_factory):
    """Two epochs on 1,000 digits from a torch Dataset, with validation: the shared training run."""
    root = tmp_path_factory.mktemp("small-run")
    splits = load_mnist5k()
    x, y, _ = splits["train"]
    sel = np.random.default_rng(0).permutation(len(x))[:1000]
    train = DigitsTensorDataset(x[sel], y[sel])
    vx, vy, _ = splits["test"]
    val = DigitsTensorDataset(vx[:300], vy[:300])
    trainer = Trainer(2, storage=str(root / "runs"))
    model = build_model("cnn", in_channels=1, num_classes=10, width=16)
    trainer.fit(model, train, val, batch_size=50, epochs=2, lr=0.05)
    return trainer, root


def test_fit_returns_the_results_users_expect(small_run):
    trainer, root = small_run
    r = trainer.train_results
    for key in (
        "train_loss",
        "train_accuracy",
        "epochs",
        "samples_per_second",
        "checkpoint",
        "val_loss",
        "val_accuracy",
    ):
        assert key in r, key
    assert r["epochs"] == 2
    assert math.isfinite(r["train_loss"]) and 0 < r["train_loss"] < 2.5
    assert r["val_accuracy"] > 0.3  # two short epochs: well above chance (0.1)
    assert r["samples_per_second"] > 0
    assert (
        r["data_skipped_rows"] == 0
    )  # rows left out by `prepare --skip-bad` are reported with the run
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert all(h["world_size"] == 2 for h in r["history"])
    # each epoch says how long the worker's garbage collector held the GIL (train/gc_clock.py)
    assert all(h["gc_s"] >= 0 and h["gc_full"] >= 0 for h in r["history"])
    # and the CPU the training loop's thread used: some, and at most one core over the epoch
    assert all(0 < h["loop_cpu_s"] <= h["epoch_time_s"] + 0.02 for h in r["history"])
    # its wait for a CPU, within the epoch with its CPU, and how often it blocked (thread_clock.py)
    for h in r["history"]:
        assert 0 <= h["loop_runqueue_s"] <= h["epoch_time_s"] - h["loop_cpu_s"] + 0.02, h
        assert h["loop_sleeps"] > 0 and h["loop_preemptions"] >= 0, h
    # 1000 rows, global batch 50, 2 workers -> 20 steps per epoch, whatever the world size
    assert r["history"][-1]["step"] == 40
    assert r["checkpoint"].startswith(str(root))
    # the best epoch on val_loss is kept apart from Ray's rolling retention, behind best.json
    assert r["best"]["metric"] == "val_loss" and r["best"]["epoch"] in (1, 2)
    # metrics saved with the run: JSONL per epoch, TensorBoard events, the curves as SVG
    run = Path(r["run"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2] and lines[-1]["val_accuracy"] == r["val_accuracy"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    curves = ElementTree.fromstring((run / "curves.svg").read_text())
    assert len(curves.findall(".//{http://www.w3.org/2000/svg}polyline")) == 4  # 2 panels x 2
    model, meta = load_model(r["best_checkpoint"])
    assert (
        meta["epoch"] == r["best"]["epoch"]
        and r["stopped_early"] is False
        and r["world_size_changes"] == []
    )


def test_checkpoint_is_pickle_free_and_reloads(small_run):
    trainer, _ = small_run
    model, meta = load_model(trainer.train_results["checkpoint"])
    assert meta["model"] == {
        "name": "cnn",
        "kwargs": {"in_channels": 1, "num_classes": 10, "width": 16},
    }
    assert meta["data"]["classes"] == [str(i) for i in range(10)]
    # a convnet trains and serves in channels-last memory (oneDNN's fast layout on CPUs as on GPUs)
    assert meta["memory_format"] == "channels_last"
    assert model.features[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0] or meta["versions"]["torch"]
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(
        meta
    ) and "lepton-test-secret" not in json.dumps(meta)
    out = model(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_trainer_accepts_a_ray_dataset_and_a_positional_worker_count(ray_session, tmp_path):
    import ray.data

    x, y, _ = load_mnist5k()["train"]
    rows = [{"image": x[i], "label": int(y[i])} for i in range(0, 4000, 10)]
    # 4 blocks: Ray's default for 400 items is 200 two-row blocks, whose shuffle takes ~20 s here.
    ds = ray.data.from_items(rows, override_num_blocks=4)
    trainer = Trainer(1, storage=str(tmp_path))
    res = trainer.fit(
        build_model("cnn", in_channels=1, num_classes=10, width=8), ds, batch_size=40, epochs=1
    )
    assert res["epochs"] == 1 and res["history"][0]["step"] == 10 and "val_accuracy" not in res


@pytest.mark.parametrize(
    ("trainer", "match"),
    [
        (
            lambda: Trainer(2, use_gpu=True),
            "cannot place 2 training workers of {1 CPU, 1 GPU}: the cluster has 0 GPU",
        ),
        (lambda: Trainer(1, resources_per_worker={"CPU": 1, "tpu_v9": 1}), "0 tpu_v9 in all"),
        (lambda: Trainer(2, placement_strategy="STRICT_SPREAD"), "STRICT_SPREAD: only 1 node"),
        (
            lambda: Trainer((3, 9), resources_per_worker={"CPU": 2}),
            "the cluster has 4 CPU in all, 6 needed",
        ),
        # Placeable, but then Ray Data has no CPU left to feed them: refused, not a silent wait.
        (lambda: Trainer(4), "take 4 of the cluster's 4 CPUs and Ray Data needs 1 more"),
    ],
)
def test_impossible_placement_fails_fast_naming_what_is_missing(
    ray_session, tmp_path, trainer, match
):
    info = prepare("mnist5k", str(tmp_path / "d"))["test"]
    with pytest.raises(
        ConfigError, match=re.escape(match)
    ):  # raised before Ray Train starts waiting
        trainer().fit(build_model("cnn", in_channels=1), info, storage=str(tmp_path), epochs=1)


def test_model_output_must_match_the_classes(ray_session, tmp_path):
    info = prepare("mnist5k", str(tmp_path / "d"))["test"]
    with pytest.raises(
        DataError, match="outputs \\(7,\\) per image but the dataset has 10 classes"
    ):
        Trainer(2, storage=str(tmp_path)).fit(
            build_model("cnn", in_channels=1, num_classes=7), info.uri
        )


def test_s3_errors_name_the_problem(ray_session, s3_server, s3_bucket, tmp_path):
    from lepton_ray.errors import StorageError

    model = build_model("cnn", in_channels=1)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        Trainer(2, storage=str(tmp_path)).fit(
            model, "s3://no-such-bucket-x/data", endpoint_url=s3_server
        )
    with pytest.raises(DataError, match=f"no prepared dataset at s3://{s3_bucket}/missing"):
        Trainer(2, storage=str(tmp_path)).fit(
            model, f"s3://{s3_bucket}/missing", endpoint_url=s3_server
        )
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        Trainer(2, storage=str(tmp_path)).fit(model, f"s3://{s3_bucket}/data", endpoint_url=dead)


# --- serving the small run's checkpoint ------------------------------------------------------
@pytest.fixture(scope="module")
def endpoint(small_run, serve_port):
    from ray import serve

    from lepton_ray import deploy

    url = deploy(
        small_run[0].train_results["checkpoint"],
        port=serve_port,
        name="test-small",
        route_prefix="/small",
        max_request_bytes=200_000,
        max_replicas=1,
    )
    yield url
    serve.delete("test-small")


def _post(url: str, body: bytes, ctype: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "/v1/predict", data=body, method="POST", headers={"Content-Type": ctype}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_endpoint_answers_and_describes_itself(endpoint, small_run, tmp_path):
    x, _, _ = load_mnist5k()["test"]
    status, body = _post(endpoint, json.dumps({"instances": x[:3, :, :, 0].tolist()}).encode())
    assert status == 200 and len(body["predictions"]) == 3
    p = body["predictions"][0]
    assert p["class"] in [str(i) for i in range(10)] and len(p["top_k"]) == 3
    assert abs(sum(t["probability"] for t in p["top_k"])) <= 1.0 + 1e-6
    with urllib.request.urlopen(endpoint + "/v1/model") as r:
        info = json.loads(r.read())
    assert info["input_shape"] == [28, 28, 1] and info["model_version"] == body["model_version"]
    with urllib.request.urlopen(endpoint + "/healthz") as r:
        assert json.loads(r.read())["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "ctype", "status", "match"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b'{"instances": []}', "application/json", 400, "empty"),
        (json.dumps({"instances": [[1, 2, 3]]}).encode(), "application/json", 422, "shape"),
        (
            json.dumps({"instances": [[[float("nan")] * 28] * 28]}).encode(),
            "application/json",
            422,
            "NaN",
        ),
        (
            json.dumps({"instances": [[["a"] * 28] * 28]}).encode(),
            "application/json",
            422,
            "numeric",
        ),
        (
            json.dumps({"images": ["aGVsbG8="]}).encode(),
            "application/json",
            415,
            "not a readable PNG",
        ),
        (b"\x89PNG not really", "image/png", 415, "not a readable PNG"),
        (
            json.dumps({"instances": [[[0] * 784]] * 100}).encode(),
            "application/json",
            413,
            "exceeds",
        ),
    ],
)
def test_bad_requests_get_a_4xx_json_error_and_do_not_poison_the_replica(
    endpoint, body, ctype, status, match
):
    got, answer = _post(endpoint, body, ctype)
    assert got == status and match in answer["error"], answer
    x, _, _ = load_mnist5k()["test"]
    ok, good = _post(endpoint, json.dumps({"instances": x[:1, :, :, 0].tolist()}).encode())
    assert ok == 200 and len(good["predictions"]) == 1


def test_png_upload_matches_the_array_answer(endpoint):
    import io

    from PIL import Image

    x, _, _ = load_mnist5k()["test"]
    buf = io.BytesIO()
    Image.fromarray(x[5, :, :, 0]).save(buf, format="PNG")
    s1, by_png = _post(endpoint, buf.getvalue(), "image/png")
    s2, by_array = _post(endpoint, json.dumps({"instances": x[5:6, :, :, 0].tolist()}).encode())
    assert s1 == s2 == 200
    assert by_png["predictions"][0]["top_k"] == by_array["predictions"][0]["top_k"]
