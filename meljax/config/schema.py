"""Config fields declared once: dataclass fields carry their help text, choices and limits.

Each settings dataclass (``LossConfig``, ``MetaConfig``, ``OptimizerConfig``, ``RewardConfig``,
``EvalConfig``, ``PromptConfig``, ...) declares its fields with :func:`option`. The training
``ConfigDict`` is built from them (:func:`build_config`), validated by constructing them
(:func:`from_section`), and the trainer builds its dataclasses from it the same way: there is
no second list of fields, defaults or choices to keep in sync.

A field's config key is ``<section>.<field name>``, always: grepping a key finds its field. A
``derived`` field is not a config key: :func:`meljax.config.settings.settings` computes it from
other keys (``LossConfig.use_mel`` from ``mel.enabled``) and passes it in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    derived: str | None = None,
) -> Any:
    """A dataclass field with its documentation and checks.

    Args:
      default: the default (immutable: numbers, strings, tuples, ``None`` only for derived).
      help: what the field means (shown by ``python -m meljax.config.settings``).
      choices: the allowed values; minimum: the smallest allowed value.
      derived: why the field is not a config key (it is computed by the trainer).
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "minimum": minimum}
    meta["derived"] = derived
    return dataclasses.field(default=default, metadata=meta)


def _check(value: Any, f: dataclasses.Field, name: str) -> None:
    choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
    if choices and value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name}={value!r} must be at least {minimum}")


def validate_fields(obj: Any) -> None:
    """Checks every field of a dataclass instance against its ``choices`` and ``minimum``."""
    for f in dataclasses.fields(obj):
        _check(getattr(obj, f.name), f, f"{type(obj).__name__}.{f.name}")


def config_key(section: str, f: dataclasses.Field) -> str | None:
    """The full config path of a field (``None`` for derived fields)."""
    if f.metadata.get("derived"):
        return None
    return f"{section}.{f.name}" if section else f.name


def _items(schema: Sequence[tuple[str, type]]):
    for section, cls in schema:
        for f in dataclasses.fields(cls):
            path = config_key(section, f)
            if path is not None:
                yield path, f


def build_config(schema: Sequence[tuple[str, type]]) -> ml_collections.ConfigDict:
    """The locked ``ConfigDict`` of every non-derived field, with the dataclass defaults."""
    root: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for path, f in _items(schema):
        if path in seen:
            raise ValueError(f"config key {path} is declared twice ({seen[path]} and {f.name})")
        seen[path] = f.name
        node = root
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = f.default
    cfg = ml_collections.ConfigDict(root)
    cfg.lock()
    return cfg


def describe(schema: Sequence[tuple[str, type]]) -> list[str]:
    """``key = default  # help`` for every config field, in declaration order."""
    return [f"{p} = {f.default!r}  # {f.metadata['help']}" for p, f in _items(schema)]


def _get(cfg: Any, path: str) -> Any:
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


def from_section(cls: type, section: str, cfg: Any, **derived: Any) -> Any:
    """Builds ``cls`` from a config (``ConfigDict`` or nested mapping) and its derived values.

    Raises:
      ValueError: ``config: <key>=...`` for a bad choice or range, a derived value missing or
        unknown, or the class's own cross-field checks.
    """
    values = {}
    for f in dataclasses.fields(cls):
        path = config_key(section, f)
        if path is None:
            if f.name not in derived:
                raise ValueError(f"{cls.__name__}.{f.name} is derived and must be given")
            values[f.name] = derived.pop(f.name)
            continue
        value = _get(cfg, path)
        if isinstance(f.default, tuple) and isinstance(value, list):
            value = tuple(value)  # JSON round trip of config.json
        _check(value, f, f"config: {path}")
        values[f.name] = value
    if derived:
        raise ValueError(f"{cls.__name__} has no derived fields {sorted(derived)}")
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"config: {section or 'top level'}: {e}") from None


def check_keys(cfg: Mapping | ml_collections.ConfigDict, schema: Sequence[tuple[str, type]]):
    """Fails on keys of ``cfg`` that no dataclass declares (e.g. an old config.json's)."""
    known = {p for p, _ in _items(schema)}

    def walk(node: Any, prefix: str) -> list[str]:
        out = []
        for k in list(node.keys()):  # noqa: SIM118 (a ConfigDict iterates differently)
            path = f"{prefix}{k}"
            v = node[k]
            if hasattr(v, "keys") and path not in known:
                out += walk(v, path + ".")
            elif path not in known:
                out.append(path)
        return out

    unknown = walk(cfg, "")
    if unknown:
        raise ValueError(f"config: unknown fields {unknown}")
