"""What a checkpoint may make this process run: the check made before any import.

A checkpoint's ``lepton.json`` names its architecture, and whoever wrote the checkpoint wrote that
name (the manifest's checksums are theirs too, so they prove nothing about intent). A spec of
``{"class": "os:system", "kwargs": {"command": "..."}}`` would run a command if loading imported
and called whatever it names. So loading builds only:

- a registered architecture, ``{"name": "cnn", "kwargs": {...}}`` (see :mod:`lepton_ray.models`);
- or ``{"class": "pkg.module:Class", "kwargs": {...}}`` where ``pkg.module`` is a module the
  operator trusts, by exact name or by a dotted prefix (``mypkg`` trusts ``mypkg.nets``), and the
  class is an ``nn.Module`` subclass defined in a trusted module (checked after the import of the
  trusted module, before the call).

The trusted modules are the ``trusted_modules=`` of the call (``load_model``, ``ServeConfig``),
plus ``$LEPTON_TRUSTED_MODULES`` (comma-separated), plus ``lepton_ray.models``; nothing else by
default. Keyword arguments are JSON scalars or lists of them (nested at most 8 deep), under
public identifier names: no dicts, no objects, nothing a constructor could be tricked into calling.

This module imports neither torch nor anything the spec names, so a spec is refused, in one line,
before any of its code can run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from lepton_ray.errors import CheckpointError

TRUSTED_ENV = "LEPTON_TRUSTED_MODULES"
BUILT_IN_MODULES = ("lepton_ray.models",)
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# Class path parts: public identifiers only, so no walk through __init__, __globals__, ...
_QUALNAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")
_KWARG = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_SCALARS = (str, int, float, bool, type(None))


def trusted_modules(extra: Iterable[str] | str | None = ()) -> tuple[str, ...]:
    """The modules a checkpoint's class may come from: ``extra`` (a list or a comma-separated
    string), ``$LEPTON_TRUSTED_MODULES`` and the built-ins. Each must be a dotted module name."""
    if isinstance(extra, str):
        extra = extra.split(",")
    names = [*(extra or ()), *os.environ.get(TRUSTED_ENV, "").split(","), *BUILT_IN_MODULES]
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if not _MODULE.fullmatch(name):
            raise CheckpointError(
                f"trusted module {name!r} is not a dotted module name (e.g. mypkg.models)"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def is_trusted(module: str, trusted: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``trusted`` or inside one (``a.b`` trusts ``a.b.c``)."""
    return any(module == t or module.startswith(t + ".") for t in trusted)


def check_spec(spec: Any, trusted: Iterable[str] | str | None = ()) -> tuple[str, str | None]:
    """Refuse (one-line :class:`CheckpointError`) a model spec that loading must not act on.

    Returns ``("name", None)`` for a registered-architecture spec (the registry says whether the
    name exists) or ``(module, qualname)`` for a class spec whose module is trusted. Imports
    nothing: the class itself is checked by :func:`lepton_ray.models.from_spec` after import.
    """
    if not isinstance(spec, dict):
        raise CheckpointError(f"model spec must be a JSON object, got {type(spec).__name__}")
    unknown = set(spec) - {"name", "class", "kwargs"}
    if unknown or ("name" in spec) == ("class" in spec):
        raise CheckpointError(
            'model spec must have exactly one of "name" or "class", and "kwargs" '
            f"(got keys {sorted(spec)})"
        )
    check_kwargs(spec.get("kwargs", {}))
    if "name" in spec:
        if not isinstance(spec["name"], str):
            raise CheckpointError(f"model spec name must be a string, got {spec['name']!r}")
        return "name", None
    path = spec["class"]
    module, sep, qualname = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not sep or not _MODULE.fullmatch(module) or not _QUALNAME.fullmatch(qualname):
        raise CheckpointError(
            f"model class {path!r} is not of the form 'pkg.module:Class' (public names only)"
        )
    allowed = trusted_modules(trusted)
    if not is_trusted(module, allowed):
        raise CheckpointError(
            f"refusing model class {path!r}: module '{module}' is not trusted (trust it with "
            f"trusted_modules=['{module.split('.')[0]}'] or ${TRUSTED_ENV}, only if you trust "
            "whoever wrote the checkpoint)"
        )
    return module, qualname


def check_kwargs(kwargs: Any) -> None:
    """Keyword arguments of a spec: identifier names, JSON scalars or (nested) lists of them."""
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"model kwargs must be a JSON object, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not _KWARG.fullmatch(key):
            raise CheckpointError(f"model kwarg name {key!r} is not a public identifier")
        if not _plain(value):
            raise CheckpointError(
                f"model kwarg '{key}' must be a JSON scalar or a list of them, "
                f"got {type(value).__name__}"
            )


def _plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, list):
        return depth < 8 and all(_plain(v, depth + 1) for v in value)
    return isinstance(value, _SCALARS)
