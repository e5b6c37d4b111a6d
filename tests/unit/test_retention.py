"""async_ckpt.retention: which checkpoints to delete (pure), and deleting them through rundir."""

from __future__ import annotations

from pathlib import Path

import pytest

from async_ckpt.layout import list_committed, list_leftovers
from async_ckpt.retention import apply_retention, select_for_deletion


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


def test_a_deletion_that_fails_is_logged_as_a_failure_and_retried(tmp_path, caplog):
    """rmtree errors used to be ignored: "deleted checkpoint-1" was logged while its files stayed."""
    import logging

    from tests.unit.test_rundir import _undeletable

    for step in (1, 2, 3):
        _make(tmp_path, f"checkpoint-{step}")
    with _undeletable(tmp_path / "checkpoint-1"):
        with caplog.at_level(logging.INFO, "async_ckpt"):
            assert apply_retention(tmp_path, 2) == []
        assert "retention: could not delete checkpoint-1" in caplog.text
        assert "deleted checkpoint-1" not in caplog.text
        (left,) = list_leftovers(tmp_path)
        assert left.kind == "deleting"
    assert [s for s, _ in list_committed(tmp_path)] == [2, 3]
    assert apply_retention(tmp_path, 2) == []  # nothing to select: the retry removes the trash
    assert list_leftovers(tmp_path) == []
