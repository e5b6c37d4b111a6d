"""Tests for async_ckpt.rng: every generator restores bitwise, through torch.save/load too."""

from __future__ import annotations

import copy
import io
import logging
import random

import numpy as np
import pytest
import torch

from async_ckpt.components import SharingPattern, StateComponent
from async_ckpt.errors import CheckpointLoadError
from async_ckpt.rng import RNGState, rng_component


def _draw() -> dict[str, object]:
    """Draw from every CPU generator, including the gaussian caches of Python and NumPy."""
    return {
        "python": [random.random() for _ in range(5)] + [random.gauss(0.0, 1.0)],
        "numpy": np.concatenate([np.random.rand(5), [np.random.standard_normal()]]).tolist(),
        "torch": torch.rand(5).tolist() + torch.randn(3).tolist(),
    }


def _roundtrip(sd: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture(autouse=True)
def _seeded():
    """Seed every generator, and leave the process as other tests expect it afterwards."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


@pytest.mark.parametrize("through_torch_save", [False, True], ids=["in_memory", "torch_save"])
def test_every_cpu_generator_restores_exactly(through_torch_save):
    _draw()  # one gaussian each leaves a cached second value in Python and NumPy
    assert random.getstate()[2] is not None
    assert np.random.get_state()[3] == 1

    rng = RNGState()
    sd = rng.state_dict()
    expected = _draw()
    _draw()  # move every generator on
    rng.load_state_dict(_roundtrip(sd) if through_torch_save else sd)
    assert _draw() == expected


@pytest.mark.parametrize("generator", ["python", "numpy", "torch"])
def test_each_generator_restores_on_its_own(generator):
    draw = {
        "python": lambda: [random.random(), random.gauss(0.0, 1.0), random.getrandbits(64)],
        "numpy": lambda: [np.random.standard_normal(), np.random.randint(0, 2**31, size=3).tolist()],
        "torch": lambda: torch.randint(0, 2**31, (4,)).tolist() + torch.randn(1).tolist(),
    }[generator]
    draw()
    sd = RNGState().state_dict()
    expected = draw()
    draw()
    RNGState().load_state_dict(sd)
    assert draw() == expected


def test_state_dict_is_a_point_in_time_copy():
    rng = RNGState()
    sd = rng.state_dict()
    before = copy.deepcopy(sd)
    _draw()
    assert torch.equal(sd["torch_cpu"], before["torch_cpu"])
    assert torch.equal(sd["python"]["state"], before["python"]["state"])
    assert torch.equal(sd["numpy"]["keys"], before["numpy"]["keys"])


def test_state_dict_holds_plain_containers_and_tensors_only():
    allowed = (dict, list, tuple, int, float, str, bool, type(None), torch.Tensor)

    def walk(value):
        assert isinstance(value, allowed), type(value)
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    sd = RNGState().state_dict()
    walk(sd)
    assert sd["torch_initial_seed"] == 1234
    assert sd["python"]["state"].dtype == torch.int64
    assert sd["numpy"]["bit_generator"] == "MT19937"
    assert ("cuda" in sd) == torch.cuda.is_available()


@pytest.mark.parametrize("missing", ["numpy", "cuda"])
def test_missing_optional_parts_are_skipped(missing):
    sd = RNGState().state_dict()
    sd.pop(missing, None)
    np_before = np.random.get_state()[1].copy()
    expected_torch = torch.rand(3)
    RNGState().load_state_dict(sd)
    assert torch.equal(torch.rand(3), expected_torch)
    if missing == "numpy":
        assert np.array_equal(np.random.get_state()[1], np_before)


def _corrupt(sd: dict, path: tuple, value) -> dict:
    sd = copy.deepcopy(sd)
    target = sd
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return sd


_DELETE = object()

MALFORMED = {
    "missing_python": (("python",), _DELETE),
    "missing_torch_cpu": (("torch_cpu",), _DELETE),
    "python_not_dict": (("python",), [1, 2, 3]),
    "python_state_short": (("python", "state"), torch.zeros(10, dtype=torch.int64)),
    "python_state_float": (("python", "state"), torch.zeros(625)),
    "python_state_list": (("python", "state"), [0] * 625),
    "python_version_str": (("python", "version"), "3"),
    "python_gauss_str": (("python", "gauss_next"), "0.5"),
    "python_state_out_of_range": (("python", "state"), torch.full((625,), -1, dtype=torch.int64)),
    "torch_cpu_wrong_dtype": (("torch_cpu",), torch.zeros(5056, dtype=torch.int32)),
    "torch_cpu_wrong_size": (("torch_cpu",), torch.zeros(7, dtype=torch.uint8)),
    "numpy_keys_shape": (("numpy", "keys"), torch.zeros(3, dtype=torch.int64)),
    "numpy_keys_negative": (("numpy", "keys"), torch.full((624,), -1, dtype=torch.int64)),
    "numpy_pos_float": (("numpy", "pos"), 1.5),
    "numpy_wrong_generator": (("numpy", "bit_generator"), "PCG64"),
    "cuda_not_list": (("cuda",), torch.zeros(16, dtype=torch.uint8)),
    "cuda_entry_not_tensor": (("cuda",), ["nope"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_state_raises_load_error(case):
    path, value = MALFORMED[case]
    sd = _corrupt(RNGState().state_dict(), path, value)
    python_before = random.getstate()
    with pytest.raises(CheckpointLoadError, match="Malformed RNG state"):
        RNGState().load_state_dict(sd)
    if case != "python_state_out_of_range":  # caught by random.setstate itself
        assert random.getstate() == python_before, "a rejected state dict must not restore anything"


@pytest.mark.parametrize("value", [None, [], "rng", 3])
def test_non_dict_state_raises_load_error(value):
    with pytest.raises(CheckpointLoadError):
        RNGState().load_state_dict(value)


def test_cuda_state_without_cuda_is_skipped_with_warning(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sd = RNGState().state_dict()
    sd["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    expected = torch.rand(3)
    with caplog.at_level(logging.WARNING, logger="async_ckpt.rng"):
        RNGState().load_state_dict(sd)
    assert torch.equal(torch.rand(3), expected)
    assert "CUDA is unavailable" in caplog.text


def test_cuda_device_count_mismatch_restores_min_devices(caplog, monkeypatch):
    """CPU stand-in for the GPU test below: 3 saved states, 2 visible devices -> 2 restored."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    sd = RNGState().state_dict()
    sd.pop("cuda", None)
    sd["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="async_ckpt.rng"):
        RNGState().load_state_dict(sd)
    assert [device for device, _ in restored] == [0, 1]
    assert all(torch.equal(state, sd["cuda"][device]) for device, state in restored)
    assert "3 CUDA device(s) but 2 are visible" in caplog.text


def test_without_numpy_the_numpy_part_is_neither_written_nor_read(caplog, monkeypatch):
    import async_ckpt.rng as rng_module

    with_numpy = RNGState().state_dict()
    monkeypatch.setattr(rng_module, "np", None)
    assert "numpy" not in RNGState().state_dict()
    np.random.rand(3)  # NumPy now differs from with_numpy["numpy"]
    before = np.random.get_state()
    with caplog.at_level(logging.WARNING, logger="async_ckpt.rng"):
        RNGState().load_state_dict(with_numpy)
    assert "NumPy is not installed" in caplog.text
    after = np.random.get_state()
    assert np.array_equal(after[1], before[1]) and after[2:] == before[2:], "NumPy must be left alone"


def test_rng_component_is_optional_and_per_rank():
    component = rng_component()
    assert isinstance(component, StateComponent)
    assert component.key == "rng"
    assert component.sharing_pattern is SharingPattern.PER_RANK
    assert component.required is False
    assert isinstance(component.stateful, RNGState)
    assert rng_component("rng_extra").key == "rng_extra"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_cuda_device_restores_exactly():
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        torch.randn(4, device=device)
    sd = _roundtrip(RNGState().state_dict())
    assert len(sd["cuda"]) == len(devices)
    expected = [torch.randn(8, device=d).cpu() for d in devices]
    for device in devices:
        torch.randn(8, device=device)
    RNGState().load_state_dict(sd)
    for device, want in zip(devices, expected):
        assert torch.equal(torch.randn(8, device=device).cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_count_mismatch_restores_the_common_devices(caplog):
    sd = RNGState().state_dict()
    expected = torch.randn(8, device="cuda:0").cpu()
    sd["cuda"] = sd["cuda"] + [sd["cuda"][0].clone()]  # one device more than this machine has
    with caplog.at_level(logging.WARNING, logger="async_ckpt.rng"):
        RNGState().load_state_dict(sd)
    assert torch.equal(torch.randn(8, device="cuda:0").cpu(), expected)
    assert "restoring the first" in caplog.text


def test_rederive_on_another_world_size_is_deterministic_and_distinct(caplog) -> None:
    """Ranks below the saved world size keep their streams; the others get distinct derived ones."""
    import logging

    from async_ckpt.rng import RNGState

    rng = RNGState()
    torch.manual_seed(1)
    saved0 = rng.state_dict()
    torch.manual_seed(2)
    saved1 = rng.state_dict()
    with caplog.at_level(logging.WARNING, logger="async_ckpt.rng"):
        assert rng.rederive(saved1, 1, 2) is saved1
    assert sum("re-deriving" in r.message for r in caplog.records) == 0  # rank 0 alone warns
    with caplog.at_level(logging.WARNING, logger="async_ckpt.rng"):
        rng.rederive(saved0, 0, 2)
    assert sum("re-deriving" in r.message for r in caplog.records) == 1

    def draws(state: dict) -> torch.Tensor:
        rng.load_state_dict(state)
        return torch.rand(4)

    new2, new3 = rng.rederive(saved0, 2, 2), rng.rederive(saved1, 3, 2)
    assert torch.equal(draws(new2), draws(rng.rederive(saved0, 2, 2)))  # deterministic
    assert not torch.equal(draws(new2), draws(new3)) and not torch.equal(draws(new2), draws(saved0))
