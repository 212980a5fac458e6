"""Checkpoints: write, publish, verify and load back, locally and on S3; model specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from torch import nn

from lepton_ray import checkpoint, storage
from lepton_ray.checkpoint import (
    CheckpointError,
    load_model,
    load_train_state,
    publish,
    verify,
    write_local,
)
from lepton_ray.errors import ConfigError, LeptonError
from lepton_ray.models import (
    ConvNet,
    build_model,
    from_spec,
    preferred_memory_format,
    spec_of,
    unwrap,
)
from lepton_ray.serve.codec import InputSpec, to_model_input


class TinyNet(nn.Module):
    """A user's own module: rebuilt from its import path."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, hidden), nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Wrapped(nn.Module):
    """Like DDP, keeps the real model as ``.module`` (so its state dict keys start with ``module.``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def _trained_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, width=8)
    # Move BatchNorm statistics away from their defaults, so that buffers are checked too.
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 12, 12))
    return model.eval()


def _meta(model: nn.Module) -> dict:
    return {
        "model": spec_of(model),
        "data": {"shape": [12, 12, 1]},
        "metrics": {"val_accuracy": 0.5},
    }


def _checkpoint(tmp_path, model: nn.Module, dest=None, train_state=None) -> storage.Location:
    local = write_local(tmp_path / "local", model, _meta(unwrap(model)), train_state)
    return publish(local, storage.resolve(dest or tmp_path / "published"))


def test_round_trip_local(tmp_path):
    model = _trained_cnn()
    loc = _checkpoint(tmp_path, model)
    assert sorted(loc.listdir()) == sorted(
        [checkpoint.WEIGHTS, checkpoint.META, checkpoint.MANIFEST]
    )
    manifest = loc.join(checkpoint.MANIFEST).read_json()
    assert set(manifest["files"]) == {checkpoint.WEIGHTS, checkpoint.META}

    files = verify(loc)
    assert set(files) == {checkpoint.WEIGHTS, checkpoint.META}
    assert all(not k.startswith("module.") for k in st_load(files[checkpoint.WEIGHTS]))

    loaded, meta = load_model(loc.uri)
    assert isinstance(loaded, ConvNet) and not loaded.training
    assert meta["model"] == {
        "name": "cnn",
        "kwargs": {"in_channels": 1, "num_classes": 10, "width": 8},
    }
    assert meta["metrics"] == {"val_accuracy": 0.5}
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (k1, v1), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)


def test_round_trip_with_train_state(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "epoch": 3}
    loc = _checkpoint(tmp_path, model, train_state=state)
    assert checkpoint.STATE in loc.join(checkpoint.MANIFEST).read_json()["files"]

    weights, got, meta = load_train_state(loc)
    assert got["epoch"] == 3 and torch.equal(got["torch_rng"], state["torch_rng"])
    fresh = TinyNet()
    fresh.load_state_dict(weights)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(got["optimizer"])
    buf1 = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], buf1)
    assert meta["model"] == spec_of(model)


def test_round_trip_on_s3(tmp_path, s3_server, s3_bucket):
    model = _trained_cnn()
    dest = storage.resolve(f"s3://{s3_bucket}/runs/r1/checkpoint_0001", s3_server)
    loc = _checkpoint(tmp_path, model, dest=dest)
    loaded, _ = load_model(loc.uri, endpoint_url=s3_server)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_corrupted_file(tmp_path):
    loc = _checkpoint(tmp_path, _trained_cnn())
    path = tmp_path / "published" / checkpoint.WEIGHTS
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_model(loc.uri)
    assert checkpoint.WEIGHTS in str(info.value) and loc.uri in str(info.value)


def test_corrupted_metadata(tmp_path):
    loc = _checkpoint(tmp_path, _trained_cnn())
    meta_path = tmp_path / "published" / checkpoint.META
    meta = json.loads(meta_path.read_text())
    meta["model"]["kwargs"]["width"] = 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"corrupt: {checkpoint.META}"):
        verify(loc)


def test_missing_manifest(tmp_path):
    local = write_local(tmp_path / "local", _trained_cnn(), _meta(_trained_cnn()))
    with pytest.raises(CheckpointError, match="no complete checkpoint") as info:
        load_model(str(local))  # written but never published: no manifest
    assert str(local.resolve()) in str(info.value)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(str(tmp_path / "nowhere"))


def test_missing_manifest_on_s3(tmp_path, s3_server, s3_bucket):
    with pytest.raises(CheckpointError, match=f"no complete checkpoint at s3://{s3_bucket}/ckpt"):
        load_model(f"s3://{s3_bucket}/ckpt", endpoint_url=s3_server)


def test_file_listed_but_missing(tmp_path):
    loc = _checkpoint(tmp_path, _trained_cnn())
    (tmp_path / "published" / checkpoint.WEIGHTS).unlink()
    with pytest.raises(LeptonError, match=checkpoint.WEIGHTS):
        load_model(loc.uri)


def test_module_prefixed_weights_still_load(tmp_path):
    torch.manual_seed(1)
    inner = TinyNet(hidden=5)
    wrapped = Wrapped(inner)
    spec = {"class": f"{__name__}:TinyNet", "kwargs": {"hidden": 5}}
    local = write_local(tmp_path / "local", wrapped, {"model": spec})
    keys = st_load((local / checkpoint.WEIGHTS).read_bytes()).keys()
    assert keys and all(k.startswith("module.") for k in keys)
    loc = publish(local, storage.resolve(tmp_path / "published"))
    loaded, _ = load_model(loc, trusted_modules=[__name__])
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), inner(x))


def test_publish_writes_the_manifest_last(tmp_path, monkeypatch):
    local = write_local(tmp_path / "local", TinyNet(), {"model": spec_of(TinyNet())})
    order = []
    real = storage.Location.write_bytes

    def spy(self, data):
        order.append(self.path.rsplit("/", 1)[-1])
        return real(self, data)

    monkeypatch.setattr(storage.Location, "write_bytes", spy)
    publish(local, storage.resolve(tmp_path / "published"))
    assert order[-1] == checkpoint.MANIFEST and sorted(order[:-1]) == sorted(
        [checkpoint.WEIGHTS, checkpoint.META]
    )


# --- model specs -----------------------------------------------------------------------------
def test_spec_of_registered_models():
    cnn = build_model("cnn", in_channels=3, num_classes=4, width=4)
    spec = spec_of(cnn)
    assert spec == {"name": "cnn", "kwargs": {"in_channels": 3, "num_classes": 4, "width": 4}}
    rebuilt = from_spec(spec)
    assert isinstance(rebuilt, ConvNet) and spec_of(rebuilt) == spec
    assert rebuilt.head[-1].out_features == 4 and rebuilt.features[0][0].in_channels == 3
    assert [v.shape for v in rebuilt.state_dict().values()] == [
        v.shape for v in cnn.state_dict().values()
    ]

    resnet = build_model("resnet18", in_channels=1, num_classes=7)
    rebuilt = from_spec(spec_of(resnet))
    assert rebuilt.conv1.in_channels == 1 and rebuilt.fc.out_features == 7
    assert isinstance(rebuilt.maxpool, nn.Identity)


def test_spec_of_user_models():
    spec = spec_of(TinyNet())
    assert spec == {"class": f"{__name__}:TinyNet", "kwargs": {}}
    assert isinstance(from_spec(spec, trusted_modules=[__name__]), TinyNet)
    nine = {"class": f"{__name__}:TinyNet", "kwargs": {"hidden": 9}}
    assert from_spec(nine, trusted_modules=[__name__]).fc1.out_features == 9
    with pytest.raises(CheckpointError, match=f"module '{__name__}' is not trusted"):
        from_spec(spec)  # a user's class needs the operator's word


def test_spec_errors():
    with pytest.raises(ConfigError, match="unknown model 'vgg99'"):
        build_model("vgg99")
    with pytest.raises(ConfigError, match="unknown model"):
        from_spec({"name": "vgg99"})
    with pytest.raises(CheckpointError, match="cannot import model class 'no_such_module:Net'"):
        from_spec({"class": "no_such_module:Net"}, trusted_modules=["no_such_module"])
    with pytest.raises(CheckpointError, match="cannot import model class"):
        from_spec({"class": f"{__name__}:Missing"}, trusted_modules=[__name__])


class FlattensFeatureMaps(nn.Module):
    """A classic LeNet-style head: ``.view()`` on conv features, which channels-last memory refuses."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.size(0), -1))


