"""Invariant 5: no collective runs on a process group from a background thread.

The background threads (commit, I/O, overlap copy) run only the code of the modules below; they
talk to other ranks through the c10d Store (``store_channel.CommitChannel``). A module of that list that
imports ``torch.distributed`` or calls a collective would break the invariant, and this fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "async_ckpt"
BACKGROUND = ["saving.py", "store_channel.py", "rundir.py", "ownership.py", "storage.py", "serialization.py", "torchfile.py", "config.py", "manifest.py", "retention.py", "layout.py", "staging.py", "handle.py", "faults.py", "draining.py"]
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier", "reduce",
    "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all", "reduce_scatter", "send", "recv", "isend", "irecv",
}


@pytest.mark.parametrize("name", BACKGROUND)
def test_background_modules_never_touch_a_process_group(name: str) -> None:
    tree = ast.parse((SRC / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("torch.distributed") for a in node.names), f"{name} imports torch.distributed"
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("torch.distributed"), f"{name} imports from {node.module}"
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and isinstance(node.value, ast.Name) and node.value.id in ("dist", "distributed"):
            pytest.fail(f"{name} calls the collective {node.value.id}.{node.attr}")
