"""async_ckpt.topology: node_from_env and group_places (pure), and the single-process Topology."""

from __future__ import annotations

import pytest

from async_ckpt.errors import CheckpointConfigError
from async_ckpt.topology import GroupPlace, Topology, group_places, node_from_env


@pytest.mark.parametrize(
    "env,rank,expected",
    [
        ({}, 0, (0, 0)),
        ({}, 5, (5, 0)),  # no launcher variables: one node, local rank = rank
        ({"LOCAL_RANK": "1", "GROUP_RANK": "3"}, 7, (1, 3)),
        ({"GROUP_RANK": "2"}, 5, (5, 2)),
        ({"LOCAL_RANK": "1", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "8"}, 5, (1, 1)),  # GROUP_RANK wins
        ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 5, (1, 2)),
        ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 7, (3, 1)),
        ({"LOCAL_WORLD_SIZE": "0"}, 3, (3, 3)),  # a zero is treated as 1, never a division by zero
        ({"LOCAL_RANK": "", "GROUP_RANK": ""}, 4, (4, 0)),  # empty means unset
    ],
)
def test_node_from_env(env, rank, expected):
    assert node_from_env(env, rank) == expected


@pytest.mark.parametrize("name", ["LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"])
def test_node_from_env_bad_int(name):
    with pytest.raises(CheckpointConfigError, match=f"{name}='x1' is not an integer"):
        node_from_env({name: "x1"}, 0)


def test_group_places_numbers_instances_by_lowest_member():
    # two data-parallel instances over 4 ranks: (1, 3) and (0, 2); instance of rank 0 is index 0
    dp = [(0, 2), (1, 3), (0, 2), (1, 3)]
    tp = [(0, 1), (0, 1), (2, 3), (2, 3)]
    members = {"dp": dp, "tp": tp}
    places = [group_places(members, r) for r in range(4)]
    assert places[0] == {"dp": GroupPlace(0, 0, (0, 2)), "tp": GroupPlace(0, 0, (0, 1))}
    assert places[1] == {"dp": GroupPlace(1, 0, (1, 3)), "tp": GroupPlace(0, 1, (0, 1))}
    assert places[2] == {"dp": GroupPlace(0, 1, (0, 2)), "tp": GroupPlace(1, 0, (2, 3))}
    assert places[3] == {"dp": GroupPlace(1, 1, (1, 3)), "tp": GroupPlace(1, 1, (2, 3))}


def test_group_places_interleaved_members():
    # instances (1, 2) and (0, 3): numbered by lowest member, so (0, 3) is 0 though rank 1 lists first
    members = {"g": [(0, 3), (1, 2), (1, 2), (0, 3)]}
    assert group_places(members, 1)["g"] == GroupPlace(1, 0, (1, 2))
    assert group_places(members, 2)["g"] == GroupPlace(1, 1, (1, 2))
    assert group_places(members, 0)["g"] == GroupPlace(0, 0, (0, 3))
    assert group_places(members, 3)["g"] == GroupPlace(0, 1, (0, 3))


def test_group_places_single_group_of_everyone():
    members = {"all": [(0, 1, 2)] * 3}
    assert [group_places(members, r)["all"] for r in range(3)] == [GroupPlace(0, r, (0, 1, 2)) for r in range(3)]


def test_detect_without_process_group_is_rank_zero_of_one():
    topo = Topology.detect()
    assert (topo.rank, topo.world_size, topo.local_rank, topo.node) == (0, 1, 0, 0)
    assert topo.is_rank0


def test_place_of_unknown_group():
    topo = Topology(rank=2, world_size=4, groups={"dp": GroupPlace(0, 0, (0,))})
    assert topo.place("dp").index == 0
    with pytest.raises(CheckpointConfigError, match=r"\[rank 2\] unknown process group 'tp'"):
        topo.place("tp")
