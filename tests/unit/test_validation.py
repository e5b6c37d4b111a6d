"""Pure helpers of async_ckpt.validation: digest_tree and compare_digests, no processes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist

from async_ckpt.components import ValidationLevel
from async_ckpt.validation import (
    NON_TENSOR,
    WHOLE_STATE,
    _find,
    _message,
    compare_digests,
    digest_tree,
    validate_replication,
)


def _optim_state(dtype: torch.dtype = torch.float32) -> dict:
    """Shaped like torch.optim.Adam.state_dict(): tensors two levels down, params as ints."""
    return {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(100, dtype=dtype), "exp_avg_sq": torch.ones(4, 5, dtype=dtype)},
            1: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(7, dtype=dtype), "exp_avg_sq": torch.zeros(7, dtype=dtype)},
        },
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "params": [0, 1]}],
    }


def _problems(a, b, per_tensor=True) -> list[str]:
    return compare_digests([digest_tree(a, per_tensor), digest_tree(b, per_tensor)])


def test_identical_states_give_identical_digests():
    a, b = _optim_state(), _optim_state()
    for per_tensor in (False, True):
        assert digest_tree(a, per_tensor) == digest_tree(b, per_tensor)
        assert compare_digests([digest_tree(a, per_tensor)] * 3) == []


def test_tensor_paths_reach_any_depth():
    digests = digest_tree(_optim_state(), per_tensor=True)
    assert set(digests) == {
        "state.0.step", "state.0.exp_avg", "state.0.exp_avg_sq",
        "state.1.step", "state.1.exp_avg", "state.1.exp_avg_sq", NON_TENSOR,
    }
    deep = {"a": [{"b": {"c": (torch.ones(2),)}}]}
    assert "a.0.b.c.0" in digest_tree(deep, per_tensor=True)


def test_real_adam_state_of_a_bf16_model_is_covered():
    def adam_state(nudge: float) -> dict:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).to(torch.bfloat16)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
        opt.step()
        opt.state[model.bias]["exp_avg"][1] += nudge
        return opt.state_dict()

    digests = digest_tree(adam_state(0.0), per_tensor=True)
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.1.exp_avg"} <= set(digests)
    assert digests["state.0.exp_avg"].startswith("torch.bfloat16[3, 4]#")
    assert _problems(adam_state(0.0), adam_state(1.0)) == ["'state.1.exp_avg' differs on rank(s) 1"]


def test_quick_gives_one_digest():
    assert set(digest_tree(_optim_state(), per_tensor=False)) == {WHOLE_STATE}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_difference_at_element_50_is_caught(dtype):
    a, b = _optim_state(dtype), _optim_state(dtype)
    b["state"][0]["exp_avg"][50] += 1
    assert _problems(a, b, per_tensor=False) == [f"'{WHOLE_STATE}' differs on rank(s) 1"]
    assert _problems(a, b) == ["'state.0.exp_avg' differs on rank(s) 1"]


def test_bfloat16_hashes_raw_bytes():
    t = torch.randn(64).to(torch.bfloat16)
    u = t.clone()
    u[63] = u[63] + 1  # a change bfloat16 can hold
    assert digest_tree({"w": t}, True)["w"] != digest_tree({"w": u}, True)["w"]
    assert digest_tree({"w": t}, True) == digest_tree({"w": t.clone()}, True)
    assert digest_tree({"w": t}, True)["w"].startswith("torch.bfloat16[64]#")


def test_odd_tensors_hash():
    odd = {
        "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "bool": torch.tensor([True, False]),
        "complex_conj": torch.tensor([1 + 2j]).conj(),
        "param": torch.nn.Parameter(torch.ones(2)),
        "sparse": torch.eye(3).to_sparse(),
    }
    digests = digest_tree(odd, per_tensor=True)
    assert set(digests) == set(odd) | {NON_TENSOR}
    # a transposed view hashes like its contiguous copy: values, not storage layout
    assert digests["strided"] == digest_tree({"strided": odd["strided"].contiguous()}, True)["strided"]
    assert digest_tree(odd, per_tensor=False) == digest_tree(copy.deepcopy(odd), per_tensor=False)


def test_meta_tensor_is_refused():
    with pytest.raises(ValueError, match="tensor 'w' is on the meta device"):
        digest_tree({"w": torch.empty(2, device="meta")}, per_tensor=True)


def test_shape_only_change_is_caught():
    a, b = {"w": torch.zeros(6)}, {"w": torch.zeros(2, 3)}  # same bytes, other shape
    assert _problems(a, b, per_tensor=False) == [f"'{WHOLE_STATE}' differs on rank(s) 1"]
    assert _problems(a, b) == ["'w' is torch.float32[2, 3] (rank 0: torch.float32[6]) on rank(s) 1"]


def test_dtype_only_change_is_caught():
    a, b = {"w": torch.zeros(4, dtype=torch.int32)}, {"w": torch.zeros(4, dtype=torch.float32)}  # same bytes
    assert _problems(a, b, per_tensor=False) != []
    assert _problems(a, b) == ["'w' is torch.float32[4] (rank 0: torch.int32[4]) on rank(s) 1"]


def test_missing_and_extra_keys_are_named():
    a, b = _optim_state(), _optim_state()
    del b["state"][1]["exp_avg_sq"]
    b["state"][0]["extra"] = torch.ones(1)
    problems = _problems(a, b)
    assert "'state.1.exp_avg_sq' missing on rank(s) 1" in problems
    assert "'state.0.extra' not on rank 0, present on rank(s) 1" in problems
    assert problems[-1] == f"'{NON_TENSOR}' differs on rank(s) 1"  # tensor paths are listed first
    assert _problems(a, b, per_tensor=False) != []


def test_non_tensor_leaf_difference_is_caught():
    a, b = _optim_state(), _optim_state()
    b["param_groups"][0]["lr"] = 2e-3
    assert _problems(a, b) == [f"'{NON_TENSOR}' differs on rank(s) 1"]
    assert _problems(a, b, per_tensor=False) != []


def test_structure_matters_not_just_leaves():
    a = {"x": [1, 2], "y": []}
    assert _problems(a, {"x": [1, 2], "y": {}}) != []  # container type
    assert _problems(a, {"x": [1, 2]}) != []  # an empty container is still a key
    assert _problems({"a": torch.ones(1)}, {"b": torch.ones(1)}, per_tensor=False) != []  # key names


def test_order_of_dicts_and_sets_does_not_matter():
    a = {"b": 1, "a": torch.ones(2), "s": {"x", "y", "z"}}
    b = {"s": {"z", "y", "x"}, "a": torch.ones(2), "b": 1}
    assert _problems(a, b) == []
    assert _problems(a, b, per_tensor=False) == []


def test_mixed_key_types_do_not_collide():
    digests = digest_tree({0: torch.zeros(1), "0": torch.ones(1)}, per_tensor=True)
    assert len(digests) == 3  # two tensors and the non-tensor digest


def test_numpy_leaves_are_hashed_by_bytes():
    big = np.zeros(5000)  # repr() would elide the middle
    other = big.copy()
    other[2500] = 1.0
    assert _problems({"rng": big}, {"rng": other}) == [f"'{NON_TENSOR}' differs on rank(s) 1"]


def test_problems_group_ranks_and_keep_rank_zero_as_reference():
    base = digest_tree(_optim_state(), True)
    bad = _optim_state()
    bad["state"][1]["exp_avg"] += 1
    bad_digests = digest_tree(bad, True)
    assert compare_digests([base, bad_digests, base, bad_digests]) == ["'state.1.exp_avg' differs on rank(s) 1, 3"]
    # rank 0 alone differing: every other rank is named
    assert compare_digests([bad_digests, base, base]) == ["'state.1.exp_avg' differs on rank(s) 1, 2"]


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank, in this process."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("level", list(ValidationLevel))
@pytest.mark.parametrize("use_group", [False, True], ids=["no group", "one-rank group"])
def test_nothing_to_compare_digests_nothing(level, use_group, request):
    """Without a group, or with a group of one, nothing is digested: a state that cannot be read passes.

    A meta tensor has no bytes: digesting it raises, so this fails if either early return goes.
    """
    group = request.getfixturevalue("one_rank_group") if use_group else None
    unreadable = {"w": torch.empty(4, device="meta")}
    validate_replication("model", unreadable, level, group, rank=0, step=1)


def test_message_names_ranks_and_at_most_five_paths():
    ref = {f"w{i}": torch.zeros(2) for i in range(8)}
    bad = {f"w{i}": torch.ones(2) for i in range(8)}
    found = _find([digest_tree(ref, True), digest_tree(bad, True), digest_tree(ref, True), digest_tree(bad, True)])
    text = _message("model", ValidationLevel.TENSOR, found, rank=2, step=7)
    assert text.startswith("Replication validation failed for component 'model' [rank 2 step 7]: ")
    assert "rank(s) 1, 3 differ from rank 0 (tensor check)" in text
    assert "'w4' differs on rank(s) 1, 3; and 3 more." in text
    assert "'w5'" not in text
