"""async_ckpt.rundir: stage, publish, replace, delete through a trash name, recover, on real directories.

Removal failures are real: a tmpfs mounted inside the tree (``rmdir`` of a mount point fails
with EBUSY) when the tests run as root, a read-only directory otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from async_ckpt import faults, rundir
from async_ckpt.layout import list_committed, list_leftovers


def _make(root: Path, name: str, content: bytes = b"x") -> Path:
    path = root / name
    path.mkdir()
    (path / "model.safetensors").write_bytes(content)
    (path / "sub").mkdir()
    (path / "sub" / "f").write_bytes(content)
    return path


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    faults.disarm()


@contextlib.contextmanager
def _undeletable(directory: Path) -> Iterator[None]:
    """While inside, ``directory/sub`` cannot be removed, for real, wherever a rename moves it."""
    sub = directory / "sub"
    root = os.geteuid() == 0
    if root:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(sub)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        (sub / "pinned").write_bytes(b"x")
    else:
        sub.chmod(0o500)
    try:
        yield
    finally:
        for moved in directory.parent.glob("*/sub"):
            if root and os.path.ismount(moved):
                subprocess.run(["umount", str(moved)], check=False)
            elif not root:
                moved.chmod(0o700)


# ------------------------------------------------------------------------------ stage and publish


def test_stage_creates_once_and_needs_the_run_directory(tmp_path):
    staging = tmp_path / ".checkpoint-1.staging-a-0"
    rundir.stage(staging, 0)
    rundir.stage(staging, 1)  # a second rank of the same save
    assert staging.is_dir()
    with pytest.raises(FileNotFoundError):
        rundir.stage(tmp_path / "gone" / ".checkpoint-1.staging-a-0", 0)
    assert not (tmp_path / "gone").exists()


def test_publish_new_directory(tmp_path):
    staging = _make(tmp_path, ".checkpoint-1.staging-a", b"new")
    rundir.publish(staging, tmp_path / "checkpoint-1")
    assert (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_publish_replaces_existing_directory(tmp_path):
    _make(tmp_path, "checkpoint-1", b"old")
    (tmp_path / "checkpoint-1" / "only_in_old.pt").write_bytes(b"stale")
    staging = _make(tmp_path, ".checkpoint-1.staging-a", b"new")
    rundir.publish(staging, tmp_path / "checkpoint-1")
    final = tmp_path / "checkpoint-1"
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "sub"]
    assert (final / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_a_replace_whose_second_rename_fails_puts_the_old_checkpoint_back(tmp_path):
    _make(tmp_path, "checkpoint-1", b"old")
    staging = _make(tmp_path, ".checkpoint-1.staging-a", b"new")
    faults.arm("mid_replace", lambda point, rank: os.rename(staging, tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError):
        rundir.publish(staging, tmp_path / "checkpoint-1")
    assert (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes() == b"old"
    assert list_leftovers(tmp_path) == []


def test_a_crash_mid_replace_is_undone_by_recovery(tmp_path):
    """Killed between the two renames: no checkpoint-1 for a moment; recovery puts the old one back."""
    _make(tmp_path, "checkpoint-1", b"old")
    staging = _make(tmp_path, ".checkpoint-1.staging-a", b"new")
    faults.arm("mid_replace", lambda point, rank: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        rundir.publish(staging, tmp_path / "checkpoint-1")
    assert list_committed(tmp_path) == []
    assert rundir.recover(tmp_path) == [staging]
    assert (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_a_replaced_checkpoint_that_cannot_be_removed_is_logged_and_retried(tmp_path, caplog):
    _make(tmp_path, "checkpoint-1", b"old")
    staging = _make(tmp_path, ".checkpoint-1.staging-a", b"new")
    with _undeletable(tmp_path / "checkpoint-1"):
        with caplog.at_level(logging.ERROR, "async_ckpt.rundir"):
            rundir.publish(staging, tmp_path / "checkpoint-1")  # committed all the same
        assert "committed, but the checkpoint it replaced stays on disk" in caplog.text
        (left,) = list_leftovers(tmp_path)
        assert left.kind == "replaced"
        assert rundir.retry_trash(tmp_path) == []
    assert rundir.retry_trash(tmp_path) == [left.path]
    assert (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


# ------------------------------------------------------------------------------ delete


def test_delete_leaves_no_partial_dir(tmp_path):
    _make(tmp_path, "checkpoint-3")
    _make(tmp_path, "checkpoint-4")
    rundir.delete(tmp_path, 3)
    assert list_leftovers(tmp_path) == []
    assert [s for s, _ in list_committed(tmp_path)] == [4]


def test_delete_renames_before_deleting(tmp_path):
    """Killed during the file deletions: no checkpoint-3 remains, its files sit under a trash name."""
    _make(tmp_path, "checkpoint-3", b"complete")
    faults.arm("mid_delete", lambda point, rank: (_ for _ in ()).throw(KeyboardInterrupt("killed mid-delete")))
    with pytest.raises(KeyboardInterrupt):
        rundir.delete(tmp_path, 3)
    assert not (tmp_path / "checkpoint-3").exists()
    (left,) = list_leftovers(tmp_path)
    assert left.kind == "deleting" and left.step == 3
    assert (left.path / "model.safetensors").read_bytes() == b"complete"
    faults.disarm()
    assert rundir.recover(tmp_path) == [left.path]
    assert list(tmp_path.iterdir()) == []


def test_delete_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        rundir.delete(tmp_path, 1)


def test_a_deletion_that_fails_raises_and_keeps_its_trash(tmp_path):
    _make(tmp_path, "checkpoint-3")
    with _undeletable(tmp_path / "checkpoint-3"):
        with pytest.raises(OSError, match="could not remove .*checkpoint-3.deleting-"):
            rundir.delete(tmp_path, 3)
        assert list_committed(tmp_path) == []
        (left,) = list_leftovers(tmp_path)
        assert left.kind == "deleting"
        assert (left.path / "sub").is_dir()


def test_remove_tree_of_a_missing_tree_is_not_an_error(tmp_path):
    rundir.remove_tree(tmp_path / "never-there")


def test_retry_trash_removes_trash_and_never_staging(tmp_path):
    _make(tmp_path, "checkpoint-5")
    deleting = _make(tmp_path, ".checkpoint-1.deleting-a")
    replaced = _make(tmp_path, ".checkpoint-5.replaced-b")
    orphan = _make(tmp_path, ".checkpoint-6.replaced-c")  # no checkpoint-6: recovery's to restore, not to delete
    staging = _make(tmp_path, ".checkpoint-7.staging-run-3")
    assert sorted(rundir.retry_trash(tmp_path)) == sorted([deleting, replaced])
    assert orphan.is_dir() and staging.is_dir()


def test_delete_all(tmp_path):
    for step in (1, 5, 9):
        _make(tmp_path, f"checkpoint-{step}")
    staging = _make(tmp_path, ".checkpoint-10.staging-run-0")
    assert rundir.delete_all(tmp_path) == [1, 5, 9]
    assert list_committed(tmp_path) == [] and staging.is_dir()


# ------------------------------------------------------------------------------ recover


def test_recover_removes_staging_and_deleting(tmp_path):
    _make(tmp_path, "checkpoint-1")
    staging = _make(tmp_path, ".checkpoint-9.staging-abc")
    deleting = _make(tmp_path, ".checkpoint-1.deleting-def")
    assert sorted(rundir.recover(tmp_path)) == sorted([staging, deleting])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes() == b"x"


def test_recover_restores_replaced_when_committed_name_missing(tmp_path):
    _make(tmp_path, ".checkpoint-5.replaced-abc", b"old complete")
    _make(tmp_path, ".checkpoint-5.staging-def", b"new")
    assert [r.action for r in rundir.plan_recovery(tmp_path)] == ["restore", "remove"]
    assert rundir.recover(tmp_path) == [tmp_path / ".checkpoint-5.staging-def"]
    assert (tmp_path / "checkpoint-5" / "model.safetensors").read_bytes() == b"old complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_recover_removes_replaced_when_committed_name_present(tmp_path):
    _make(tmp_path, "checkpoint-5", b"new complete")
    replaced = _make(tmp_path, ".checkpoint-5.replaced-abc", b"old")
    assert rundir.recover(tmp_path) == [replaced]
    assert (tmp_path / "checkpoint-5" / "model.safetensors").read_bytes() == b"new complete"


def test_recover_keeps_own_token(tmp_path):
    mine = _make(tmp_path, ".checkpoint-9.staging-run1-0")
    mine2 = _make(tmp_path, ".checkpoint-10.staging-run1-1")
    other = _make(tmp_path, ".checkpoint-9.staging-run2-0")
    assert rundir.recover(tmp_path, keep_token="run1") == [other]
    assert mine.is_dir() and mine2.is_dir() and not other.exists()


def test_recover_of_missing_or_clean_dir(tmp_path):
    assert rundir.recover(tmp_path / "nope") == []
    _make(tmp_path, "checkpoint-1")
    (tmp_path / "notes.txt").write_text("user file")
    assert rundir.recover(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "notes.txt"]


def test_a_leftover_recovery_cannot_remove_is_logged_and_the_rest_goes_on(tmp_path, caplog):
    stuck = _make(tmp_path, ".checkpoint-1.staging-a")
    other = _make(tmp_path, ".checkpoint-2.staging-b")
    (other / "sub" / "f").unlink()
    (other / "sub").rmdir()
    with _undeletable(stuck):
        with caplog.at_level(logging.ERROR, "async_ckpt.rundir"):
            assert rundir.recover(tmp_path) == [other]
        assert "could not remove leftover" in caplog.text and stuck.name in caplog.text
    assert rundir.recover(tmp_path) == [stuck]  # retried at the next start
    assert list(tmp_path.iterdir()) == []


def test_a_kill_mid_recovery_is_finished_by_the_next_recovery(tmp_path):
    _make(tmp_path, ".checkpoint-5.replaced-abc", b"old")
    _make(tmp_path, ".checkpoint-5.staging-def")
    _make(tmp_path, ".checkpoint-6.staging-ghi")
    faults.arm("mid_recover", lambda point, rank: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        rundir.recover(tmp_path)
    faults.disarm()
    rundir.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    assert (tmp_path / "checkpoint-5" / "model.safetensors").read_bytes() == b"old"
