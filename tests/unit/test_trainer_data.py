"""Epoch order as a function of (seed, epoch), and mid-epoch resume of the data position."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from async_ckpt.trainer.data import EpochIterator, batch_rows, build_dataloader, split_batch

pytestmark = pytest.mark.timeout(60)

DATA = list(range(10))  # 10 samples, batch 4: batches of 4, 4, 2


def _epochs(it: EpochIterator, first_epoch: int, epochs: int) -> list[list[int]]:
    out = []
    for epoch in range(first_epoch, first_epoch + epochs):
        while (batch := it.next(epoch)) is not None:
            out.append(batch.tolist())
    return out


def test_each_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    a = _epochs(EpochIterator(build_dataloader(DATA, 4, seed=3), seed=3), 0, 3)
    b = _epochs(EpochIterator(build_dataloader(DATA, 4, seed=3), seed=3), 0, 3)
    assert a == b and len(a) == 9
    assert a[0:3] != a[3:6] != a[6:9], "epochs must be shuffled differently"
    assert _epochs(EpochIterator(build_dataloader(DATA, 4, seed=3), seed=3), 2, 1) == a[6:9]
    assert _epochs(EpochIterator(build_dataloader(DATA, 4, seed=4), seed=4), 0, 1) != a[0:3]


@pytest.mark.parametrize("consumed", [1, 2, 3], ids=["after-1", "after-2", "all-yielded"])
def test_mid_epoch_state_resumes_the_epoch_and_the_next_ones(consumed: int) -> None:
    straight = _epochs(EpochIterator(build_dataloader(DATA, 4, seed=0), seed=0), 0, 3)
    first = EpochIterator(build_dataloader(DATA, 4, seed=0), seed=0)
    _epochs(first, 0, 1)
    got = [first.next(1).tolist() for _ in range(consumed)]
    state = first.state_dict()
    resumed = EpochIterator(build_dataloader(DATA, 4, seed=0), seed=0)
    resumed.load_state_dict(state)
    rest = _epochs(resumed, 1, 2)
    assert got + rest == straight[3:]


def test_a_state_taken_after_the_epoch_ran_out_starts_the_next_epoch() -> None:
    straight = _epochs(EpochIterator(build_dataloader(DATA, 4, seed=0), seed=0), 0, 2)
    first = EpochIterator(build_dataloader(DATA, 4, seed=0), seed=0)
    _epochs(first, 0, 1)  # ran out: the loader's state says "finished"
    resumed = EpochIterator(build_dataloader(DATA, 4, seed=0), seed=0)
    resumed.load_state_dict(first.state_dict())
    assert _epochs(resumed, 1, 1) == straight[3:]


def test_opening_an_epoch_leaves_the_global_rng_alone() -> None:
    it = EpochIterator(build_dataloader(DATA, 4, seed=0), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = EpochIterator(DataLoader(DATA, batch_size=4, shuffle=True), seed=0)
    before = torch.get_rng_state()
    it.next(0)
    assert torch.equal(before, torch.get_rng_state())
    plain_order = _epochs(plain, 0, 2)
    again = _epochs(EpochIterator(DataLoader(DATA, batch_size=4, shuffle=True), seed=0), 0, 2)
    assert plain_order == again, "a plain DataLoader's shuffle is reseeded per epoch too"


def test_distributed_sampler_gets_set_epoch() -> None:
    sampler = DistributedSampler(DATA, num_replicas=2, rank=1, shuffle=True, seed=5)
    it = EpochIterator(build_dataloader(DATA, 2, seed=0, sampler=sampler), seed=0)
    orders = [_epochs(it, epoch, 1) for epoch in range(3)]
    assert sampler.epoch == 2 and orders[0] != orders[1]
    again = EpochIterator(build_dataloader(DATA, 2, seed=0, sampler=DistributedSampler(DATA, num_replicas=2, rank=1, shuffle=True, seed=5)), seed=0)
    assert _epochs(again, 1, 1) == orders[1]


def test_split_batch_and_batch_rows() -> None:
    batch = {"x": torch.arange(10).reshape(5, 2), "labels": torch.arange(5), "meta": "keep"}
    parts = split_batch(batch, 2)
    assert [batch_rows(p) for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"]) and parts[1]["meta"] == "keep"
    pair = split_batch((torch.arange(4), torch.arange(4) * 2), 2)
    assert torch.equal(pair[1][1], torch.tensor([4, 6]))
    assert batch_rows([torch.zeros(7, 3)]) == 7
