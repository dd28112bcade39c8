"""The import graph points one way (docs/architecture.md): the libraries (losses, data,
sharding) never reach up into train or cli, nothing imports the cli, the config is a leaf, and
jaxpo.train has no import cycle and no function-local jaxpo imports hiding one."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxpo")


def _modules() -> dict[str, str]:
    """Module name → file path for every module of the jaxpo package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: str) -> list[tuple[str, bool]]:
    """``(imported jaxpo module, at module level)`` for every import in ``path``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("jaxpo"):
                # "from jaxpo.train import loop" names the module jaxpo.train.loop
                found.append((name if name in MODULES else name.rsplit(".", 1)[0],
                              id(node) in top))
    return [(m, t) for m, t in found if m in MODULES]


GRAPH = {mod: sorted({m for m, _ in _imports(path)} - {mod}) for mod, path in MODULES.items()}


@pytest.mark.parametrize("library", ["jaxpo.losses", "jaxpo.data", "jaxpo.sharding"])
def test_libraries_import_nothing_from_train_or_cli(library):
    for mod, deps in GRAPH.items():
        if mod == library or mod.startswith(library + "."):
            bad = [d for d in deps if d.startswith(("jaxpo.train", "jaxpo.cli", "jaxpo.demo"))]
            assert not bad, f"{mod} imports {bad}"


def test_losses_import_nothing_else_from_jaxpo():
    for mod, deps in GRAPH.items():
        if mod.startswith("jaxpo.losses"):
            assert all(d.startswith("jaxpo.losses") for d in deps), (mod, deps)


def test_config_is_a_leaf():
    assert GRAPH["jaxpo.config"] == []


def test_nothing_imports_the_cli():
    users = [mod for mod, deps in GRAPH.items() if "jaxpo.cli" in deps]
    assert users == ["jaxpo.__main__"], users  # `python -m jaxpo` is the command itself


def test_train_has_no_import_cycle():
    train = {m: [d for d in deps if d.startswith("jaxpo.train.")]
             for m, deps in GRAPH.items() if m.startswith("jaxpo.train.")}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in train[m]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in train:
        if m not in state:
            visit(m, [m])


def test_no_function_local_jaxpo_imports_in_train_cli_or_demo():
    for mod, path in MODULES.items():
        if mod.startswith(("jaxpo.train", "jaxpo.cli", "jaxpo.demo")):
            local = [m for m, top in _imports(path) if not top]
            assert not local, f"{mod} imports {local} inside a function"


def test_the_graph_check_sees_real_edges():
    """Guards the test itself: known edges are found."""
    assert "jaxpo.train.setup" in GRAPH["jaxpo.train.loop"]
    assert "jaxpo.config" in GRAPH["jaxpo.train.setup"]
    assert "jaxpo.demo" in GRAPH["jaxpo.cli"]
