"""The one loader: a pipeline YAML, then ``key=value`` overrides, then the typed config.

    load_config("pipelines/configs/mnist.yaml", ["train.epochs=3", ("train.optim.lr", 0.05)])

The pipelines (``--set``, bare ``key=value``), ``lepton-ray train --config`` (its flags become
overrides) and Python all come through here, so a key is spelled, checked and reported the same
way everywhere: ``unknown key 'train.epoch' in the overrides (known there: ...)``,
``train.optim.momentum: expected a number, got 'abc'``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lepton_ray.config.pipeline import PipelineConfig, smoke
from lepton_ray.config.schema import from_dict
from lepton_ray.errors import ConfigError, one_line

Override = str | tuple[str, Any]
"""``"train.epochs=3"`` (the value read as YAML) or ``("train.epochs", 3)`` (already typed)."""


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=3`` -> ``("train.epochs", 3)``; the value is read as YAML (3, 0.1, true,
    [a, b], null), except that ``2:1:0`` stays a string (YAML 1.1 reads it as a base-60 number)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key.path=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, int | float) and ":" in value:
        parsed = value
    return key.strip(), parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``raw`` with each dotted key set (intermediate sections are created; a scalar in
    the way is replaced, and the typed config then says what the section expects)."""
    out = copy.deepcopy(raw)
    for key, value in overrides:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


def unknown_key(cls: type, data: Any, prefix: str = "") -> str | None:
    """The dotted path of the first key in ``data`` that ``cls`` (recursively) does not have."""
    if not isinstance(data, dict):
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        path = f"{prefix}{key}"
        if key not in fields:
            return path
        sub = _section(fields[key])
        if sub is not None and isinstance(data[key], dict):
            found = unknown_key(sub, data[key], path + ".")
            if found:
                return found
    return None


def _section(f: dataclasses.Field) -> type | None:
    """The config class a field holds (a nested section, or a dict checked against a class)."""
    if "schema" in f.metadata:
        return f.metadata["schema"]()
    factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def _known_at(cls: type, path: str) -> str:
    """The field names valid at the parent of ``path``."""
    for part in path.split(".")[:-1]:
        f = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        cls = _section(f) if f else None
        if cls is None:
            return ""
    return ", ".join(f.name for f in dataclasses.fields(cls))


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A pipeline YAML file as a dict; a missing file, bad YAML or a non-mapping is one line."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[Override] = (),
    *,
    smoke_test: bool = False,
) -> PipelineConfig:
    """Read a pipeline YAML (none: all defaults), apply the overrides, check every key and value,
    and build the typed config; with ``smoke_test`` (or ``smoke_test: true`` in the file) its
    cheap version, keeping what the overrides set. Every mistake is one :class:`ConfigError` line."""
    raw = read_yaml(path) if path is not None else {}
    pairs = [parse_override(o) if isinstance(o, str) else tuple(o) for o in overrides]
    merged = apply_overrides(raw, pairs)
    for where, data in ((f" in {path}", raw), (" in the overrides", merged)):
        bad = unknown_key(PipelineConfig, data)
        if bad:
            known = _known_at(PipelineConfig, bad)
            raise ConfigError(
                f"unknown key '{bad}'{where}" + (f" (known there: {known})" if known else "")
            )
    cfg = from_dict(PipelineConfig, merged, root="")
    if smoke_test or cfg.smoke_test:
        cfg = smoke(cfg, keep={k for k, _ in pairs})
    return cfg