def test_memory_format_choice():
    assert (
        preferred_memory_format(
            build_model("cnn", in_channels=3, num_classes=10, width=4), (8, 8, 3)
        )
        == "channels_last"
    )
    with pytest.warns(
        UserWarning,
        match="FlattensFeatureMaps trains in NCHW memory: its forward fails on channels-last",
    ):
        assert preferred_memory_format(FlattensFeatureMaps(), (8, 8, 3)) == "contiguous"
    assert (
        preferred_memory_format(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)), (8, 8, 3))
        == "contiguous"
    )
    model = build_model("cnn", in_channels=3, num_classes=10, width=4)
    preferred_memory_format(model, (8, 8, 3))  # probes a copy: the user's model keeps its layout
    assert model.features[1][0].weight.is_contiguous()


def test_channels_last_checkpoint_serves_the_same_answers(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=3, num_classes=10, width=8).eval()
    data = {
        "shape": [8, 8, 3],
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
        "classes": list("abcdefghij"),
    }
    meta = {"model": spec_of(model), "data": data, "memory_format": "channels_last"}
    loc = publish(
        write_local(tmp_path / "local", model, meta), storage.resolve(tmp_path / "published")
    )
    loaded, meta = load_model(loc.uri)
    assert loaded.features[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8).numpy()
    x = torch.from_numpy(to_model_input(images, InputSpec.from_meta(meta)))
    assert x.is_contiguous(memory_format=torch.channels_last)  # the NHWC request array itself
    plain = torch.from_numpy(to_model_input(images, InputSpec.from_meta({"data": data})))
    assert plain.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(plain), rtol=1e-4, atol=1e-4)


