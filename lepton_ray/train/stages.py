"""How a model is cut into pipeline stages: which rank holds which stage, which blocks each
stage gets, how a replica's rows split into micro-batches, and each rank's stage built on meta.

Pure arithmetic and module surgery, no communication; :mod:`lepton_ray.train.pipeline` trains the
stages. A model with the GPT's interface (``embed(idx) -> h``, ``blocks`` an ``nn.ModuleList``,
``logits(h)``) is cut into ``S`` stages of consecutive blocks on consecutive ranks: stage 0 holds
the embeddings and its blocks, the last stage its blocks, the final norm and the head.

Initialisation: every rank builds the model on the meta device and materialises only its stage,
then copies its stage's tensors from one full state dict on the CPU (a fresh run's model, or the
checkpoint being resumed) that every rank holds alike: identical whatever the layout, and the same
weights ddp would start from. Device memory holds one stage; the host briefly holds the full state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lepton_ray.errors import ConfigError
from lepton_ray.train.ties import materialise, tied_names


@dataclass(frozen=True)
class Layout:
    """Which stage and replica each of ``world`` ranks is, for ``stages`` stages per pipeline."""

    world: int
    stages: int

    @property
    def replicas(self) -> int:
        return self.world // self.stages

    def stage(self, rank: int) -> int:
        return rank % self.stages

    def replica(self, rank: int) -> int:
        return rank // self.stages

    def pipeline_ranks(self, replica: int) -> list[int]:
        """The ranks of one pipeline, stage 0 first."""
        return list(range(replica * self.stages, (replica + 1) * self.stages))

    def stage_ranks(self, stage: int) -> list[int]:
        """The ranks holding ``stage`` in every replica (its gradients are averaged over them)."""
        return [r * self.stages + stage for r in range(self.replicas)]

    def tie_ranks(self) -> list[int]:
        """The first and last stages of every replica: where a tied weight's two copies live."""
        return sorted(self.stage_ranks(0) + self.stage_ranks(self.stages - 1))


def check_layout(world: int, stages: int | None, blocks: int | None = None) -> Layout:
    """The layout of ``world`` workers in pipelines of ``stages`` (None: one stage per worker), or
    a one-line :class:`ConfigError` naming what does not fit."""
    stages = world if stages is None else stages
    if stages < 1 or world % stages:
        raise ConfigError(
            f"strategy 'pipeline' needs a worker count that is a multiple of pipeline_stages "
            f"({stages}); got {world} workers"
        )
    if blocks is not None and blocks < stages:
        raise ConfigError(
            f"strategy 'pipeline': the model has {blocks} blocks, fewer than its {stages} stages"
        )
    return Layout(world, stages)


def check_model(model: nn.Module) -> None:
    """Refuse, in one line, a model that cannot be cut into stages."""
    missing = [a for a in ("embed", "blocks", "logits") if not hasattr(model, a)]
    if missing or not isinstance(model.blocks, nn.ModuleList):
        lacks = ", ".join(missing) or "ModuleList blocks"
        raise ConfigError(
            f"strategy 'pipeline' needs a model with embed(), blocks (an nn.ModuleList) and "
            f"logits(), as 'gpt' has; {type(model).__name__} has no {lacks}"
        )


def split_blocks(blocks: int, stages: int) -> list[range]:
    """Consecutive blocks per stage, near-equal, the remainder to the first stages (which also
    embed): e.g. 5 blocks on 2 stages -> [0, 1, 2], [3, 4]."""
    sizes = [blocks // stages + (1 if s < blocks % stages else 0) for s in range(stages)]
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes, strict=True)]


def micro_rows(
    rows: int, micro_batches: int | None, stages: int, max_rows: int | None = None
) -> tuple[int, int]:
    """(micro-batches, rows each) for ``rows`` rows in at most ``micro_batches`` equal
    micro-batches, the last padded: 7 rows, 2 micro-batches -> (2, 4); 3 rows, 4 -> (3, 1);
    5 rows, 4 -> (3, 2), as (4, 2) would leave one all padding.
    None: ``2 * stages`` (the bubble, ``(S - 1) / (M + S - 1)`` of a step, is then under a third),
    or 1 for a single stage, which has no bubble to fill. ``max_rows`` (``max_micro_batch``, a
    memory cap) asks for more micro-batches where needed: 64 rows, 2 stages, at most 10 -> (7, 10).
    """
    if micro_batches is None:
        micro_batches = 1 if stages == 1 else 2 * stages
    if max_rows:
        micro_batches = max(micro_batches, math.ceil(rows / max_rows))
    each = math.ceil(rows / min(micro_batches, rows))
    return math.ceil(rows / each), each


class Stage(nn.Module):
    """One stage of a model: the full model's own submodules for its blocks (``blocks.<i>`` keeps
    the full model's names), plus the embeddings on the first stage and the norm and head on the
    last. ``forward`` calls the full model's ``embed``/``logits``, which reach only this stage's
    (materialised) submodules."""

    def __init__(self, model: nn.Module, index: int, stages: int):
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == stages - 1
        self.block_ids = split_blocks(len(model.blocks), stages)[index]
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in self.block_ids})
        for name, child in model.named_children():
            if name == "blocks":
                continue
            if (self.first and name != "head" and name != "ln_f") or (
                self.last and name in ("ln_f", "head")
            ):
                self.add_module(name, child)
        self._full = [model]  # a list: not a submodule (the other stages' parts stay on meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._full[0]
        h = model.embed(x) if self.first else x
        for block in self.blocks.values():
            h = block(h)
        return model.logits(h) if self.last else h


def build_stage(
    factory: Callable[[], nn.Module],
    state: Mapping[str, torch.Tensor],
    layout: Layout,
    rank: int,
    device: torch.device,
    *,
    compile: bool = False,
) -> Stage:
    """This rank's stage of ``factory()`` (built on meta), on ``device``, holding ``state``'s
    values (a full state dict, on any device; a tied alias may be absent, as in checkpoints);
    ``compile``: each block ``torch.compile``d in place (names unchanged), unless the model is
    one stage, whose forward and loss :class:`~lepton_ray.train.pipeline.PipelineStep` compiles
    as one."""
    with torch.device("meta"):
        model = factory()
    aliases = tied_names(model)
    stage = Stage(model, layout.stage(rank), layout.stages)
    materialise(stage, device)
    own = stage.state_dict()
    for name in own:
        source = name if name in state else aliases.get(name, name)
        if source not in state:
            raise ConfigError(f"pipeline: the model's state has no tensor '{name}'")
        own[name] = state[source]
    stage.load_state_dict(own)
    left = [n for n, b in stage.named_buffers() if b.is_meta]
    if left:
        raise ConfigError(f"pipeline: buffer '{left[0]}' is not in the model's state dict")
    if compile and layout.stages > 1:
        for block in stage.blocks.values():
            block.compile()
    return stage


def tied_names_of(factory: Callable[[], nn.Module]) -> dict[str, str]:
    """:func:`tied_names` of the model ``factory`` builds (on meta: no memory for a factory that
    allocates, as a registered architecture's does)."""
    with torch.device("meta"):
        return tied_names(factory())
