"""A job for the ownership tests: ``python -m tests.faults.owner_child OUT STEPS PAUSE_S``.

Builds a manager on OUT (printing ``ready <pid>``), saves steps 1..STEPS with PAUSE_S seconds
between them (each step's tensor equals the step), closes the manager, prints ``done``. Fault
points come through ``ASYNC_CKPT_FAULTS`` as usual.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from async_ckpt import CheckpointManager, StateComponent


class Blob:
    def __init__(self) -> None:
        self.data = torch.zeros(1 << 16)

    def state_dict(self) -> dict:
        return {"data": self.data}

    def load_state_dict(self, state: dict) -> None:
        self.data.copy_(state["data"])


def components(blob: Blob) -> list[StateComponent]:
    return [StateComponent("model", blob, required=True)]


def main(out: str, steps: int, pause_s: float) -> None:
    torch.set_num_threads(1)
    blob = Blob()
    manager = CheckpointManager(out, components(blob), timeout_s=30, lock_timeout_s=30)
    print(f"ready {os.getpid()}", flush=True)
    for step in range(1, steps + 1):
        blob.data.fill_(step)
        manager.save(step)
        time.sleep(pause_s)
    manager.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
