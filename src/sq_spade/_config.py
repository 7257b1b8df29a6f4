"""Configurations saved as JSON beside a model's tensors: dataclasses that check themselves.

A subclass declares its keys as dataclass fields; the type of each field (``int``, ``float``,
``str``, ``bool``, ``list``, ``dict``, a ``Literal`` option set, each optionally ``| None``) and
an optional ``check(...)`` in its metadata are all the validation there is. A field without a
default is required (``None`` counts as missing). Errors name the key.

A config is also a read-and-write mapping over its fields (``model.config["reference_side"]``,
``.get``, ``.items()``, ``dict(config)``), so code that treated configs as dicts keeps working;
unknown keys are refused.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from sq_spade._files import ModelFileError
from sq_spade._serialize import to_jsonable

_KINDS: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}


def check(fn: Callable[[Any], bool]) -> dict[str, Any]:
    """Field metadata adding a value check: ``n: int = field(metadata=check(lambda v: v > 0))``."""
    return {"check": fn}


@dataclass(frozen=True)
class _Rule:
    kind: str
    required: bool
    choices: tuple[Any, ...] | None
    check: Callable[[Any], bool] | None


def _rule(hint: Any, field: dataclasses.Field) -> _Rule:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else hint
    origin = typing.get_origin(hint)
    choices = None
    if origin is Literal:
        choices = typing.get_args(hint)
        kind = "str"
    else:
        kind = _KINDS.get(origin or hint, "any")
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    return _Rule(kind, required, choices, field.metadata.get("check"))


def _kind_ok(kind: str, value: Any) -> bool:
    if kind == "any":
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":  # NaN and infinities are never a setting (json reads `Infinity`)
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list":
        return isinstance(value, (list, tuple))
    return isinstance(value, Mapping)


@dataclass(eq=False, kw_only=True)
class JsonConfig(Mapping):
    """Base of the JSON configurations of models and checkpoints (see the module docstring).

    Examples
    --------
    >>> from dataclasses import dataclass, field
    >>> @dataclass(eq=False, kw_only=True)
    ... class Tiny(JsonConfig):
    ...     n: int = field(metadata=check(lambda v: v > 0))
    ...     note: str | None = None
    >>> Tiny.from_json({"n": 2}).to_json()
    {'n': 2, 'note': None}
    >>> Tiny.from_json({"n": 0})
    Traceback (most recent call last):
    ...
    sq_spade._files.ModelFileError: Config key 'n' has an invalid value 0.
    """

    _rules_cache: ClassVar[dict[type, dict[str, _Rule]]] = {}

    @classmethod
    def _rules(cls) -> dict[str, _Rule]:
        if cls not in JsonConfig._rules_cache:
            hints = typing.get_type_hints(cls)
            JsonConfig._rules_cache[cls] = {f.name: _rule(hints[f.name], f) for f in dataclasses.fields(cls)}
        return JsonConfig._rules_cache[cls]

    @classmethod
    def _check(cls, key: str, value: Any, error: type[Exception]) -> Any:
        rule = cls._rules()[key]
        if value is None:
            if rule.required:
                raise error(f"Config key {key!r} is required.")
            return None
        if not _kind_ok(rule.kind, value):
            if rule.kind == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                raise error(f"Config key {key!r} must be a finite float, got {value!r}.")
            raise error(f"Config key {key!r} must be of type {rule.kind}, got {type(value).__name__}.")
        if (rule.choices is not None and value not in rule.choices) or (rule.check is not None
                                                                         and not rule.check(value)):
            raise error(f"Config key {key!r} has an invalid value {value!r}.")
        if rule.kind == "list" and isinstance(value, tuple):
            return list(value)
        if rule.kind == "dict" and not isinstance(value, dict):
            return dict(value)
        return value

    def __post_init__(self) -> None:
        for key in self._rules():
            object.__setattr__(self, key, self._check(key, getattr(self, key), ValueError))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, error: type[Exception] = ValueError) -> Any:
        """A config from a dict, refusing unknown keys and invalid values with ``error``."""
        if isinstance(values, cls):
            return dataclasses.replace(values)  # a copy: models never share a config
        if not isinstance(values, Mapping):
            raise error(f"`config` must be a JSON object, got {type(values).__name__}.")
        unknown = set(values) - set(cls._rules())
        if unknown:
            raise error(f"Unknown config keys: {sorted(unknown)}.")
        checked = {k: cls._check(k, values.get(k), error) for k in cls._rules()}
        try:
            return cls(**checked)
        except ValueError as e:  # a check across keys in a subclass's __post_init__
            raise error(str(e)) from e

    @classmethod
    def from_json(cls, doc: Any) -> Any:
        """Read a config from its JSON object (a saved ``config.json``); raise :class:`ModelFileError`."""
        return cls.from_mapping(doc, error=ModelFileError)

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON object (what :meth:`from_json` reads back)."""
        return to_jsonable({k: getattr(self, k) for k in self._rules()})

    # --- the mapping view ---------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in self._rules():
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._rules():
            raise KeyError(f"{type(self).__name__} has no key {key!r}; its keys are {list(self._rules())}.")
        object.__setattr__(self, key, self._check(key, value, ValueError))

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules())

    def __len__(self) -> int:
        return len(self._rules())
