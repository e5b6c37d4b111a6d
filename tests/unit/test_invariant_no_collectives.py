"""Invariant 5: no collective runs on a process group from a background thread.

The background threads (commit, I/O, overlap copy, the exit drain) run the functions handed to
an executor's ``submit``, a ``Thread(target=...)`` or an exit-hook registration. The list of
modules they can reach is not kept by hand: it is the import closure, inside the package, of the
modules that define those functions. A module of that closure that imports ``torch.distributed``
or calls a collective would break the invariant, and this fails.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "async_ckpt"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier", "reduce",
    "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all", "reduce_scatter", "send", "recv",
    "isend", "irecv",
}  # fmt: skip
HANDOFFS = {"submit", "register", "_register_atexit"}  # calls whose first argument runs on another thread
INITS = {"initializer"}  # executor keywords whose function runs on each pool thread
CLI_PREFIX = "cli"  # the command line runs in its own process, with no training to deadlock


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


@cache
def _tree(name: str) -> ast.Module:
    return ast.parse((SRC / Path(*name.split("."))).with_suffix(".py").read_text())


def _exists(name: str) -> bool:
    return (SRC / Path(*name.split("."))).with_suffix(".py").is_file()


def _typing_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``: imported for annotations, never at run time."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    return skipped


def _runtime_nodes(module: str) -> list[ast.AST]:
    tree = _tree(module)
    skipped = _typing_only(tree)
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """Package modules named by a relative ``from`` import inside ``module``."""
    if node.level == 0:
        return []
    base = module.split(".")[: -node.level]
    target = ".".join([*base, *(node.module.split(".") if node.module else [])])
    found = [target] if target and _exists(target) else []
    found += [f"{target}.{a.name}".lstrip(".") for a in node.names if _exists(f"{target}.{a.name}".lstrip("."))]
    return found


def _imports(module: str) -> dict[str, str]:
    """``{local name: defining package module}`` for the names ``module`` imports from the package."""
    names = {}
    for node in _runtime_nodes(module):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = module.split(".")[: -node.level]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                sub = f"{target}.{alias.name}".lstrip(".")
                names[alias.asname or alias.name] = sub if _exists(sub) else target
    return names


def _handed_off(module: str) -> set[str]:
    """Modules whose functions ``module`` hands to another thread."""
    found, imported = set(), _imports(module)
    for node in _runtime_nodes(module):
        if isinstance(node, ast.Dict):  # executor keyword arguments built as a dict: {"initializer": fn}
            targets = [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value in INITS]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            targets = [kw.value for kw in node.keywords if kw.arg in INITS]
            if called == "Thread":
                targets += [kw.value for kw in node.keywords if kw.arg == "target"]
            elif called in HANDOFFS:
                targets += node.args[:1]
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                found.add(imported.get(target.id, module))
            elif isinstance(target, ast.Attribute):  # self._method, module.function
                owner = target.value.id if isinstance(target.value, ast.Name) else "self"
                found.add(imported.get(owner, module))
    return found


def background_modules() -> list[str]:
    """The import closure of every module that defines a function run by a background thread."""
    modules = [_module_name(p) for p in SRC.rglob("*.py") if not _module_name(p).startswith(CLI_PREFIX)]
    pending = sorted({entry for module in modules for entry in _handed_off(module)})
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        for node in _runtime_nodes(module):
            if isinstance(node, ast.ImportFrom):
                pending.extend(_resolve(module, node))
    return sorted(seen)


def test_the_closure_holds_the_known_background_modules() -> None:
    """A sanity check on the derivation itself: the writer and commit path is found."""
    found = set(background_modules())
    assert {"saving", "staging", "draining", "serialization", "torchfile", "manifest", "config"} <= found, found
    assert "manager" not in found and "coordination" not in found and "validation" not in found


@pytest.mark.parametrize("name", background_modules())
def test_background_modules_never_touch_a_process_group(name: str) -> None:
    for node in _runtime_nodes(name):
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("torch.distributed") for a in node.names), f"{name} imports torch.distributed"
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("torch.distributed"), f"{name} imports from {node.module}"
        if (
            isinstance(node, ast.Attribute)
            and node.attr in COLLECTIVES
            and isinstance(node.value, ast.Name)
            and node.value.id in ("dist", "distributed")
        ):
            pytest.fail(f"{name} calls the collective {node.value.id}.{node.attr}")
