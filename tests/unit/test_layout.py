"""async_ckpt.layout: file and directory names for every sharing pattern, and listing directories."""

from __future__ import annotations

import os
import time

import pytest

from async_ckpt.components import SharingPattern, StateComponent
from async_ckpt.layout import (
    Leftover,
    checkpoint_dirname,
    file_name,
    file_stem,
    list_committed,
    list_leftovers,
    parse_step,
    slot,
    staging_dirname,
    trash_dirname,
    writes,
)
from async_ckpt.topology import GroupPlace, Topology


class _Obj:
    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


def _comp(key: str, pattern: SharingPattern, **kw) -> StateComponent:
    return StateComponent(key, _Obj(), sharing_pattern=pattern, **kw)


def _topo(rank: int = 0, world: int = 1, local_rank: int = 0, node: int = 0, groups=None) -> Topology:
    return Topology(rank=rank, world_size=world, local_rank=local_rank, node=node, groups=groups or {})


# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize("pattern", [SharingPattern.GLOBAL, SharingPattern.REPLICATED])
@pytest.mark.parametrize("world,rank", [(1, 0), (4, 0), (4, 3)])
def test_shared_patterns_have_unsuffixed_names(pattern, world, rank):
    topo = _topo(rank=rank, world=world)
    assert file_name(_comp("model", pattern), topo) == "model.safetensors"
    assert file_name(_comp("optimizer", pattern), topo) == "optimizer_state.pt"
    assert file_name(_comp("trainer", pattern), topo) == "trainer_state.pt"
    assert slot(_comp("model", pattern), topo) == "global"


def test_per_rank_world_one_is_unsuffixed():
    topo = _topo()
    assert file_name(_comp("rng", SharingPattern.PER_RANK), topo) == "rng_state.pt"
    assert file_name(_comp("model", SharingPattern.PER_RANK), topo) == "model.safetensors"
    assert slot(_comp("rng", SharingPattern.PER_RANK), topo) == "rank:0"


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_per_rank_world_many_has_rank_suffix(rank):
    topo = _topo(rank=rank, world=4)
    assert file_name(_comp("rng", SharingPattern.PER_RANK), topo) == f"rng_state_rank_{rank}.pt"
    assert file_name(_comp("model", SharingPattern.PER_RANK), topo) == f"model_state_rank_{rank}.safetensors"
    assert file_name(_comp("model", SharingPattern.PER_RANK, file_format="torch"), topo) == f"model_state_rank_{rank}.pt"
    assert slot(_comp("rng", SharingPattern.PER_RANK), topo) == f"rank:{rank}"


def test_per_group_name_uses_group_and_instance_index():
    topo = _topo(rank=3, world=4, groups={"dp": GroupPlace(index=1, rank=1, ranks=(2, 3))})
    comp = _comp("optimizer", SharingPattern.PER_GROUP, group="dp")
    assert file_stem(comp, topo) == "optimizer_state_group_dp_1"
    assert file_name(comp, topo) == "optimizer_state_group_dp_1.pt"
    assert slot(comp, topo) == "group:dp:1"


def test_per_node_name_uses_node():
    topo = _topo(rank=5, world=8, local_rank=1, node=2)
    comp = _comp("dataset", SharingPattern.PER_NODE)
    assert file_name(comp, topo) == "dataset_state_node_2.pt"
    assert slot(comp, topo) == "node:2"


def test_zst_suffix_when_compressed():
    topo = _topo(rank=1, world=2)
    assert file_name(_comp("model", SharingPattern.GLOBAL), topo, compressed=True) == "model.safetensors.zst"
    assert file_name(_comp("rng", SharingPattern.PER_RANK), topo, compressed=True) == "rng_state_rank_1.pt.zst"


def test_directory_names():
    assert checkpoint_dirname(500) == "checkpoint-500"
    assert staging_dirname(800, "abc") == ".checkpoint-800.staging-abc"
    assert trash_dirname(3, "t1") == ".checkpoint-3.deleting-t1"
    assert trash_dirname(3, "t1", "replaced") == ".checkpoint-3.replaced-t1"
    with pytest.raises(AssertionError):
        trash_dirname(3, "t1", "bogus")


# ------------------------------------------------------------------------------ writers


