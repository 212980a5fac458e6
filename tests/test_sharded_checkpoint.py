"""Sharded checkpoints (lepton_ray.train.sharded), without Ray: saved by 2 FSDP processes, loaded
by 3 with the identical full state (model and optimizer), each rank reading about its own rows;
export to one ordinary checkpoint that ``load_model`` loads; the format's checks in one process.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lepton_ray import checkpoint, storage
from lepton_ray.errors import CheckpointError
from lepton_ray.models import build_model
from lepton_ray.runs import RunLayout
from lepton_ray.train import sharded, strategy
from tests.test_fsdp import init, spawn

SPEC = {
    "name": "gpt",
    "kwargs": {"vocab_size": 64, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16},
}
META = {"model": SPEC, "memory_format": "contiguous", "data": {}}
SMALL_BLOCK = 256  # bytes per checksummed block, so that ranks can read less than whole pieces


def gpt(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(SPEC["name"], **SPEC["kwargs"])


def sharded_gpt(seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(SPEC["name"], **SPEC["kwargs"])
    strategy.shard(model, torch.device("cpu"), mixed_precision=False)
    strategy.broadcast_from_rank0(model, gpt(seed) if dist.get_rank() == 0 else None)
    return model


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01)


def full_state(model, opt) -> dict[str, torch.Tensor]:
    """Model and optimizer state gathered whole (a collective), flat, for comparison."""
    out = {f"model/{k}": v.full_tensor() for k, v in sharded.model_tensors(model).items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            out[f"optim/{i}/{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return {k: v.contiguous() for k, v in out.items()}


def _save(rank: int, world: int, rendezvous: str, where: str) -> None:
    init(rank, world, rendezvous)
    sharded.BLOCK_BYTES = SMALL_BLOCK
    model = sharded_gpt(seed=0)
    opt = optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + rank)
        x = torch.randint(0, 64, (4, 8), generator=g)
        loss = F.cross_entropy(model(x).flatten(0, 1), torch.roll(x, -1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "epoch": 0,
        "epoch_complete": False,
        "consumed_ids": torch.arange(16),
    }
    sharded.save(storage.resolve(f"{where}/ckpt"), model, state, META, rank, world)
    ref = full_state(model, opt)
    if rank == 0:
        save_file(ref, f"{where}/ref.safetensors")
    dist.destroy_process_group()


def _load(rank: int, world: int, rendezvous: str, where: str) -> None:
    init(rank, world, rendezvous)
    read = [0]
    plain = storage.Location.read_range

    def counted(self, offset, size):
        read[0] += size
        return plain(self, offset, size)

    storage.Location.read_range = counted
    model = sharded_gpt(seed=1)  # other weights: all must come from the checkpoint
    opt = optimizer(model)
    reader = sharded.Reader(storage.resolve(f"{where}/ckpt"))
    reader.load_model(model)
    state = sharded.materialise(reader.train_state(), reader, next(model.parameters()))
    opt.load_state_dict(state["optimizer"])
    got = full_state(model, opt)
    every: list = [None] * world
    dist.all_gather_object(every, read[0])
    if rank == 0:
        save_file(got, f"{where}/got.safetensors")
        extra = {k: state[k] for k in ("epoch", "epoch_complete", "scheduler")}
        extra["consumed_ids"] = state["consumed_ids"].tolist()
        extra["rng_equal"] = bool(torch.equal(state["torch_rng"], torch.get_rng_state()))
        extra["bytes_read"] = every
        with open(f"{where}/got.json", "w") as f:
            json.dump(extra, f, default=str)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved_at_2_loaded_at_3(tmp_path_factory):
    where = str(tmp_path_factory.mktemp("sharded"))
    spawn(_save, 2, where)
    spawn(_load, 3, where)
    return where


def test_save_at_2_load_at_3_gives_the_identical_full_state(saved_at_2_loaded_at_3):
    where = saved_at_2_loaded_at_3
    ref, got = load_file(f"{where}/ref.safetensors"), load_file(f"{where}/got.safetensors")
    assert set(ref) == set(got) and any(k.endswith("exp_avg_sq") for k in ref)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    extra = json.loads(open(f"{where}/got.json").read())
    assert extra["epoch"] == 0 and extra["epoch_complete"] is False
    assert extra["consumed_ids"] == list(range(16))
    assert extra["scheduler"]["last_epoch"] == 2


def test_each_rank_reads_about_its_own_rows(saved_at_2_loaded_at_3):
    """Loading at 3 ranks, each reads about a third of the shards' bytes (whole blocks of
    256 bytes: a little more), never the whole checkpoint."""
    where = saved_at_2_loaded_at_3
    ckpt = f"{where}/ckpt"
    manifest = checkpoint.read_manifest(storage.resolve(ckpt))
    shard_bytes = sum(
        storage.resolve(f"{ckpt}/{name}").fs.get_file_info(f"{ckpt}/{name}").size
        for name in manifest["files"]
        if name.endswith(".safetensors")
    )
    read = json.loads(open(f"{where}/got.json").read())["bytes_read"]
    assert len(read) == 3
    assert max(read) < 0.5 * shard_bytes
    assert sum(read) < 1.6 * shard_bytes  # rows read once, plus partial blocks at the edges


def test_export_equals_the_gathered_weights_and_loads(saved_at_2_loaded_at_3, tmp_path):
    where = saved_at_2_loaded_at_3
    ref = load_file(f"{where}/ref.safetensors")
    dest = sharded.export(f"{where}/ckpt", str(tmp_path / "exported"))
    weights = load_file(str(tmp_path / "exported" / checkpoint.WEIGHTS))
    assert set(weights) == {k.removeprefix("model/") for k in ref if k.startswith("model/")}
    for k, v in weights.items():
        assert torch.equal(v, ref[f"model/{k}"]), k
    model, meta = checkpoint.load_model(dest.uri)
    assert meta["exported_from"]["world_size"] == 2
    assert model.head.weight is model.tok_emb.weight  # the tie survives
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights.get(k, weights.get("tok_emb.weight"))), k
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        sharded.export(f"{where}/ckpt", dest.uri)


def test_load_model_asks_for_an_export(saved_at_2_loaded_at_3):
    ckpt = f"{saved_at_2_loaded_at_3}/ckpt"
    with pytest.raises(CheckpointError, match="export it to one file first") as err:
        checkpoint.load_model(ckpt)
    assert "\n" not in str(err.value)
    assert checkpoint.describe(ckpt).meta["model"] == SPEC  # metadata reads as before
    assert len(checkpoint.version(ckpt)) == 12


def test_deploy_asks_for_an_export_before_ray_starts(saved_at_2_loaded_at_3, monkeypatch):
    import lepton_ray.runtime
    from lepton_ray.serve.deploy import deploy

    def tripwire(*a, **k):
        raise AssertionError("deploy started Ray for a checkpoint no replica can load")

    monkeypatch.setattr(lepton_ray.runtime, "ensure_ray", tripwire)
    with pytest.raises(CheckpointError, match="export it to one file first") as err:
        deploy(f"{saved_at_2_loaded_at_3}/ckpt")
    assert "\n" not in str(err.value)


# --- one process: the format ------------------------------------------------------------------
def test_encode_decode_round_trip():
    state = {"a": (0.9, 0.999), "b": {0: {"step": torch.tensor(3.0)}, 1: {}}, "c": [None, "x"]}
    tensors: dict = {}
    tree = json.loads(json.dumps(sharded.encode(state, "", tensors)))
    back = sharded.decode(tree, tensors.__getitem__)
    assert back == state
    with pytest.raises(CheckpointError, match="cannot save object"):
        sharded.encode({"x": object()}, "", {})


def save_one_process(path, endpoint_url: str | None = None) -> storage.Location:
    """A plain (unsharded) model saved in the sharded format by one process: every tensor whole."""
    dest = storage.resolve(str(path), endpoint_url)
    model = gpt(0)
    sharded.save(dest, model, {"epoch": 1, "rng": torch.get_rng_state()}, META, 0, 1)
    return dest


def test_one_process_round_trip(tmp_path):
    dest = save_one_process(tmp_path / "c")
    other = gpt(1)
    reader = sharded.Reader(dest)
    reader.load_model(other)
    for k, v in gpt(0).state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert reader.train_state()["epoch"] == 1


def test_rows_are_read_by_range_on_s3(s3_server, s3_bucket, tmp_path):
    """On S3 a rank reads its rows with ranged GETs; export writes there too."""
    dest = save_one_process(f"s3://{s3_bucket}/runs/r/ckpt", s3_server)
    reader = sharded.Reader(dest)
    emb = reader.read_rows("/model/tok_emb.weight", 10, 20)
    assert torch.equal(emb, gpt(0).tok_emb.weight.detach()[10:20])
    out = sharded.export(dest, f"s3://{s3_bucket}/exported/r", s3_server)
    model, _ = checkpoint.load_model(out.uri, endpoint_url=s3_server)
    for k, v in gpt(0).state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_flipped_byte_is_caught(tmp_path):
    dest = save_one_process(tmp_path / "c")
    shard = tmp_path / "c" / sharded.shard_name(0, 1, "safetensors")
    index = json.loads((tmp_path / "c" / sharded.shard_name(0, 1, "json")).read_text())
    data = bytearray(shard.read_bytes())
    data[index["tensors"]["/model/blocks.1.mlp.fc.weight"]["offset"] + 5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        sharded.Reader(dest).load_model(gpt(1))


def test_a_rank_dying_before_the_manifest_leaves_no_checkpoint(tmp_path):
    """Shards written, manifest not (rank 0 died, or another rank never finished): not a checkpoint."""
    run = RunLayout(storage.resolve(str(tmp_path / "run")))
    dest = run.checkpoint(1, 5)
    sharded.write_shards([dest], gpt(0), {"epoch": 1}, 0, 1)
    assert dest.exists() and run.latest() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        sharded.Reader(dest)


def test_cli_export(saved_at_2_loaded_at_3, tmp_path, capsys):
    from lepton_ray.cli import main

    assert main(["export", f"{saved_at_2_loaded_at_3}/ckpt", str(tmp_path / "e")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exported_from"]["world_size"] == 2
    assert out["version"] == checkpoint.version(str(tmp_path / "e"))
    # an ordinary checkpoint needs no export: one line, exit 2
    assert main(["export", str(tmp_path / "e"), str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "is not sharded" in err and len(err.strip().splitlines()) == 1
