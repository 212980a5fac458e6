"""The machinery behind every config class: types and ranges checked from the annotations.

A config class is a ``@dataclass(kw_only=True, frozen=True)`` subclass of :class:`Config`. Its
annotations say what each field holds (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``X | None``, ``tuple[X, ...]``, ``dict[str, X]``, a nested config); :func:`setting` adds a range
(``gt``/``ge``/``lt``/``le``), a parser, a check or the secret mark, declared once beside the field.
Construction checks every field against that, whether the values came from Python, YAML, ``--set``
or a CLI flag, so there is one set of rules and one wording of errors:

    OptimConfig(momentum="abc")             -> OptimConfig.momentum: expected a number, got 'abc'
    from_dict(PipelineConfig, raw, root="") -> train.optim.momentum: expected a number, got 'abc'

Checks that involve two fields live in the class's :meth:`Config.check`. Nothing here imports
torch, Ray or YAML.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from lepton_ray.errors import ConfigError

_MISSING: Any = dataclasses.MISSING


class FieldError(ConfigError):
    """A bad value: ``owner`` (the config class), ``key`` (dotted, relative to it), ``problem``.

    Printed as ``OptimConfig.momentum: expected a number, got 'abc'``; :func:`from_dict` re-states
    it with the key as the user wrote it (``train.optim.momentum: ...``).
    """

    def __init__(self, owner: str, key: str, problem: str):
        self.owner, self.key, self.problem = owner, key, problem
        super().__init__(f"{owner}.{key}: {problem}")


def setting(
    default: Any = _MISSING,
    *,
    default_factory: Callable[[], Any] = _MISSING,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    parse: Callable[[Any], Any] | None = None,
    check: Callable[[Any], Any] | None = None,
    secret: bool = False,
) -> Any:
    """A dataclass field with its rules: a range every number in the value must meet (a scalar,
    the items of a tuple, the values of a dict), ``parse`` (turns a convenient spelling into the
    annotated type before the type check, e.g. ``"a,b"`` -> ``("a", "b")``), ``check`` (returns
    the value, possibly normalised, or raises ``ValueError`` saying what is wrong) and ``secret``
    (never serialised by :func:`to_dict`, never in ``repr``)."""
    rules = {
        k: v
        for k, v in {"gt": gt, "ge": ge, "lt": lt, "le": le, "parse": parse, "check": check}.items()
        if v is not None
    }
    if secret:
        rules["secret"] = True
    return dataclasses.field(
        default=default, default_factory=default_factory, repr=not secret, metadata=rules
    )


class Config:
    """Base of the config classes: checks every field on construction (see the module docstring)."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            try:
                new = _field_value(value, hints[f.name], f.metadata)
            except FieldError as exc:  # from a nested section: its key below ours
                raise FieldError(owner, f"{f.name}.{exc.key}", exc.problem) from None
            except _Bad as err:
                raise FieldError(owner, f.name + err.sub, str(err)) from None
            if new is not value:
                object.__setattr__(self, f.name, new)
        try:
            self.check()
        except FieldError as exc:
            raise FieldError(owner, exc.key, exc.problem) from None

    def check(self) -> None:
        """Rules that involve more than one field; raise :func:`bad` naming the field."""


def bad(key: str, problem: str) -> FieldError:
    """The error for :meth:`Config.check` to raise; the owner is filled in by the caller."""
    return FieldError("", key, problem)


# --- checking one value against an annotation ------------------------------------------------
class _Bad(Exception):
    """A value that does not fit; ``sub`` locates it inside the field (``[1]``, ``.CPU``)."""

    def __init__(self, problem: str, sub: str = ""):
        super().__init__(problem)
        self.sub = sub


