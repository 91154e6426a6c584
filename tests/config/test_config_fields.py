"""Every declared config field is read by the package: a key that goes nowhere fails here.

A field counts as read when the package source (``meljax/**/*.py``, parsed, not grepped) has an
attribute access ``.<field>`` or the string ``"<field>"`` inside code that can run: module or
class level, or a function whose name the package references somewhere (so a helper that only
tests call does not count; that is how ``algorithm.adv_eps`` went nowhere). Reads inside
``__post_init__`` (validation) and the ``option(...)`` declarations themselves do not count.
Names are matched by spelling, not by type, so this catches a field no code names at all or
names only in dead code, not one whose name another object happens to share.
"""

from __future__ import annotations

import ast
import dataclasses
from collections import Counter
from pathlib import Path

import meljax
from meljax.config.schema import config_key
from meljax.config.settings import SCHEMA, base_config

PACKAGE = Path(meljax.__file__).parent

# Fields read only by name through a mapping (``dataclasses.asdict`` / ``getattr`` over the
# field list), never as ``.field``. Each entry: (config key, where it is consumed).
CONSUMED_BY_NAME: dict[str, str] = {}

# Fields read nowhere yet, each with its reason. Keep this empty: wire the field up, or remove
# it from the schema (saying so in the CHANGELOG).
KNOWN_DEAD: dict[str, str] = {}

_SKIPPED_FUNCTIONS = {"__post_init__"}  # validation only: a check is not a use


def _is_option_call(node: ast.AST) -> bool:
    func = getattr(node, "func", None)
    return isinstance(node, ast.Call) and (
        (isinstance(func, ast.Name) and func.id == "option")
        or (isinstance(func, ast.Attribute) and func.attr == "option")
    )


class _Reads(ast.NodeVisitor):
    """Names read (attributes and string constants) per enclosing function, and references."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.reads: list[tuple[str, str | None]] = []  # (name, innermost function or None)
        self.references: Counter[str] = Counter()  # Name / Attribute uses of every identifier

    def _function(self, node) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Call(self, node: ast.Call) -> None:
        if _is_option_call(node):  # a declaration: its default, help and key are not reads
            self.visit(node.func)
            return
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.references[node.attr] += 1
        self.reads.append((node.attr, self.stack[-1] if self.stack else None))
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self.references[node.id] += 1

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value.isidentifier():
            self.reads.append((node.value, self.stack[-1] if self.stack else None))


def _package_reads() -> set[str]:
    """Names read by code that can run (see the module docstring)."""
    visitor = _Reads()
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))

    def live(function: str | None) -> bool:
        if function is None:
            return True
        if function in _SKIPPED_FUNCTIONS:
            return False
        return function.startswith("__") or visitor.references[function] > 0

    return {name for name, function in visitor.reads if live(function)}


def _declared_fields() -> dict[str, str]:
    """``{config key: dataclass field name}`` of every field ``base_config()`` holds."""
    out = {}
    for section, cls in SCHEMA:
        for f in dataclasses.fields(cls):
            key = config_key(section, f)
            if key is not None:
                out[key] = f.name
    return out


def _leaf_keys(node, prefix: str = "") -> set[str]:
    out = set()
    for k in list(node.keys()):  # noqa: SIM118 (a ConfigDict iterates differently)
        v = node[k]
        out |= _leaf_keys(v, f"{prefix}{k}.") if hasattr(v, "keys") else {f"{prefix}{k}"}
    return out


def test_every_config_leaf_is_a_declared_field():
    assert _leaf_keys(base_config()) == set(_declared_fields())


def test_every_declared_config_field_is_read_somewhere():
    reads = _package_reads()
    allowed = set(CONSUMED_BY_NAME) | set(KNOWN_DEAD)
    dead = sorted(
        f"{key} (field {name})"
        for key, name in _declared_fields().items()
        if name not in reads and key not in allowed
    )
    assert not dead, f"config fields read by no code that runs: {dead}"


def test_the_allow_lists_name_declared_fields():
    declared = _declared_fields()
    assert set(CONSUMED_BY_NAME) <= set(declared) and set(KNOWN_DEAD) <= set(declared)


def test_known_dead_fields_are_still_dead():
    # A field wired up since it was listed must leave KNOWN_DEAD, so the list stays true.
    reads = _package_reads()
    fields = _declared_fields()
    revived = sorted(key for key in KNOWN_DEAD if fields[key] in reads)
    assert not revived, f"read now, remove from KNOWN_DEAD: {revived}"


def test_the_check_sees_a_field_read_only_by_dead_code():
    # The shape of the adv_eps bug: a read inside a helper nothing in the package calls.
    tree = ast.parse(
        "def only_tests_call_me(cfg):\n    return cfg.lonely_field\n"
        "def used(cfg):\n    return cfg.busy_field\n"
        "x = used\n"
    )
    visitor = _Reads()
    visitor.visit(tree)
    live = {n for n, fn in visitor.reads if fn is None or visitor.references[fn] > 0}
    assert "busy_field" in live and "lonely_field" not in live
