"""Damaged and hostile checkpoints: auto-resume falls back with the reason logged; an explicit
path raises a typed error; nothing outside the checkpoint is read or executed.

Two committed checkpoints (steps 1 and 2) are written; the newest is then damaged in one way per
case. Files: safetensors model, torch optimizer and RNG files, each plain and zstd-compressed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import xxhash

from async_ckpt import CheckpointCorruptError, CheckpointError, CheckpointManager, StateComponent, rng_component
from async_ckpt.layout import MANIFEST_NAME

pytestmark = pytest.mark.timeout(120)
FILES = ["model.safetensors", "optimizer_state.pt", "rng_state.pt"]
STATS = {"checkpoints": 0, "corruptions_caught": 0}


def _job(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    return model, optimizer


def _components(model, optimizer):
    return [StateComponent("model", model, required=True), StateComponent("optimizer", optimizer), rng_component()]


def _two_checkpoints(root: Path, compression: str | None) -> dict:
    """Commit steps 1 and 2; return step 1's model state, which fallback must restore."""
    model, optimizer = _job(1)
    with CheckpointManager(root, _components(model, optimizer), compression=compression) as mgr:
        mgr.save(1).wait()
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1)
        mgr.save(2).wait()
    STATS["checkpoints"] += 2
    return expected


def _resume(root: Path, caplog: pytest.LogCaptureFixture, reason: str, expected: dict) -> None:
    model, optimizer = _job(7)
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        with CheckpointManager(root, _components(model, optimizer)) as mgr:
            result = mgr.load()
            with pytest.raises(CheckpointError) as explicit:
                mgr.load(root / "checkpoint-2")
    assert result is not None and result.step == 1, "auto-resume must fall back to checkpoint-1"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert "skipping damaged checkpoint" in caplog.text and reason in caplog.text
    assert reason in str(explicit.value)
    STATS["corruptions_caught"] += 1


def _name(base: str, compression: str | None) -> str:
    return base + (".zst" if compression else "")


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("base", FILES)
@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_flipped_byte_is_caught(tmp_path: Path, caplog, compression, base: str, where: str) -> None:
    expected = _two_checkpoints(tmp_path, compression)
    name = _name(base, compression)
    path = tmp_path / "checkpoint-2" / name
    data = bytearray(path.read_bytes())
    offset = {"header": 9, "middle": len(data) // 2, "end": len(data) - 1}[where]
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    _resume(tmp_path, caplog, name, expected)


@pytest.mark.parametrize("base", FILES)
def test_truncated_file_is_caught(tmp_path: Path, caplog, base: str) -> None:
    expected = _two_checkpoints(tmp_path, None)
    path = tmp_path / "checkpoint-2" / base
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _resume(tmp_path, caplog, base, expected)


def test_deleted_manifest(tmp_path: Path, caplog) -> None:
    expected = _two_checkpoints(tmp_path, None)
    (tmp_path / "checkpoint-2" / MANIFEST_NAME).unlink()
    _resume(tmp_path, caplog, MANIFEST_NAME, expected)


def _edit_manifest(root: Path, edit) -> None:
    path = root / "checkpoint-2" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_with_wrong_size(tmp_path: Path, caplog) -> None:
    expected = _two_checkpoints(tmp_path, None)
    _edit_manifest(tmp_path, lambda m: m["files"]["optimizer_state.pt"].update(size=m["files"]["optimizer_state.pt"]["size"] + 1))
    _resume(tmp_path, caplog, "Size mismatch", expected)


def test_malformed_manifest_json(tmp_path: Path, caplog) -> None:
    expected = _two_checkpoints(tmp_path, None)
    path = tmp_path / "checkpoint-2" / MANIFEST_NAME
    path.write_text(path.read_text()[:-20])
    _resume(tmp_path, caplog, "Malformed manifest", expected)


def test_verify_off_still_catches_truncation(tmp_path: Path) -> None:
    _two_checkpoints(tmp_path, None)
    path = tmp_path / "checkpoint-2" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    model, optimizer = _job(7)
    with CheckpointManager(tmp_path, _components(model, optimizer), verify_on_load=False) as mgr:
        assert mgr.load().step == 1


# ---------------------------------------------------------------------------------- hostile


def _register(root: Path, name: str, data: bytes, component: str = "optimizer") -> None:
    """Make the manifest of checkpoint-2 vouch for ``name`` with its true size and hash."""

    def edit(manifest: dict) -> None:
        for stale in manifest["components"][component]["files"]:
            manifest["files"].pop(stale, None)
        manifest["files"][name] = {"size": len(data), "xxh3": xxhash.xxh3_64_hexdigest(data), "codec": None, "rank": 0, "component": component, "slot": "global"}
        manifest["components"][component]["files"] = [name]

    _edit_manifest(root, edit)


@pytest.mark.parametrize("name", ["../outside.pt", "/etc/passwd", "sub/dir.pt", "..", "a\x00b.pt"])
def test_manifest_names_escaping_the_checkpoint_are_refused(tmp_path: Path, caplog, name: str) -> None:
    expected = _two_checkpoints(tmp_path, None)
    (tmp_path / "outside.pt").write_bytes(b"secret")
    _register(tmp_path, name, b"secret")
    _resume(tmp_path, caplog, "not a plain file name", expected)


def test_symlink_pointing_outside_is_refused(tmp_path: Path, caplog) -> None:
    expected = _two_checkpoints(tmp_path, None)
    outside = tmp_path / "secret.pt"
    data = (tmp_path / "checkpoint-1" / "optimizer_state.pt").read_bytes()
    outside.write_bytes(data)
    target = tmp_path / "checkpoint-2" / "optimizer_state.pt"
    target.unlink()
    os.symlink(outside, target)
    _register(tmp_path, "optimizer_state.pt", data)
    _resume(tmp_path, caplog, "not a regular file", expected)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path, caplog) -> None:
    expected = _two_checkpoints(tmp_path, None)
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint-2" / "optimizer_state.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Exploit(marker)}, path)
    _register(tmp_path, "optimizer_state.pt", path.read_bytes())
    _resume(tmp_path, caplog, "Refusing to load", expected)
    assert not marker.exists(), "the pickle's code ran"


def test_huge_declared_size_is_refused_before_reading(tmp_path: Path, caplog) -> None:
    expected = _two_checkpoints(tmp_path, None)
    _edit_manifest(tmp_path, lambda m: m["files"]["model.safetensors"].update(size=1 << 50))
    _resume(tmp_path, caplog, "Size mismatch", expected)


def test_newest_damaged_and_no_other_raises_rather_than_starting_fresh(tmp_path: Path) -> None:
    model, optimizer = _job(1)
    with CheckpointManager(tmp_path, _components(model, optimizer)) as mgr:
        mgr.save(1).wait()
    (tmp_path / "checkpoint-1" / "model.safetensors").write_bytes(b"garbage")
    with CheckpointManager(tmp_path, _components(model, optimizer)) as mgr:
        with pytest.raises(CheckpointCorruptError, match="No committed checkpoint under .* verifies"):
            mgr.load()