def _field_value(value: Any, tp: Any, rules: typing.Mapping[str, Any]) -> Any:
    try:
        if "parse" in rules and value is not None:
            value = rules["parse"](value)
        value = coerce(value, tp)
        if value is not None:
            _check_range(value, rules)
            if "check" in rules:
                value = rules["check"](value)
    except FieldError:
        raise
    except ValueError as exc:  # from ``parse`` or ``check``: the problem, in their words
        raise _Bad(str(exc)) from None
    return value


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as annotation ``tp`` asks (a list becomes a tuple, an int a float, a dict a
    nested config); raises ``_Bad`` naming what was expected and what came."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise _Bad(f"expected null, got {value!r}")
        return None
    if origin in (Union, types.UnionType):
        return _union(value, args)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise _Bad(f"expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _Bad(f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise _Bad(f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Bad(f"expected a string, got {value!r}")
        return value
    if origin is tuple:
        return _tuple(value, args)
    if origin is dict:
        return _dict(value, args)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _Bad(f"expected a section (a mapping of keys), got {value!r}")
        return from_dict(tp, value, root=None, _nested=True)
    raise TypeError(f"config annotation {tp!r} is not supported by lepton_ray.config.schema")


def mismatch(value: Any, tp: Any) -> str | None:
    """What is wrong with ``value`` as annotation ``tp`` (``expected a whole number, got 'abc'``),
    None if nothing is; raises ``TypeError`` for an annotation this module does not model."""
    try:
        coerce(value, tp)
    except _Bad as err:
        return str(err)
    return None


def _union(value: Any, args: tuple[Any, ...]) -> Any:
    if value is None and type(None) in args:
        return None
    arms = [a for a in args if a is not type(None)]
    if len(arms) == 1:
        return coerce(value, arms[0])
    for arm in arms:
        try:
            return coerce(value, arm)
        except _Bad:
            continue
    raise _Bad(f"expected {' or '.join(describe(a) for a in arms)}, got {value!r}")


def _tuple(value: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise _Bad(f"expected a list, got {value!r}")
    items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
    if len(items) != len(value):
        raise _Bad(f"expected a list of {len(items)} items, got {list(value)!r}")
    out = []
    for i, (item, tp) in enumerate(zip(value, items, strict=True)):
        try:
            out.append(coerce(item, tp))
        except _Bad as err:
            raise _Bad(str(err), f"[{i}]{err.sub}") from None
    return tuple(out)


def _dict(value: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"expected a mapping, got {value!r}")
    key_tp, value_tp = args
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise _Bad(f"expected string keys, got {k!r}")
        try:
            out[k] = coerce(v, value_tp)
        except _Bad as err:
            raise _Bad(str(err), f".{k}{err.sub}") from None
    return out


def describe(tp: Any) -> str:
    """How an error names what a type accepts: ``a whole number``, ``'auto'``, ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural(args[0])}"
        return f"a list of {len(args)} {plural(args[0])}"
    if origin is dict:
        return f"a mapping of {plural(args[1])}"
    names = {
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "a string",
        type(None): "null",
    }
    return names.get(tp, "a section" if dataclasses.is_dataclass(tp) else str(tp))


def plural(tp: Any) -> str:
    return {int: "whole numbers", float: "numbers", str: "strings", bool: "booleans"}.get(
        tp, "values"
    )


def range_text(rules: typing.Mapping[str, Any]) -> str:
    """``> 0``, ``in [0, 1)``, ``>= 1``: how docs and errors state a field's range."""
    lo = ("(", rules["gt"]) if "gt" in rules else ("[", rules["ge"]) if "ge" in rules else None
    hi = (")", rules["lt"]) if "lt" in rules else ("]", rules["le"]) if "le" in rules else None
    if lo and hi:
        return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {_num(lo[1])}"
    if hi:
        return f"{'<' if hi[0] == ')' else '<='} {_num(hi[1])}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_range(value: Any, rules: typing.Mapping[str, Any]) -> None:
    text = range_text(rules)
    if not text:
        return
    for sub, x in _numbers(value, ""):
        ok = (
            ("gt" not in rules or x > rules["gt"])
            and ("ge" not in rules or x >= rules["ge"])
            and ("lt" not in rules or x < rules["lt"])
            and ("le" not in rules or x <= rules["le"])
        )
        if not ok:
            raise _Bad(f"must be {text}, got {_num(x)}", sub)


def _numbers(value: Any, sub: str) -> typing.Iterator[tuple[str, float]]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield sub, value
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{sub}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{sub}.{k}")


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        module = sys.modules[cls.__module__]
        hints = _HINTS[cls] = typing.get_type_hints(cls, vars(module))
    return hints


_HINTS: dict[type, dict[str, Any]] = {}


# --- dicts in and out --------------------------------------------------------------------------
def from_dict(cls: type, data: Any, *, root: str | None = None, _nested: bool = False) -> Any:
    """Build config class ``cls`` from a (YAML or JSON) mapping; nested sections recurse.

    Unknown keys and bad values fail with one line. ``root`` is how the top level is named in
    those lines: ``None`` names the class (``TrainConfig.optim.lr: ...``, for Python callers);
    ``""`` gives the bare dotted key as a YAML file or ``--set`` spells it (``train.optim.lr``).
    """
    name = cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {data!r}")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in known]
    if unknown:
        if _nested:
            raise FieldError(
                name, str(unknown[0]), f"unknown key (known there: {', '.join(known)})"
            )
        raise ConfigError(
            f"unknown key '{unknown[0]}' for {name} (known there: {', '.join(known)})"
        )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.name not in data and f.default is _MISSING and f.default_factory is _MISSING
    ]
    try:
        if missing:
            raise FieldError(name, missing[0], "required")
        return cls(**data)
    except FieldError as exc:
        if _nested:
            raise
        prefix = f"{name}." if root is None else (f"{root}." if root else "")
        raise ConfigError(f"{prefix}{exc.key}: {exc.problem}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config: tuples become lists, and secret fields are left out, so
    that nothing written from a config (``pipeline.json``, a Serve config file, a checkpoint's
    metadata) can hold a token. Fields holding a plain dict checked against a config class
    (``metadata={"schema": ...}``) drop that class's secrets as well."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("secret"):
            continue
        value = getattr(cfg, f.name)
        schema = f.metadata.get("schema")
        if schema is not None and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in secret_fields(schema())}
        out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def secret_fields(cls: type) -> frozenset[str]:
    """Names of the fields of ``cls`` marked ``secret``."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("secret"))
