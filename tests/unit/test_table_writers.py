"""One writer per table: each model is inserted, updated, deleted or constructed in exactly
one module of the relay; everyone else asks that module (reads are free)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "relay"

#: model -> (table, the module that writes it)
WRITERS = {
    "Suppression": ("suppressions", "relay.store.suppression"),
    "BounceCount": ("bounce_counts", "relay.store.suppression"),
    "MessageRow": ("messages", "relay.store.messages"),
    "FeedbackEvent": ("feedback_events", "relay.store.feedback_events"),
    "StateRow": ("relay_state", "relay.feedback.guard"),
    "RateSlot": ("rate_slots", "relay.store.budget"),
}
WRITES = ("insert", "update", "delete")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def writes(path: Path) -> set[str]:
    """Models the file writes: Model(...), insert/update/delete(Model), session.merge(...)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        called = _name(node.func)
        if called in WRITERS:
            found.add(called)
        elif called in WRITES and node.args and _name(node.args[0]) in WRITERS:
            found.add(_name(node.args[0]))
    return found


def writers() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {model: set() for model in WRITERS}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts or path.name == "db.py":
            continue
        for model in writes(path):
            out[model].add(module_name(path))
    return out


@pytest.mark.parametrize("model", sorted(WRITERS))
def test_each_table_has_one_writer(model):
    table, owner = WRITERS[model]
    assert writers()[model] == {owner}, f"{table} must be written only by {owner}"


def test_every_model_is_listed():
    source = (PACKAGE / "store" / "db.py").read_text()
    models = {n.name for n in ast.walk(ast.parse(source))
              if isinstance(n, ast.ClassDef) and any(_name(b) == "Base" for b in n.bases)}
    assert models == set(WRITERS)
