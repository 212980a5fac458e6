"""Sharded checkpoints: every rank writes the rows it holds, rank 0 writes the manifest last.

Under FSDP (:mod:`lepton_ray.train.strategy`) each parameter and each optimizer state tensor is a
``DTensor`` sharded along dim 0: rank ``r`` of ``W`` holds rows ``[r*c, (r+1)*c)`` with
``c = ceil(n / W)`` (``torch.chunk``'s split; the last ranks may hold fewer or none). A checkpoint
folder, beside ``lepton.json`` and ``manifest.json`` (:mod:`lepton_ray.checkpoint`)::

    shard-00000-of-00002.safetensors   rank 0's rows of every sharded tensor (model and optimizer),
                                       plus the whole replicated tensors (buffers, RNG, step counts)
    shard-00000-of-00002.json          its index: per tensor the global shape, dtype, the rows it
                                       holds, their byte offset, and a sha256 per block of rows
    shard-00001-of-00002.{safetensors,json}
    state.json                         the train state's tree (scheduler, epoch, the optimizer's
                                       param groups, ...) with each tensor as {"__tensor__": key}

No pickle anywhere. The order of writing is the commit protocol: every rank uploads its files, the
ranks gather the checksums (a collective, so every file is durable before it returns), and only
then does rank 0 upload ``lepton.json`` and the manifest listing every file: a rank that dies
mid-write leaves a folder without a manifest, which no reader trusts.

Reading at any world size: a rank computes the rows it owns now and reads only the byte ranges
that hold them (ranged reads, :meth:`lepton_ray.storage.Location.read_range`), checking each block
of rows (about 1 MiB) against the checksum in its index, the index itself against the manifest.
So 2 -> 3 workers reads each row once (plus at most a block either side), never the whole model
per rank, on S3 as on a local disk.

    >>> rows(10, world=3, rank=2)    # c = 4: ranks hold 0-4, 4-8, 8-10
    (8, 10)
    >>> rows(2, world=3, rank=2)     # c = 1: rank 2 holds nothing of a 2-row bias
    (2, 2)
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lepton_ray import checkpoint, storage
from lepton_ray.errors import CheckpointError

STATE = "state.json"
BLOCK_BYTES = 1 << 20  # rows are checksummed in blocks of about this size
FORMAT = 1
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


def shard_name(rank: int, world: int, ext: str) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.{ext}"


def rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a dim-0 size ``n`` that ``rank`` of ``world`` holds (FSDP2's
    ``torch.chunk`` split)."""
    c = math.ceil(n / world) if n else 0
    start = min(rank * c, n)
    return start, min(start + c, n)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_rows(t: Any) -> tuple[int, int]:
    """The global rows a dim-0-sharded DTensor's local piece holds (checked against its size)."""
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),):
        raise CheckpointError(f"cannot save a DTensor placed as {t.placements} (only Shard(0))")
    mesh = t.device_mesh
    start, stop = rows(t.shape[0], mesh.size(), mesh.get_local_rank())
    if stop - start != t.to_local().shape[0]:
        raise CheckpointError(f"unexpected shard of {stop - start} rows, got {t.to_local().shape}")
    return start, stop


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name, a tied weight once (under its first name)."""
    from lepton_ray.models import unwrap

    m = unwrap(model)
    skip = {
        f"{mod_name}.{b}" if mod_name else b
        for mod_name, mod in m.named_modules()
        for b in mod._non_persistent_buffers_set
    }
    out = dict(m.named_parameters())  # shared parameters once
    out |= {k: v for k, v in m.named_buffers() if k not in skip}
    return out


# --- the tree of train state <-> JSON + named tensors ------------------------------------------
def encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for ``obj``, with every tensor moved into ``tensors`` under its path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        if all(isinstance(k, int) for k in obj):
            return {"__intkeys__": [[k, encode(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    elif isinstance(obj, tuple):
        return {"__tuple__": [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    elif isinstance(obj, list):
        return [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    elif obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(f"cannot save {type(obj).__name__} at {path} in a sharded checkpoint")


def decode(obj: Any, tensor: Any) -> Any:
    """The inverse of :func:`encode`, ``tensor(key)`` giving each tensor back."""
    if isinstance(obj, list):
        return [decode(v, tensor) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensor(obj["__tensor__"])
    if "__tuple__" in obj:
        return tuple(decode(v, tensor) for v in obj["__tuple__"])
    if "__intkeys__" in obj:
        return {int(k): decode(v, tensor) for k, v in obj["__intkeys__"]}
    return {k: decode(v, tensor) for k, v in obj.items()}


# --- writing -----------------------------------------------------------------------------------
def _piece(
    t: torch.Tensor, rank: int, all_rows: bool = False
) -> tuple[torch.Tensor, list[int], bool] | None:
    """(this rank's rows on the CPU, their global range, sharded?) or None: nothing to write.
    ``all_rows``: ``t`` is sharded though not a DTensor, its one rank holding every row."""
    if _is_dtensor(t):
        start, stop = local_rows(t)
        if stop == start:
            return None
        return t.to_local().detach().cpu().clone(), [start, stop], True
    if rank != 0:  # replicated: rank 0's copy
        return None
    n = t.shape[0] if t.ndim else 1
    return t.detach().cpu().contiguous().clone(), [0, n], all_rows


def whole_shards(tree: dict[str, Any]) -> set[int]:
    """The tensors of ``tree`` (``{"model", "train_state"}``) that an fsdp run on one worker
    (:func:`lepton_ray.train.strategy.shards`) saves as sharded, all rows on its one rank: the
    model's parameters and each optimizer state tensor with dimensions (Adam's moments, SGD's
    momentum), which FSDP2 shards like their parameters; 0-d step counts and buffers stay
    replicated, as FSDP2 keeps them. So a later run on more workers reads its rows of each."""
    out = {id(v) for v in tree["model"].values() if isinstance(v, nn.Parameter)}
    optim = tree["train_state"].get("optimizer", {}).get("state", {})
    for state in optim.values():
        out |= {id(v) for v in state.values() if isinstance(v, torch.Tensor) and v.ndim}
    return out


def write_local_shard(directory: Path, tree: dict[str, Any], rank: int, world: int) -> list[Path]:
    """This rank's shard files in ``directory`` (and, on rank 0, ``state.json``)."""
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    encoded = encode(tree, "", tensors)
    dtensors = any(_is_dtensor(t) for t in tensors.values())
    whole = whole_shards(tree) if world == 1 and not dtensors else set()
    pieces, index = {}, {}
    for key, t in tensors.items():
        piece = _piece(t, rank, id(t) in whole)
        if piece is not None:
            pieces[key], rng, sharded = piece
            index[key] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "rows": rng}
            index[key]["sharded"] = sharded
    data = st_save(pieces)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    for key, entry in index.items():
        begin, end = (8 + header_len + o for o in header[key]["data_offsets"])
        start, stop = entry["rows"]
        row_bytes = (end - begin) // (stop - start)
        block = max(1, BLOCK_BYTES // max(row_bytes, 1))
        entry |= {
            "offset": begin,
            "block_rows": block,
            "sha256": [
                storage.sha256_bytes(data[b : min(b + block * row_bytes, end)])
                for b in range(begin, end, block * row_bytes)
            ],
        }
    files = [
        directory / shard_name(rank, world, "safetensors"),
        directory / shard_name(rank, world, "json"),
    ]
    files[0].write_bytes(data)
    files[1].write_text(
        json.dumps({"format": FORMAT, "rank": rank, "world_size": world, "tensors": index})
    )
    if rank == 0:
        files.append(directory / STATE)
        files[-1].write_text(json.dumps(encoded))
    return files


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise CheckpointError(f"cannot save a tensor of dtype {name} in a sharded checkpoint")
    return name


def write_shards(
    dests: list[storage.Location],
    model: nn.Module,
    train_state: dict[str, Any],
    rank: int,
    world: int,
) -> dict[str, str]:
    """Every rank: upload this rank's files into each of ``dests`` (a checkpoint and maybe its
    best copy), then gather every rank's checksums (a collective). Returns ``{file: sha256}`` of
    all ranks' files, which rank 0's manifest lists."""
    tree = {"model": model_tensors(model), "train_state": train_state}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_local_shard(Path(tmp), tree, rank, world)
        mine = {}
        for dest in dests:
            for p in files:
                mine[p.name] = dest.join(p.name).upload_file(p)
    if world == 1 or not dist.is_initialized():
        return mine
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    return {k: v for part in every for k, v in part.items()}


def publish(
    local_dir: str | Path, dest: storage.Location, shards: dict[str, str], world: int
) -> storage.Location:
    """Rank 0: upload ``lepton.json`` (in ``local_dir``), then the manifest listing every file."""
    return checkpoint.publish(
        local_dir, dest, uploaded=shards, extra={"sharded": {"format": FORMAT, "world_size": world}}
    )


def save(
    dest: storage.Location,
    model: nn.Module,
    train_state: dict[str, Any],
    meta: dict[str, Any],
    rank: int,
    world: int,
) -> None:
    """A whole sharded checkpoint at ``dest``, outside Ray Train (every rank calls it)."""
    shards = write_shards([dest], model, train_state, rank, world)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.write_meta(tmp, meta)
            publish(tmp, dest, shards, world)
    if world > 1 and dist.is_initialized():
        dist.barrier()


# --- reading -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardRef:
    """A sharded tensor of the saved state, not read yet: :meth:`Reader.dtensor` reads the rows
    this rank owns."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class Reader:
    """A verified sharded checkpoint: its manifest, indexes and state tree; rows read on demand."""

    def __init__(self, loc: storage.Location, manifest: dict[str, Any] | None = None):
        self.loc = loc
        self.manifest = manifest or checkpoint.read_manifest(loc)
        info = self.manifest.get("sharded")
        if not isinstance(info, dict) or not isinstance(info.get("world_size"), int):
            raise CheckpointError(f"checkpoint {loc.uri} is not a sharded checkpoint")
        self.world = info["world_size"]
        self.pieces: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # key -> (file, entry)
        self.entries: dict[str, dict[str, Any]] = {}
        for r in range(self.world):
            index = self._json(shard_name(r, self.world, "json"))
            for key, entry in index.get("tensors", {}).items():
                self._check_entry(key, entry)
                self.pieces.setdefault(key, []).append(
                    (shard_name(r, self.world, "safetensors"), entry)
                )
                self.entries[key] = entry
        self.tree = self._json(STATE)
        self.meta = self._json(checkpoint.META)

    def _json(self, name: str) -> Any:
        if name not in self.manifest["files"]:
            raise CheckpointError(
                f"checkpoint {self.loc.uri} is corrupt: {name} is not in its manifest"
            )
        return json.loads(checkpoint.read_checked(self.loc, self.manifest, name))

    def _check_entry(self, key: str, e: dict[str, Any]) -> None:
        ok = (
            isinstance(e.get("shape"), list)
            and e.get("dtype") in _DTYPES
            and isinstance(e.get("rows"), list)
            and len(e["rows"]) == 2
            and 0 <= e["rows"][0] < e["rows"][1] <= (e["shape"][0] if e["shape"] else 1)
            and isinstance(e.get("offset"), int)
            and isinstance(e.get("block_rows"), int)
            and e["block_rows"] > 0
            and isinstance(e.get("sha256"), list)
            and len(e["sha256"]) == math.ceil((e["rows"][1] - e["rows"][0]) / e["block_rows"])
        )
        if not ok:
            raise CheckpointError(f"checkpoint {self.loc.uri} is corrupt: bad index entry {key!r}")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a saved tensor (all of a 0-d one), checked block by block."""
        entry = self.entries[key]
        shape, dtype = entry["shape"], _DTYPES[entry["dtype"]]
        row_numel = math.prod(shape[1:]) if shape else 1
        row_bytes = row_numel * torch.empty((), dtype=dtype).element_size()
        parts = []
        for name, e in sorted(self.pieces[key], key=lambda p: p[1]["rows"][0]):
            lo, hi = max(start, e["rows"][0]), min(stop, e["rows"][1])
            if lo >= hi:
                continue
            first = (lo - e["rows"][0]) // e["block_rows"]  # blocks b0..b1 cover rows lo..hi
            last = (hi - 1 - e["rows"][0]) // e["block_rows"]
            b_lo = e["rows"][0] + first * e["block_rows"]
            b_hi = min(e["rows"][0] + (last + 1) * e["block_rows"], e["rows"][1])
            data = self.loc.join(name).read_range(
                e["offset"] + (b_lo - e["rows"][0]) * row_bytes, (b_hi - b_lo) * row_bytes
            )
            step = e["block_rows"] * row_bytes
            for i, b in enumerate(range(first, last + 1)):
                if storage.sha256_bytes(data[i * step : (i + 1) * step]) != e["sha256"][b]:
                    raise CheckpointError(
                        f"checkpoint {self.loc.uri} is corrupt: {name} does not match its "
                        f"checksum at {key!r}"
                    )
            block = torch.frombuffer(bytearray(data), dtype=dtype).view(b_hi - b_lo, row_numel)
            parts.append(block[lo - b_lo : hi - b_lo])
        got = sum(len(p) for p in parts)
        if got != stop - start:
            raise CheckpointError(
                f"checkpoint {self.loc.uri} is corrupt: rows {start}-{stop} of {key!r} are missing"
            )
        out = torch.cat(parts) if parts else torch.empty(0, row_numel, dtype=dtype)
        return out.view(-1, *shape[1:]) if shape else out.view(())

    def whole(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        return self.read_rows(key, 0, shape[0] if shape else 1)

    def dtensor(self, ref: ShardRef, like: Any) -> Any:
        """The rows of ``ref`` that this rank owns now, as a DTensor sharded as ``like`` is (on
        one worker, whose model is not sharded, a plain tensor of every row on ``like``'s
        device)."""
        from torch.distributed.tensor import DTensor, Shard

        if not _is_dtensor(like):
            return self.whole(ref.key).to(like.device)
        mesh = like.device_mesh
        start, stop = rows(ref.shape[0], mesh.size(), mesh.get_local_rank())
        local = self.read_rows(ref.key, start, stop).to(like.device)
        stride = torch.empty(ref.shape, device="meta").stride()
        return DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size(ref.shape), stride=stride
        )

    def train_state(self) -> dict[str, Any]:
        """The saved train state: replicated tensors read, sharded ones as :class:`ShardRef`."""

        def tensor(key: str) -> Any:
            e = self.entries.get(key)
            if e is None:
                raise CheckpointError(f"checkpoint {self.loc.uri} is corrupt: no tensor {key!r}")
            if e["sharded"]:
                return ShardRef(key, tuple(e["shape"]), _DTYPES[e["dtype"]])
            return self.whole(key)

        return decode(self.tree.get("train_state", {}), tensor)

    def model_keys(self) -> Iterator[str]:
        return (k for k in self.entries if k.startswith("/model/"))

    def load_model(self, model: nn.Module) -> None:
        """Copy the saved weights into ``model`` (sharded or not): each rank reads its rows."""
        saved = {k.removeprefix("/model/") for k in self.model_keys()}
        mine = model_tensors(model)
        if saved != set(mine):
            missing, extra = sorted(set(mine) - saved), sorted(saved - set(mine))
            raise CheckpointError(
                f"checkpoint {self.loc.uri} does not fit the model: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        with torch.no_grad():
            for name, t in mine.items():
                key = "/model/" + name
                if self.shape(key) != tuple(t.shape):
                    raise CheckpointError(
                        f"checkpoint {self.loc.uri} does not fit the model: {name} is "
                        f"{list(self.shape(key))}, the model's {list(t.shape)}"
                    )
                if _is_dtensor(t):
                    local = t.to_local()
                    local.copy_(self.read_rows(key, *local_rows(t)))
                else:
                    t.copy_(self.whole(key))

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Every saved model tensor, whole (export)."""
        return {k.removeprefix("/model/"): self.whole(k) for k in self.model_keys()}


def materialise(state: Any, reader: Reader, like: Any) -> Any:
    """``state`` with each :class:`ShardRef` read as a DTensor of this rank's rows, placed on
    ``like``'s mesh (the model's parameters share one mesh)."""
    if isinstance(state, ShardRef):
        return reader.dtensor(state, like)
    if isinstance(state, dict):
        return {k: materialise(v, reader, like) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(materialise(v, reader, like) for v in state)
    return state


def export(
    src: str | storage.Location, dest: str | storage.Location, endpoint_url: str | None = None
) -> storage.Location:
    """Consolidate a sharded checkpoint into one ordinary checkpoint (``model.safetensors``,
    ``lepton.json``, manifest) that :func:`lepton_ray.checkpoint.load_model` and Serve load."""
    from safetensors.torch import save as st_save

    src_loc, dest_loc = storage.resolve(src, endpoint_url), storage.resolve(dest, endpoint_url)
    manifest = checkpoint.read_manifest(src_loc)
    if not checkpoint.is_sharded(manifest):
        raise CheckpointError(f"checkpoint {src_loc.uri} is not sharded: it needs no export")
    if dest_loc.join(checkpoint.MANIFEST).exists():
        raise CheckpointError(f"{dest_loc.uri} already holds a checkpoint; choose another folder")
    reader = Reader(src_loc, manifest)
    weights = reader.full_weights()
    meta = dict(reader.meta, exported_from={"uri": src_loc.uri, "world_size": reader.world})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / checkpoint.WEIGHTS).write_bytes(st_save(weights))
        checkpoint.write_meta(tmp, meta)
        return checkpoint.publish(tmp, dest_loc)
