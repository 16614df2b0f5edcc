"""The package's shape: stages import only stages below them, no import cycle, the core
imports no transport, and no module outgrows one purpose.

Every import statement counts, the ones inside functions too: a function-level import is
still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "relay"

#: Stages from the bottom up; a module may import its own stage and the ones before it.
STAGES = [
    ("relay", "relay.errors", "relay.log", "relay.config"),
    ("relay.spool",),
    ("relay.store",),
    ("relay.delivery",),
    ("relay.ses",),
    ("relay.feedback",),
    ("relay.ingress",),
    ("relay.sandbox",),
    ("relay.ops",),
    ("relay.service",),
    ("relay.ops.cli", "relay.__main__"),
]
#: Libraries that speak to the network: only the adapters may import them.
TRANSPORTS = ("aiosmtpd", "aioboto3", "aiobotocore", "botocore", "boto3", "aiohttp")
#: The adapters; every other module is core and must reach no transport, not even
#: through the relay modules it imports.
ADAPTERS = ("relay.ingress", "relay.ses", "relay.feedback.sqs", "relay.feedback.sns",
            "relay.feedback.thread", "relay.sandbox", "relay.ops", "relay.service",
            "relay.__main__")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module name an import statement in the file names, at any depth."""
    found: set[str] = set()
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            # `from relay.ingress import headers` names the module relay.ingress.headers
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {i for i in imports(path) if i in modules and i != name}
        edges[name] |= {i for i in imports(path) if i.startswith(TRANSPORTS)}
    return edges


def stage(module: str) -> int:
    best, rank = -1, -1
    for index, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank >= 0, f"{module} belongs to no stage: add it to STAGES"
    return rank


def relay_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {i for i in deps if i.startswith("relay")} for m, deps in edges.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_a_stage_above_its_own():
    edges = relay_edges(graph())
    upward = [f"{m} imports {i}" for m, deps in sorted(edges.items()) for i in sorted(deps)
              if stage(i) > stage(m)]
    assert upward == []


def test_no_import_cycle_even_through_function_level_imports():
    assert cycles(relay_edges(graph())) == []


def test_core_modules_reach_no_transport_even_indirectly():
    edges = graph()
    bad = []
    for module in sorted(edges):
        if module.startswith(ADAPTERS):
            continue
        seen, todo = {module}, [module]
        while todo:
            for dep in edges.get(todo.pop(), ()):
                if dep.startswith(TRANSPORTS):
                    bad.append(f"{module} reaches {dep}")
                elif dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
    assert bad == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=module_name)
def test_no_module_is_over_450_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines: split it by purpose"


def test_the_checks_see_a_cycle_an_upward_import_and_a_transport():
    """The walkers above, on a made-up graph: each finds what it looks for."""
    made_up = {"relay.spool.a": {"relay.ingress.b"}, "relay.ingress.b": {"relay.spool.a"}}
    assert cycles(made_up) == [["relay.ingress.b", "relay.spool.a"]]
    assert stage("relay.ingress.b") > stage("relay.spool.a")
    assert "aiosmtpd.smtp" in imports(PACKAGE / "ingress" / "session.py")
