"""Parameters shared under two names (a GPT's head tied to its token embedding) through the moves
that would untie them: ``Module.to("meta")`` and ``Module.to_empty`` give each name its own
parameter, and so does building a pipeline stage or an FSDP-sharded model from a meta copy.

One rule for both: record ``alias -> first name`` before the move (:func:`tied_names`), then point
every alias at its first name's parameter again (:func:`retie`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def tied_names(model: nn.Module) -> dict[str, str]:
    """alias -> first name of every parameter shared under two names (``head.weight`` ->
    ``tok_emb.weight`` in the GPT)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def retie(model: nn.Module, aliases: dict[str, str]) -> nn.Module:
    """Point each alias of :func:`tied_names` at its first name's parameter (again)."""
    for alias, name in aliases.items():
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(name))
    return model


def materialise(module: nn.Module, device: torch.device) -> nn.Module:
    """``to_empty`` (memory on ``device``, values unset) that keeps tied parameters tied."""
    aliases = tied_names(module)
    module.to_empty(device=device)
    return retie(module, aliases)


def meta_copy(model: nn.Module) -> nn.Module:
    """``model``'s architecture on the meta device (no memory), its tied weights still tied."""
    meta = copy.deepcopy(model)
    aliases = tied_names(meta)
    meta.to("meta")
    return retie(meta, aliases)
