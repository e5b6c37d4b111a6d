"""A training process for kill tests: saves every step, forever, until it is killed.

``python -m tests.faults.kill_child OUT [--world-rank-file]``: resumes from the newest committed
checkpoint under OUT, prints ``ready <step>`` once the manager is built, then trains: at step s
every tensor of the state equals s, so any checkpoint's content can be checked from its step.
"""

from __future__ import annotations

import sys

import torch

from async_ckpt import CheckpointManager, StateComponent, rng_component


class StepState:
    """State whose every value is a function of the step: checkable after any kill."""

    def __init__(self) -> None:
        self.big = torch.zeros(1 << 20)  # 4 MiB, so saves take long enough to be hit mid-write
        self.small = torch.zeros(3, dtype=torch.float64)
        self.step = 0

    def set_step(self, step: int) -> None:
        self.big.fill_(step)
        self.small.fill_(step)
        self.step = step

    def state_dict(self) -> dict:
        return {"big": self.big, "small": self.small, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.big.copy_(state["big"])
        self.small.copy_(state["small"])
        self.step = state["step"]


def components(state: StepState, model: torch.nn.Module) -> list[StateComponent]:
    return [StateComponent("model", model, required=True), StateComponent("trainer", state), rng_component()]


def set_model(model: torch.nn.Module, step: int) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(step)


def main(out: str) -> None:
    torch.set_num_threads(1)
    state, model = StepState(), torch.nn.Linear(64, 64)
    manager = CheckpointManager(out, components(state, model), save_total_limit=3, timeout_s=30)
    result = manager.load()
    step = result.step if result else 0
    print(f"ready {step}", flush=True)
    while True:
        step += 1
        state.set_step(step)
        set_model(model, step)
        manager.save(step)


if __name__ == "__main__":
    main(sys.argv[1])
