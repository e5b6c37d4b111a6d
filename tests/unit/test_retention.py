"""async_ckpt.retention: which checkpoints to delete (pure), deleting them, start-up cleanup."""

from __future__ import annotations

from pathlib import Path

import pytest

from async_ckpt import retention
from async_ckpt.layout import list_committed, list_leftovers
from async_ckpt.retention import apply_retention, clean_leftovers, delete_checkpoint, select_for_deletion


def _make(root: Path, name: str, content: bytes = b"x") -> Path:
    path = root / name
    path.mkdir()
    (path / "model.safetensors").write_bytes(content)
    (path / "sub").mkdir()
    (path / "sub" / "f").write_bytes(content)
    return path


# ------------------------------------------------------------------------------ select_for_deletion


@pytest.mark.parametrize(
    "steps,limit,protected,expected",
    [
        ([1, 2, 3], None, (), []),  # no limit keeps everything
        ([], 2, (), []),
        ([1], 2, (), []),  # under
        ([1, 2], 2, (), []),  # at
        ([1, 2, 3, 4], 2, (), [1, 2]),  # over: oldest first
        ([4, 1, 3, 2], 2, (), [1, 2]),  # input order does not matter
        ([1, 1, 2, 2, 3], 2, (), [1]),  # duplicates counted once
        ([10, 9, 100], 1, (), [9, 10]),  # numeric, not string, order
        ([1, 2, 3, 4], 2, (1,), [2, 3]),  # protected (best) kept, counts toward the limit
        ([1, 2, 3, 4], 2, (1, 2), [3]),  # many protected: all others go, more than limit remain
        ([1, 2, 3, 4], 1, (2,), [1, 3]),
        ([1, 2, 3], 1, (99,), [1, 2]),  # protecting an unknown step changes nothing
        ([5], 1, (), []),
        ([1, 2, 3], 1, (3,), [1, 2]),  # newest already kept
    ],
)
def test_select_for_deletion(steps, limit, protected, expected):
    assert select_for_deletion(steps, limit, protected) == expected


@pytest.mark.parametrize("steps", [[1, 2, 3], list(range(50))])
@pytest.mark.parametrize("limit", [1, 2, 5])
def test_newest_never_deleted(steps, limit):
    # The oldest `limit` steps are protected and count toward the limit, so the newest is over it:
    # only the rule "the newest is always kept" saves it.
    doomed = select_for_deletion(steps, limit, protected=steps[:limit])
    assert doomed == steps[limit:-1]
    assert max(steps) not in doomed
    assert max(steps) not in select_for_deletion(steps, limit)


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_is_an_error(limit):
    with pytest.raises(ValueError, match="at least 1"):
        select_for_deletion([1, 2, 3], limit)


# ------------------------------------------------------------------------------ deleting


def test_apply_retention_on_real_dirs(tmp_path):
    for step in (5, 10, 15, 20, 100):
        _make(tmp_path, f"checkpoint-{step}")
    _make(tmp_path, ".checkpoint-200.staging-abc")  # not committed: not counted, not touched
    assert apply_retention(tmp_path, 2) == [5, 10, 15]
    assert [s for s, _ in list_committed(tmp_path)] == [20, 100]
    assert (tmp_path / ".checkpoint-200.staging-abc").is_dir()
    assert not any(left.kind == "deleting" for left in list_leftovers(tmp_path))


def test_apply_retention_protected_and_none(tmp_path):
    for step in (1, 2, 3, 4):
        _make(tmp_path, f"checkpoint-{step}")
    assert apply_retention(tmp_path, None) == []
    assert apply_retention(tmp_path, 2, protected=[1]) == [2, 3]
    assert [s for s, _ in list_committed(tmp_path)] == [1, 4]


def test_delete_checkpoint_leaves_no_partial_dir(tmp_path):
    _make(tmp_path, "checkpoint-3")
    _make(tmp_path, "checkpoint-4")
    delete_checkpoint(tmp_path, 3)
    assert not (tmp_path / "checkpoint-3").exists()
    assert list_leftovers(tmp_path) == []
    assert [s for s, _ in list_committed(tmp_path)] == [4]


def test_delete_checkpoint_renames_before_deleting(tmp_path, monkeypatch):
    """A crash during the file deletions (simulated: remove_tree dies) leaves no checkpoint-N."""
    _make(tmp_path, "checkpoint-3", b"complete")

    def crash(path):
        raise KeyboardInterrupt("killed mid-delete")

    monkeypatch.setattr(retention, "remove_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        delete_checkpoint(tmp_path, 3)
    assert not (tmp_path / "checkpoint-3").exists()
    (left,) = list_leftovers(tmp_path)
    assert left.kind == "deleting" and left.step == 3
    assert (left.path / "model.safetensors").read_bytes() == b"complete"
    monkeypatch.undo()
    assert clean_leftovers(tmp_path) == [left.path]
    assert list(tmp_path.iterdir()) == []


def test_delete_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        delete_checkpoint(tmp_path, 1)


# ------------------------------------------------------------------------------ clean_leftovers


def test_clean_leftovers_removes_staging_and_deleting(tmp_path):
    _make(tmp_path, "checkpoint-1")
    staging = _make(tmp_path, ".checkpoint-9.staging-abc")
    deleting = _make(tmp_path, ".checkpoint-1.deleting-def")
    removed = clean_leftovers(tmp_path)
    assert sorted(removed) == sorted([staging, deleting])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes() == b"x"


def test_clean_leftovers_restores_replaced_when_committed_name_missing(tmp_path):
    _make(tmp_path, ".checkpoint-5.replaced-abc", b"old complete")
    _make(tmp_path, ".checkpoint-5.staging-def", b"new")
    removed = clean_leftovers(tmp_path)
    assert removed == [tmp_path / ".checkpoint-5.staging-def"]
    assert (tmp_path / "checkpoint-5" / "model.safetensors").read_bytes() == b"old complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_clean_leftovers_removes_replaced_when_committed_name_present(tmp_path):
    _make(tmp_path, "checkpoint-5", b"new complete")
    replaced = _make(tmp_path, ".checkpoint-5.replaced-abc", b"old")
    assert clean_leftovers(tmp_path) == [replaced]
    assert (tmp_path / "checkpoint-5" / "model.safetensors").read_bytes() == b"new complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_clean_leftovers_keeps_own_token(tmp_path):
    mine = _make(tmp_path, ".checkpoint-9.staging-run1-0")
    mine2 = _make(tmp_path, ".checkpoint-10.staging-run1-1")
    other = _make(tmp_path, ".checkpoint-9.staging-run2-0")
    assert clean_leftovers(tmp_path, keep_token="run1") == [other]
    assert mine.is_dir() and mine2.is_dir() and not other.exists()


def test_clean_leftovers_of_missing_or_clean_dir(tmp_path):
    assert clean_leftovers(tmp_path / "nope") == []
    _make(tmp_path, "checkpoint-1")
    (tmp_path / "notes.txt").write_text("user file")
    assert clean_leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "notes.txt"]
