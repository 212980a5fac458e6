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

A *sharded* checkpoint (``strategy="fsdp"``) holds, instead of ``model.safetensors`` and
``train_state.pt``, one shard file and one index per rank plus ``state.json``
(:mod:`lepton_ray.train.sharded`); its manifest says ``"sharded": {"world_size": W}``. Training
resumes from it at any world size; :func:`load_checkpoint` refuses it in one line, since
``lepton-ray export`` (:func:`lepton_ray.train.sharded.export`) turns it into an ordinary one.

Metadata without weights: :func:`read_meta` and :func:`version` (and :func:`describe`, both at
once) read only ``manifest.json`` and ``lepton.json`` (checked against its checksum), and this
module imports torch and safetensors only inside the functions that handle tensors, so Serve's
ingress, ``deploy`` on the driver and the pipelines learn what a checkpoint is without downloading
its weights or importing torch. The version of a checkpoint is the first 12 hex digits of its
weights' sha256: two checkpoints with the same weights have the same version, wherever they are.

Loading builds the architecture the spec names only when :mod:`lepton_ray.trust` allows it (a
registered name, or a class from a trusted module), checked before the weights are downloaded.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_ray import storage
from lepton_ray.errors import CheckpointError, NotFoundError
from lepton_ray.trust import check_spec

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "CheckpointError",
    "Described",
    "Loaded",
    "describe",
    "is_sharded",
    "refuse_sharded",
    "load_checkpoint",
    "load_model",
    "load_train_state",
    "publish",
    "read_checked",
    "read_manifest",
    "read_meta",
    "verify",
    "version",
    "write_local",
    "write_meta",
]