def test_padded_batches_give_the_answers_of_exact_ones(tmp_path):
    """GPU replicas pad each batch to one of a few sizes (cuDNN plans per shape); the padding
    must not change any answer, and the model must only ever see those sizes."""
    from lepton_ray.serve import ServeConfig
    from lepton_ray.serve.runner import ModelRunner, batch_buckets

    torch.manual_seed(0)
    model = build_model("cnn", in_channels=3, num_classes=10, width=8).eval()
    data = {"shape": [8, 8, 3], "mean": [0.5] * 3, "std": [0.25] * 3, "classes": list("abcdefghij")}
    meta = {"model": spec_of(model), "data": data, "memory_format": "channels_last"}
    loc = publish(
        write_local(tmp_path / "local", model, meta), storage.resolve(tmp_path / "published")
    )
    runner = ModelRunner(ServeConfig(checkpoint=loc.uri, max_batch_size=16, top_k=10))
    assert runner.batch_sizes is None  # on a CPU: exact sizes
    seen = []
    runner.model.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    rng = np.random.default_rng(0)
    requests = [rng.integers(0, 256, (k, 8, 8, 3), dtype=np.uint8) for k in (1, 2, 6, 3)]
    exact = runner.predict_many(requests)
    runner.batch_sizes = batch_buckets(16)
    assert runner.batch_sizes == (1, 2, 4, 8, 16)
    padded = [
        runner.predict_many(requests),
        runner.predict_many(requests[:2]),
        runner.predict_many(requests * 2),
    ]
    assert seen == [12, 16, 4, 32]  # 12 images exact; then 12 -> 16, 3 -> 4, 24 -> 32 (2 x 16)
    for got, want in ((padded[0], exact), (padded[1], exact[:2]), (padded[2], exact * 2)):
        got, want = [a for r in got for a in r], [a for r in want for a in r]
        assert [a["class"] for a in got] == [a["class"] for a in want]
        for a, b in zip(got, want, strict=True):  # other kernels for other shapes: float noise
            assert [t["class"] for t in a["top_k"]] == [t["class"] for t in b["top_k"]]
            probs = [t["probability"] for t in a["top_k"]]
            assert probs == pytest.approx([t["probability"] for t in b["top_k"]], abs=1e-5)


