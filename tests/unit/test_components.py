"""async_ckpt.components: StateComponent checks and check_components."""

from __future__ import annotations

import pytest
import torch

from async_ckpt.components import FileFormat, SharingPattern, StateComponent, ValidationLevel, check_components
from async_ckpt.errors import CheckpointConfigError


class _Obj:
    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


def test_defaults():
    model = StateComponent("model", torch.nn.Linear(2, 2))
    assert model.sharing_pattern is SharingPattern.GLOBAL
    assert model.file_format is FileFormat.SAFETENSORS
    assert model.validation is ValidationLevel.NONE
    assert StateComponent("optimizer", _Obj()).file_format is FileFormat.TORCH


def test_string_values_accepted_for_enums():
    comp = StateComponent("rng", _Obj(), sharing_pattern="per_rank", file_format="torch")
    assert comp.sharing_pattern is SharingPattern.PER_RANK
    assert comp.file_format is FileFormat.TORCH
    rep = StateComponent("model", _Obj(), sharing_pattern="replicated", validation="tensor", file_format="safetensors")
    assert rep.validation is ValidationLevel.TENSOR
    assert rep.file_format is FileFormat.SAFETENSORS
    grp = StateComponent("opt", _Obj(), sharing_pattern="per_group", group="dp")
    assert grp.sharing_pattern is SharingPattern.PER_GROUP


@pytest.mark.parametrize(
    "kwargs,bad,enum_name",
    [
        ({"sharing_pattern": "per_ranks"}, "per_ranks", "SharingPattern"),
        ({"sharing_pattern": "replicated", "validation": "deep"}, "deep", "ValidationLevel"),
        ({"file_format": "pickle"}, "pickle", "FileFormat"),
    ],
)
def test_bad_enum_value_message_lists_allowed(kwargs, bad, enum_name):
    with pytest.raises(CheckpointConfigError) as info:
        StateComponent("thing", _Obj(), **kwargs)
    text = str(info.value)
    assert "'thing'" in text and repr(bad) in text and enum_name in text
    assert "use one of" in text


def test_bad_sharing_pattern_lists_every_choice():
    with pytest.raises(CheckpointConfigError) as info:
        StateComponent("thing", _Obj(), sharing_pattern="everywhere")
    for member in SharingPattern:
        assert repr(member.value) in str(info.value)


def test_per_group_without_group_refused():
    with pytest.raises(CheckpointConfigError, match="PER_GROUP but names no group"):
        StateComponent("opt", _Obj(), sharing_pattern=SharingPattern.PER_GROUP)


@pytest.mark.parametrize("pattern", ["global", "per_rank", "replicated", "per_node"])
def test_group_on_non_per_group_refused(pattern):
    with pytest.raises(CheckpointConfigError, match="only PER_GROUP components take a group"):
        StateComponent("opt", _Obj(), sharing_pattern=pattern, group="dp")


@pytest.mark.parametrize("pattern", ["global", "per_rank", "per_group", "per_node"])
def test_validation_on_non_replicated_refused(pattern):
    extra = {"group": "dp"} if pattern == "per_group" else {}
    with pytest.raises(CheckpointConfigError, match="REPLICATED only"):
        StateComponent("model", _Obj(), sharing_pattern=pattern, validation="quick", **extra)


def test_validation_none_allowed_everywhere():
    StateComponent("model", _Obj(), sharing_pattern="per_rank", validation="none")


@pytest.mark.parametrize("obj", [object(), {"a": 1}, torch.ones(2)])
def test_object_without_state_dict_refused(obj):
    with pytest.raises(CheckpointConfigError, match=r"state_dict\(\)/load_state_dict\(\)"):
        StateComponent("thing", obj)


def test_object_with_only_state_dict_refused():
    class Half:
        def state_dict(self):
            return {}

    with pytest.raises(CheckpointConfigError, match="Half"):
        StateComponent("thing", Half())


@pytest.mark.parametrize("key", ["", "a/b", "../x", "a b", "a.b", "x\x00", "a\\b", ".."])
def test_bad_key_characters_refused(key):
    with pytest.raises(CheckpointConfigError, match="becomes a file name"):
        StateComponent(key, _Obj())


@pytest.mark.parametrize("key", ["model", "optimizer_2", "data-set", "A9"])
def test_good_keys(key):
    assert StateComponent(key, _Obj()).key == key


def test_check_components_duplicate_keys():
    comps = [StateComponent("model", _Obj()), StateComponent("opt", _Obj()), StateComponent("model", _Obj())]
    with pytest.raises(CheckpointConfigError, match="Duplicate component key 'model'"):
        check_components(comps)


def test_check_components_unknown_group():
    comps = [StateComponent("opt", _Obj(), sharing_pattern="per_group", group="tp")]
    with pytest.raises(CheckpointConfigError, match=r"unknown process group 'tp' \(known: dp, pp\)"):
        check_components(comps, ["pp", "dp"])
    with pytest.raises(CheckpointConfigError, match=r"known: none"):
        check_components(comps)
    check_components(comps, ["tp"])


def test_check_components_refuses_non_components():
    with pytest.raises(CheckpointConfigError, match="Expected StateComponent, got tuple"):
        check_components([("model", _Obj())])  # type: ignore[list-item]


def test_check_components_accepts_good_list():
    check_components([StateComponent("model", _Obj()), StateComponent("rng", _Obj(), sharing_pattern="per_rank")])
    check_components([])


def test_component_is_frozen():
    comp = StateComponent("model", _Obj())
    with pytest.raises(Exception):
        comp.key = "other"  # type: ignore[misc]
