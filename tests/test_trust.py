"""A checkpoint can never run code: its spec builds only registered architectures, or nn.Module
classes from modules the operator trusts, with JSON kwargs; everything else is refused in one
line before anything is imported (issue 19, item 1)."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

from lepton_ray import checkpoint, models, storage
from lepton_ray.checkpoint import load_checkpoint, load_model, publish, write_local
from lepton_ray.errors import CheckpointError, ConfigError
from lepton_ray.models import build_model, from_spec, spec_of
from lepton_ray.trust import TRUSTED_ENV, check_spec, trusted_modules


@pytest.fixture
def make_module(tmp_path, monkeypatch):
    """Write a fresh, uniquely named module (or package) on sys.path; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(body: str, package: str | None = None) -> str:
        name = f"lepton_probe_{uuid.uuid4().hex[:10]}"
        folder = tmp_path
        if package:
            folder = tmp_path / package
            folder.mkdir(exist_ok=True)
            (folder / "__init__.py").touch()
        (folder / f"{name}.py").write_text(textwrap.dedent(body))
        full = f"{package}.{name}" if package else name
        made.append(full)
        return full

    yield make
    for name in made:
        sys.modules.pop(name, None)


def _publish(tmp_path, spec: dict, model: torch.nn.Module | None = None) -> storage.Location:
    """A complete checkpoint (valid manifest and checksums) whose lepton.json holds ``spec``:
    what an attacker who can write to the store can make."""
    model = model or build_model("cnn", in_channels=1, num_classes=2, width=4)
    local = write_local(tmp_path / f"local-{uuid.uuid4().hex[:6]}", model, {"model": spec})
    return publish(local, storage.resolve(tmp_path / f"ckpt-{uuid.uuid4().hex[:6]}"))


def test_os_system_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    loc = _publish(tmp_path, {"class": "os:system", "kwargs": {"command": f"touch {marker}"}})
    with pytest.raises(CheckpointError, match="^refusing model class 'os:system': module 'os' is "):
        load_model(loc.uri)
    # Even an operator who trusts "os" gets no call: os.system is not an nn.Module class.
    with pytest.raises(CheckpointError, match="'os:system': it is not an nn.Module subclass"):
        load_model(loc.uri, trusted_modules=["os"])
    assert not marker.exists()


def test_the_spec_is_refused_before_the_weights_are_read(tmp_path, monkeypatch):
    loc = _publish(tmp_path, {"class": "builtins:eval", "kwargs": {}})
    read = []
    real = storage.Location.read_bytes
    monkeypatch.setattr(
        storage.Location, "read_bytes", lambda self: read.append(self.name) or real(self)
    )
    with pytest.raises(CheckpointError, match="'builtins:eval': module 'builtins' is not trusted"):
        load_checkpoint(loc)
    assert read == [checkpoint.MANIFEST, checkpoint.META]


