"""Atomic, pickle-free checkpoints in object storage.

A checkpoint is a folder::

    model.safetensors   weights of the unwrapped model (no ``module.`` prefix)
    train_state.pt      optimizer, scheduler, RNG, epoch/step (tensors and plain data only;
                        loaded with ``weights_only=True``)
    lepton.json         model spec, data spec (shape, mean/std, classes), resolved config,
                        metrics, git SHA and package versions
    manifest.json       sha256 of every other file; written last

A reader trusts a checkpoint only when ``manifest.json`` exists and every checksum matches, so a
crash mid-upload never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from lepton_ray import storage
from lepton_ray.errors import LeptonError, StorageError
from lepton_ray.models import from_spec, memory_format, unwrap

WEIGHTS, STATE, META, MANIFEST = (
    "model.safetensors",
    "train_state.pt",
    "lepton.json",
    "manifest.json",
)


class CheckpointError(LeptonError):
    """A checkpoint is missing, incomplete or corrupt."""


def write_local(
    directory: str | os.PathLike,
    model: nn.Module,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint's files (all but the manifest) into a local folder."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    (d / WEIGHTS).write_bytes(st_save(state))
    if train_state is not None:
        buf = io.BytesIO()
        torch.save(train_state, buf)
        (d / STATE).write_bytes(buf.getvalue())
    (d / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return d


def publish(local_dir: str | os.PathLike, dest: storage.Location) -> storage.Location:
    """Upload a local checkpoint folder: every file first, then ``manifest.json``."""
    files = {}
    for p in sorted(Path(local_dir).iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = dest.join(p.name).upload_file(p)
    dest.join(MANIFEST).write_json({"files": files, "created_at": time.time()})
    return dest


def verify(loc: storage.Location) -> dict[str, bytes]:
    """Read and check a checkpoint; returns the contents of its files by name."""
    try:
        manifest = loc.join(MANIFEST).read_json()
    except StorageError as exc:
        if str(exc).startswith("not found"):
            raise CheckpointError(f"no complete checkpoint at {loc.uri} (no {MANIFEST})") from None
        raise
    contents = {}
    for name, digest in manifest["files"].items():
        data = loc.join(name).read_bytes()
        if storage.sha256_bytes(data) != digest:
            raise CheckpointError(
                f"checkpoint {loc.uri} is corrupt: {name} does not match its checksum"
            )
        contents[name] = data
    return contents


def load_model(
    uri: str | storage.Location, endpoint_url: str | None = None, map_location: str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint: architecture from its spec, weights from safetensors."""
    loc = storage.resolve(uri, endpoint_url)
    files = verify(loc)
    meta = json.loads(files[META])
    model = from_spec(meta["model"])
    state = st_load(files[WEIGHTS])
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model.to(map_location, memory_format=memory_format(meta)).eval(), meta


def load_train_state(
    loc: storage.Location,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, train_state, meta) of a checkpoint, verified, for resuming a run."""
    files = verify(loc)
    weights = st_load(files[WEIGHTS])
    state = (
        torch.load(io.BytesIO(files[STATE]), map_location="cpu", weights_only=True)
        if STATE in files
        else {}
    )
    return weights, state, json.loads(files[META])


def provenance() -> dict[str, Any]:
    """Git SHA and package versions to save beside every checkpoint."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("lepton_ray", "torch", "ray", "torchvision", "numpy", "pyarrow"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        sha = out.stdout.strip() if out.returncode == 0 and len(out.stdout.strip()) == 40 else None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"git_sha": sha, "versions": versions}