WEIGHTS, STATE, META, MANIFEST = (
    "model.safetensors",
    "train_state.pt",
    "lepton.json",
    "manifest.json",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Described:
    """What a checkpoint is, read from its manifest and metadata only."""

    location: storage.Location
    meta: dict[str, Any]
    version: str


@dataclass(frozen=True)
class Loaded:
    """A loaded checkpoint: the model (eval mode, on its device), ``lepton.json`` and the version."""

    model: nn.Module
    meta: dict[str, Any]
    version: str


def write_local(
    directory: str | os.PathLike,
    model: nn.Module,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint's files (all but the manifest) into a local folder."""
    import torch
    from safetensors.torch import save as st_save

    from lepton_ray.models import unwrap

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # A tied weight (one tensor under two names, e.g. a GPT's head and token embedding) is written
    # once, under its first name: safetensors refuses shared tensors; the model's load hook re-ties.
    state, seen = {}, set()
    for k, v in unwrap(model).state_dict().items():
        alias = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if alias is None or alias not in seen:
            seen.add(alias)
            state[k] = v.detach().to("cpu").contiguous()
    (d / WEIGHTS).write_bytes(st_save(state))
    if train_state is not None:
        buf = io.BytesIO()
        torch.save(train_state, buf)
        (d / STATE).write_bytes(buf.getvalue())
    write_meta(d, meta)
    return d


def write_meta(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``lepton.json`` into a local checkpoint folder."""
    path = Path(directory) / META
    path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return path


def publish(
    local_dir: str | os.PathLike,
    dest: storage.Location,
    *,
    uploaded: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> storage.Location:
    """Upload a local checkpoint folder: every file first (each durable before the next step),
    then ``manifest.json``, the commit point. ``uploaded``: files already at ``dest`` (a sharded
    checkpoint's shards, written by every rank) and their sha256, listed too; ``extra``: more
    manifest fields."""
    files = dict(uploaded or {})
    for p in sorted(Path(local_dir).iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = dest.join(p.name).upload_file(p)
    dest.join(MANIFEST).write_json({"files": files, "created_at": time.time(), **(extra or {})})
    return dest


def is_sharded(manifest: dict[str, Any]) -> bool:
    """Whether a manifest is a sharded checkpoint's (see the module docstring)."""
    return isinstance(manifest.get("sharded"), dict)


def refuse_sharded(loc: storage.Location, manifest: dict[str, Any]) -> None:
    """One line, before anything loads, for a sharded checkpoint where one file of weights is
    needed (``load_model``, Serve): export it first."""
    if is_sharded(manifest):
        raise CheckpointError(
            f"checkpoint {loc.uri} is sharded ({manifest['sharded'].get('world_size')} FSDP ranks): "
            f"export it to one file first: lepton-ray export {loc.uri} <dest>"
        )


def read_manifest(loc: storage.Location) -> dict[str, Any]:
    """A checkpoint's manifest, checked to be well formed: ``{"files": {name: sha256}}`` with
    plain file names (a manifest is data: it cannot point outside its folder)."""
    try:
        manifest = loc.join(MANIFEST).read_json()
    except NotFoundError:
        raise CheckpointError(f"no complete checkpoint at {loc.uri} (no {MANIFEST})") from None
    except ValueError:
        raise CheckpointError(f"checkpoint {loc.uri} is corrupt: {MANIFEST} is not JSON") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    sharded = isinstance(manifest, dict) and is_sharded(manifest)  # no WEIGHTS: shards
    if not isinstance(files, dict) or META not in files or (not sharded and WEIGHTS not in files):
        raise CheckpointError(
            f"checkpoint {loc.uri} is corrupt: {MANIFEST} does not list {WEIGHTS} and {META}"
        )
    for name, digest in files.items():
        if (
            not _FILE.fullmatch(name)
            or not isinstance(digest, str)
            or not _SHA256.fullmatch(digest)
        ):
            raise CheckpointError(
                f"checkpoint {loc.uri} is corrupt: {MANIFEST} lists {name!r} with a bad name or "
                "checksum"
            )
    return manifest


def read_checked(loc: storage.Location, manifest: dict[str, Any], name: str) -> bytes:
    data = loc.join(name).read_bytes()
    if storage.sha256_bytes(data) != manifest["files"][name]:
        raise CheckpointError(
            f"checkpoint {loc.uri} is corrupt: {name} does not match its checksum"
        )
    return data


def _version(manifest: dict[str, Any]) -> str:
    if is_sharded(manifest):  # the checksums of its shard files, in name order
        shards = "".join(v for k, v in sorted(manifest["files"].items()) if k.startswith("shard-"))
        return storage.sha256_bytes(shards.encode())[:12]
    return manifest["files"][WEIGHTS][:12]


def describe(
    uri: str | storage.Location, endpoint_url: str | None = None, *, loadable: bool = False
) -> Described:
    """(location, ``lepton.json``, version) of a checkpoint from its manifest and metadata only:
    no weights read, no torch imported. ``lepton.json`` is checked against its checksum.
    ``loadable``: also refuse a sharded checkpoint (:func:`refuse_sharded`), for a caller about to
    load its weights as one file."""
    loc = storage.resolve(uri, endpoint_url)
    manifest, meta = _head(loc)
    if loadable:
        refuse_sharded(loc, manifest)
    return Described(loc, meta, _version(manifest))


def _head(loc: storage.Location) -> tuple[dict[str, Any], dict[str, Any]]:
    manifest = read_manifest(loc)
    try:
        meta = json.loads(read_checked(loc, manifest, META))
    except ValueError:
        raise CheckpointError(f"checkpoint {loc.uri} is corrupt: {META} is not JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {loc.uri} is corrupt: {META} is not a JSON object")
    return manifest, meta


def read_meta(uri: str | storage.Location, endpoint_url: str | None = None) -> dict[str, Any]:
    """A checkpoint's ``lepton.json`` (spec, data, metrics, config), verified, without weights."""
    return describe(uri, endpoint_url).meta


def version(uri: str | storage.Location, endpoint_url: str | None = None) -> str:
    """A checkpoint's version (12 hex digits of its weights' sha256), from the manifest alone."""
    return _version(read_manifest(storage.resolve(uri, endpoint_url)))


def verify(loc: storage.Location) -> dict[str, bytes]:
    """Read and check a checkpoint; returns the contents of its files by name."""
    manifest = read_manifest(loc)
    return {name: read_checked(loc, manifest, name) for name in manifest["files"]}


def load_checkpoint(
    uri: str | storage.Location,
    endpoint_url: str | None = None,
    map_location: str = "cpu",
    trusted_modules: Iterable[str] | str | None = (),
) -> Loaded:
    """Rebuild the model from a checkpoint, reading each file once: the manifest, then
    ``lepton.json`` (whose spec is checked against :mod:`lepton_ray.trust` before the weights are
    even downloaded), then the weights, every file checked against its checksum.

    ``trusted_modules`` names the modules (exact or dotted prefix) a user's ``nn.Module`` class
    may come from, added to ``$LEPTON_TRUSTED_MODULES``; registered architectures need none.
    """
    from safetensors.torch import load as st_load

    from lepton_ray.models import from_spec, memory_format

    loc = storage.resolve(uri, endpoint_url)
    manifest, meta = _head(loc)
    refuse_sharded(loc, manifest)
    check_spec(meta.get("model"), trusted_modules)
    weights = read_checked(loc, manifest, WEIGHTS)
    model = from_spec(meta["model"], trusted_modules)
    state = {k.removeprefix("module."): v for k, v in st_load(weights).items()}
    model.load_state_dict(state)
    model = model.to(map_location, memory_format=memory_format(meta)).eval()
    return Loaded(model, meta, _version(manifest))


def load_model(
    uri: str | storage.Location,
    endpoint_url: str | None = None,
    map_location: str = "cpu",
    trusted_modules: Iterable[str] | str | None = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """(model, ``lepton.json``) of a checkpoint: :func:`load_checkpoint` without the version."""
    loaded = load_checkpoint(uri, endpoint_url, map_location, trusted_modules)
    return loaded.model, loaded.meta


def load_train_state(
    loc: storage.Location,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, train_state, meta) of a checkpoint, verified, for resuming a run."""
    import torch
    from safetensors.torch import load as st_load

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