@pytest.mark.parametrize("pattern", [SharingPattern.GLOBAL, SharingPattern.REPLICATED])
def test_shared_patterns_written_by_global_rank_zero_only(pattern):
    comp = _comp("model", pattern)
    assert [writes(comp, _topo(rank=r, world=4, local_rank=r % 2)) for r in range(4)] == [True, False, False, False]


def test_per_rank_written_by_every_rank():
    comp = _comp("rng", SharingPattern.PER_RANK)
    assert all(writes(comp, _topo(rank=r, world=4)) for r in range(4))


def test_per_group_written_by_rank_zero_of_each_instance():
    comp = _comp("opt", SharingPattern.PER_GROUP, group="dp")
    # two instances: ranks (0, 2) and (1, 3)
    places = {0: GroupPlace(0, 0, (0, 2)), 1: GroupPlace(1, 0, (1, 3)), 2: GroupPlace(0, 1, (0, 2)), 3: GroupPlace(1, 1, (1, 3))}
    got = [writes(comp, _topo(rank=r, world=4, groups={"dp": places[r]})) for r in range(4)]
    assert got == [True, True, False, False]


def test_per_node_written_by_local_rank_zero():
    comp = _comp("data", SharingPattern.PER_NODE)
    got = [writes(comp, _topo(rank=r, world=4, local_rank=r % 2, node=r // 2)) for r in range(4)]
    assert got == [True, False, True, False]


# ------------------------------------------------------------------------------ parsing and listing


@pytest.mark.parametrize(
    "name,step",
    [
        ("checkpoint-0", 0),
        ("checkpoint-500", 500),
        ("checkpoint-12345678901", 12345678901),
        ("checkpoint-", None),
        ("checkpoint-x", None),
        ("checkpoint--1", None),
        ("checkpoint-5.tmp", None),
        ("checkpoint-5 ", None),
        (".checkpoint-5.staging-abc", None),
        (".checkpoint-5.deleting-abc", None),
        ("checkpoint_5", None),
        ("ckpt-5", None),
        ("", None),
    ],
)
def test_parse_step(name, step):
    assert parse_step(name) == step


def test_list_committed_orders_by_step_not_mtime(tmp_path):
    for step in (100, 9, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
    # make the newest step the oldest on disk, and the smallest step the newest
    now = time.time()
    os.utime(tmp_path / "checkpoint-100", (now - 1000, now - 1000))
    os.utime(tmp_path / "checkpoint-9", (now + 1000, now + 1000))
    got = list_committed(tmp_path)
    assert [step for step, _ in got] == [9, 20, 100]
    assert [p for _, p in got] == [tmp_path / "checkpoint-9", tmp_path / "checkpoint-20", tmp_path / "checkpoint-100"]


def test_list_committed_ignores_symlinks_files_and_staging(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-2").write_text("a file, not a checkpoint")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "checkpoint-3").symlink_to(target, target_is_directory=True)
    (tmp_path / ".checkpoint-4.staging-abc").mkdir()
    (tmp_path / ".checkpoint-5.deleting-abc").mkdir()
    (tmp_path / "checkpoint-6.tmp").mkdir()
    assert list_committed(tmp_path) == [(1, tmp_path / "checkpoint-1")]


def test_list_committed_of_missing_dir_is_empty(tmp_path):
    assert list_committed(tmp_path / "nope") == []
    assert list_leftovers(tmp_path / "nope") == []


def test_list_leftovers(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / ".checkpoint-10.staging-run1-0").mkdir()
    (tmp_path / ".checkpoint-2.deleting-abc").mkdir()
    (tmp_path / ".checkpoint-2.replaced-xyz").mkdir()
    (tmp_path / ".checkpoint-3.staging-file").write_text("not a dir")
    (tmp_path / ".checkpoint-4.weird-abc").mkdir()
    (tmp_path / ".checkpoint-5.staging-").mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / ".checkpoint-6.staging-link").symlink_to(target, target_is_directory=True)
    got = list_leftovers(tmp_path)
    assert got == [
        Leftover(tmp_path / ".checkpoint-2.deleting-abc", 2, "deleting", "abc"),
        Leftover(tmp_path / ".checkpoint-2.replaced-xyz", 2, "replaced", "xyz"),
        Leftover(tmp_path / ".checkpoint-10.staging-run1-0", 10, "staging", "run1-0"),
    ]