def test_replicas_compute_in_bfloat16_where_asked(tmp_path):
    """``precision``: auto is float32 on a CPU (bfloat16 on a GPU); bfloat16 casts the weights once
    and the inputs per batch, and the answers still leave as float32 probabilities."""
    from lepton_ray.serve import ServeConfig
    from lepton_ray.serve.runner import ModelRunner, compute_dtype

    assert compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=3, num_classes=10, width=8).eval()
    data = {"shape": [8, 8, 3], "mean": [0.5] * 3, "std": [0.25] * 3, "classes": list("abcdefghij")}
    meta = {"model": spec_of(model), "data": data, "memory_format": "channels_last"}
    uri = publish(
        write_local(tmp_path / "local", model, meta), storage.resolve(tmp_path / "published")
    ).uri
    images = [np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)]
    full, half = (
        ModelRunner(ServeConfig(checkpoint=uri, precision=p)) for p in ("auto", "bfloat16")
    )
    assert next(full.model.parameters()).dtype == torch.float32
    assert next(half.model.parameters()).dtype == torch.bfloat16
    want, got = full.predict_many(images)[0], half.predict_many(images)[0]
    for a, b in zip(got, want, strict=True):
        assert isinstance(a["top_k"][0]["probability"], float)
        assert a["top_k"][0]["probability"] == pytest.approx(b["top_k"][0]["probability"], abs=0.02)


def test_unwrap():
    inner = TinyNet()
    compiled_like = nn.Module()
    compiled_like._orig_mod = inner
    assert unwrap(compiled_like) is inner
    assert unwrap(inner) is inner


def test_real_ddp_model_is_saved_unwrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        inner = TinyNet()
        ddp = nn.parallel.DistributedDataParallel(inner)
        assert all(k.startswith("module.") for k in ddp.state_dict())
        assert unwrap(ddp) is inner
        local = write_local(tmp_path / "local", ddp, {"model": spec_of(inner)})
    finally:
        dist.destroy_process_group()
    assert not any(
        k.startswith("module.") for k in st_load((local / checkpoint.WEIGHTS).read_bytes())
    )
    loaded, _ = load_model(
        publish(local, storage.resolve(tmp_path / "published")), trusted_modules=[__name__]
    )
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), inner(x))


def test_a_replica_reads_its_checkpoint_once(tmp_path, monkeypatch):
    """ModelRunner loads manifest, metadata and weights once each, and knows the version."""
    import hashlib

    from lepton_ray.serve import ServeConfig
    from lepton_ray.serve.runner import ModelRunner

    model = build_model("cnn", in_channels=1, num_classes=10, width=4)
    meta = {
        "model": spec_of(model),
        "data": {"shape": [8, 8, 1], "mean": [0.5], "std": [0.25], "classes": list("0123456789")},
    }
    loc = publish(
        write_local(tmp_path / "local", model, meta), storage.resolve(tmp_path / "published")
    )
    read = []
    real = storage.Location.read_bytes
    monkeypatch.setattr(
        storage.Location, "read_bytes", lambda self: read.append(self.name) or real(self)
    )
    runner = ModelRunner(ServeConfig(checkpoint=loc.uri))
    assert sorted(read) == sorted([checkpoint.MANIFEST, checkpoint.META, checkpoint.WEIGHTS])
    weights = (tmp_path / "published" / checkpoint.WEIGHTS).read_bytes()
    assert runner.version == hashlib.sha256(weights).hexdigest()[:12]
    assert runner.info()["model_version"] == runner.version