@pytest.mark.parametrize(
    "spec_of_module, error",
    [
        # untrusted module: refused, never imported
        (lambda m: {"class": f"{m}:Net"}, "is not trusted"),
        # a walk through attributes to reach a function's globals: refused by its form
        (lambda m: {"class": f"{m}:Net.__init__.__globals__"}, "public names only"),
        (lambda m: {"class": f"{m}:_Private"}, "public names only"),
        (lambda m: {"class": f"{m}"}, "not of the form"),
        (lambda m: {"class": f"{m}:Net; import os"}, "not of the form"),
        # kwargs that are not JSON scalars or lists of them
        (lambda m: {"class": f"{m}:Net", "kwargs": {"cfg": {"nested": 1}}}, "got dict"),
        (lambda m: {"class": f"{m}:Net", "kwargs": {"layers": [1, {"x": 2}]}}, "got list"),
        (lambda m: {"class": f"{m}:Net", "kwargs": {"__class__": 1}}, "not a public identifier"),
        (lambda m: {"class": f"{m}:Net", "kwargs": [1, 2]}, "kwargs must be a JSON object"),
        (lambda m: {"class": f"{m}:Net", "name": "cnn"}, "exactly one of"),
        (lambda m: {"class": f"{m}:Net", "init": "x"}, "exactly one of"),
    ],
)
def test_bad_specs_are_refused_before_import(spec_of_module, error, make_module, tmp_path):
    marker = tmp_path / "imported"
    module = make_module(
        f"""
        import pathlib
        from torch import nn
        pathlib.Path({str(marker)!r}).touch()  # an import-time side effect

        class Net(nn.Module):
            def __init__(self, **kwargs):
                super().__init__()
        """
    )
    spec = spec_of_module(module)
    # Trusting the module everywhere except the first case, so the other checks are what refuses.
    trusted = [] if error == "is not trusted" else [module]
    with pytest.raises(CheckpointError, match=error) as info:
        from_spec(spec, trusted_modules=trusted)
    assert "\n" not in str(info.value)
    assert module not in sys.modules and not marker.exists()
    loc = _publish(tmp_path, spec)
    with pytest.raises(CheckpointError, match=error):
        load_model(loc.uri, trusted_modules=trusted)
    assert module not in sys.modules and not marker.exists()


def test_a_non_module_class_in_a_trusted_module_is_not_called(make_module, tmp_path):
    marker = tmp_path / "called"
    module = make_module(
        f"""
        import pathlib

        class Tool:
            def __init__(self):
                pathlib.Path({str(marker)!r}).touch()
        """
    )
    with pytest.raises(CheckpointError, match=f"'{module}:Tool': it is not an nn.Module subclass"):
        from_spec({"class": f"{module}:Tool", "kwargs": {}}, trusted_modules=[module])
    assert not marker.exists()


NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden: int = 5, sizes: list | None = None, act: str = "relu"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, hidden), nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
"""


@pytest.mark.parametrize("how", ["argument", "prefix", "environment"])
def test_a_trusted_user_module_loads(how, make_module, tmp_path, monkeypatch):
    package = f"userpkg_{uuid.uuid4().hex[:6]}"
    module = make_module(NET, package=package if how == "prefix" else None)
    net_cls = importlib.import_module(module).Net
    torch.manual_seed(0)
    model = net_cls(hidden=7)
    spec = {"class": spec_of(model)["class"], "kwargs": {"hidden": 7, "sizes": [1, 2], "act": "x"}}
    assert spec["class"] == f"{module}:Net"
    loc = _publish(tmp_path, spec, model)
    trusted: list[str] = []
    if how == "argument":
        trusted = [module]
    elif how == "prefix":
        trusted = [package]  # a package trusts its submodules
    else:
        monkeypatch.setenv(TRUSTED_ENV, f"somewhere.else, {module}")
    loaded = load_checkpoint(loc.uri, trusted_modules=trusted)
    assert isinstance(loaded, checkpoint.Loaded) and isinstance(loaded.model, net_cls)
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    # ... and not when the operator has not said so
    monkeypatch.delenv(TRUSTED_ENV, raising=False)
    with pytest.raises(CheckpointError, match="is not trusted"):
        load_model(loc.uri)


def test_a_prefix_is_a_dotted_prefix_not_a_string_prefix():
    with pytest.raises(CheckpointError, match="module 'mypkgevil.nets' is not trusted"):
        check_spec({"class": "mypkgevil.nets:Net"}, ["mypkg"])
    assert check_spec({"class": "mypkg.nets:Net"}, ["mypkg"]) == ("mypkg.nets", "Net")
    assert check_spec({"class": "mypkg:Net"}, ["mypkg"]) == ("mypkg", "Net")


def test_trusted_modules_sources_and_validation(monkeypatch):
    monkeypatch.setenv(TRUSTED_ENV, "a.b, c ,,")
    assert trusted_modules(["x"]) == ("x", "a.b", "c", "lepton_ray.models")
    assert trusted_modules("y,z") == ("y", "z", "a.b", "c", "lepton_ray.models")
    monkeypatch.delenv(TRUSTED_ENV)
    assert trusted_modules() == ("lepton_ray.models",)  # nothing of the user's by default
    with pytest.raises(CheckpointError, match="trusted module 'a/b' is not a dotted module name"):
        trusted_modules(["a/b"])


def test_registered_names_load_and_unknown_names_are_config_errors(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=3, width=4).eval()
    loaded = load_checkpoint(_publish(tmp_path, spec_of(model), model).uri)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    registered = ", ".join(sorted(models._REGISTRY))  # every architecture, named in the line
    with pytest.raises(ConfigError, match=f"^unknown model 'vgg99' \\(registered: {registered}\\)"):
        build_model("vgg99")
    with pytest.raises(ConfigError, match="unknown model 'vgg99'"):
        load_model(_publish(tmp_path, {"name": "vgg99", "kwargs": {}}, model).uri)
    with pytest.raises(CheckpointError, match="model spec name must be a string"):
        from_spec({"name": ["cnn"]})


# --- metadata without weights or torch -------------------------------------------------------
def test_read_meta_and_version_read_no_weights(tmp_path, monkeypatch):
    model = build_model("cnn", in_channels=1, num_classes=2, width=4)
    loc = _publish(tmp_path, spec_of(model), model)
    weights = (tmp_path / loc.name / checkpoint.WEIGHTS).read_bytes()
    read = []
    real = storage.Location.read_bytes
    monkeypatch.setattr(
        storage.Location, "read_bytes", lambda self: read.append(self.name) or real(self)
    )
    assert checkpoint.read_meta(loc.uri)["model"] == spec_of(model)
    assert checkpoint.version(loc.uri) == hashlib.sha256(weights).hexdigest()[:12]
    described = checkpoint.describe(loc)
    assert described.version == checkpoint.version(loc) and described.location.uri == loc.uri
    assert checkpoint.WEIGHTS not in read
    loaded = load_checkpoint(loc)
    assert loaded.version == described.version and loaded.meta == described.meta
    # load_checkpoint reads each file once
    assert read[-3:] == [checkpoint.MANIFEST, checkpoint.META, checkpoint.WEIGHTS]


def test_metadata_is_read_without_importing_torch(tmp_path):
    model = build_model("cnn", in_channels=1, num_classes=2, width=4)
    loc = _publish(tmp_path, spec_of(model), model)
    code = (
        "import sys, lepton_ray.checkpoint as c\n"
        f"meta, v = c.read_meta({loc.uri!r}), c.version({loc.uri!r})\n"
        "assert meta['model']['name'] == 'cnn' and len(v) == 12, (meta, v)\n"
        "heavy = [m for m in ('torch', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_metadata_checked_against_its_checksum(tmp_path):
    loc = _publish(tmp_path, {"name": "cnn", "kwargs": {"in_channels": 1, "num_classes": 2}})
    meta_path = tmp_path / loc.name / checkpoint.META
    meta_path.write_text(json.dumps({"model": {"class": "os:system"}}))
    for read in (checkpoint.read_meta, checkpoint.describe, load_model):
        with pytest.raises(CheckpointError, match=f"corrupt: {checkpoint.META} does not match"):
            read(loc.uri)


@pytest.mark.parametrize(
    "files",
    [
        {"model.safetensors": "0" * 64, "lepton.json": "0" * 64, "../victim": "0" * 64},
        {"model.safetensors": "0" * 64, "lepton.json": "0" * 64, "/etc/passwd": "0" * 64},
        {"model.safetensors": "0" * 64, "lepton.json": "0" * 64, "sub/x": "0" * 64},
        {"model.safetensors": "not-a-digest", "lepton.json": "0" * 64},
        {"lepton.json": "0" * 64},
        [],
    ],
)
def test_a_manifest_cannot_point_outside_its_folder(files, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("outside")
    loc = storage.resolve(tmp_path / "ckpt")
    loc.join(checkpoint.MANIFEST).write_json({"files": files})
    for read in (checkpoint.read_meta, checkpoint.version, load_model):
        with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(loc.uri)} is corrupt: "):
            read(loc.uri)
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoint.verify(loc)
    assert victim.read_text() == "outside"


def test_missing_and_unparsable_manifest(tmp_path):
    with pytest.raises(
        CheckpointError, match="no complete checkpoint at .* \\(no manifest.json\\)"
    ):
        checkpoint.version(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / checkpoint.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is not JSON"):
        checkpoint.read_meta(tmp_path / "bad")


# --- deploy: checked on the driver from the manifest and metadata alone ------------------------
class _Stop(Exception):
    """Raised where deploy would start Ray: the driver-side checks are over by then."""


def test_deploy_checks_metadata_only_and_refuses_untrusted_checkpoints(tmp_path, monkeypatch):
    from lepton_ray import runtime
    from lepton_ray.serve.deploy import deploy

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(runtime, "ensure_ray", stop)
    model = build_model("cnn", in_channels=1, num_classes=2, width=4)
    good = _publish(tmp_path, spec_of(model), model)
    marker = tmp_path / "pwned"
    bad = _publish(tmp_path, {"class": "os:system", "kwargs": {"command": f"touch {marker}"}})
    read = []
    real = storage.Location.read_bytes
    monkeypatch.setattr(
        storage.Location, "read_bytes", lambda self: read.append(self.name) or real(self)
    )
    with pytest.raises(_Stop):
        deploy(good.uri, haproxy=False)
    assert read == [checkpoint.MANIFEST, checkpoint.META]  # no weights on the driver
    with pytest.raises(CheckpointError, match="refusing model class 'os:system'"):
        deploy(bad.uri, haproxy=False)
    with pytest.raises(CheckpointError, match="refusing model class 'os:system'"):
        deploy(good.uri, canary_checkpoint=bad.uri, one_hop=False, haproxy=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        deploy(str(tmp_path / "nowhere"), haproxy=False)
    assert not marker.exists()


def test_deploy_accepts_a_module_the_serve_config_trusts(make_module, tmp_path, monkeypatch):
    from lepton_ray import runtime
    from lepton_ray.serve.deploy import deploy

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(runtime, "ensure_ray", stop)
    module = make_module(NET)
    model = importlib.import_module(module).Net()
    loc = _publish(tmp_path, spec_of(model), model)
    with pytest.raises(CheckpointError, match="is not trusted"):
        deploy(loc.uri, haproxy=False)
    with pytest.raises(_Stop):
        deploy(loc.uri, haproxy=False, trusted_modules=[module])


def test_a_class_found_in_a_trusted_module_but_defined_elsewhere_is_refused(make_module, tmp_path):
    marker = tmp_path / "built"
    elsewhere = make_module(
        f"""
        import pathlib
        from torch import nn

        class Evil(nn.Module):
            def __init__(self):
                super().__init__()
                pathlib.Path({str(marker)!r}).touch()
        """
    )
    trusted = make_module(f"from {elsewhere} import Evil\n")
    with pytest.raises(CheckpointError, match=f"defined in module '{elsewhere}', which is not"):
        from_spec({"class": f"{trusted}:Evil", "kwargs": {}}, trusted_modules=[trusted])
    assert not marker.exists()


def test_kwargs_a_constructor_does_not_take_are_one_line(make_module):
    module = make_module(NET)
    with pytest.raises(CheckpointError, match="cannot be built from kwargs {'depth': 3}"):
        from_spec({"class": f"{module}:Net", "kwargs": {"depth": 3}}, trusted_modules=[module])
    with pytest.raises(CheckpointError, match="model 'cnn' cannot be built from kwargs"):
        from_spec({"name": "cnn", "kwargs": {"depth": 3}})
