"""One rank of a 2-rank DDP training job for the preemption tests, launched as srun would.

``python -m tests.distributed.preempt_child OUT... [options]`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set: a ``DDPTrainer`` on ``RegressionData`` (5 steps per
epoch with 2 ranks), dropout on, AdamW. It prints ``step N`` after each step, then
``done STEP REASON`` when ``train()`` returns or ``interrupted CODE STEP`` before letting
``TrainingInterrupted`` end the process (exit status 130 / 143, as ``python train.py`` would).

``--stall S --stall-from N``: from step N on, every file of a save waits S seconds before its
rename (fault point ``before_rename``), so a save is in flight for a while. ``--resume`` starts
from a differently initialised model, so only loading the checkpoint can make it match. Several
OUTs train one after the other in the same processes; ``--straight DIR`` first trains DIR from
scratch, the reference that resumed runs must equal.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import torch

from async_ckpt import faults
from tests.distributed.trainer_child import RegressionData, new_model

TOTAL = 30
_stalling = False


def _stall(seconds: float) -> Any:
    def action(point: str, rank: int) -> None:
        if _stalling:
            time.sleep(seconds)

    return action


def main(argv: list[str]) -> None:
    global _stalling
    parser = argparse.ArgumentParser()
    parser.add_argument("outs", nargs="+")
    parser.add_argument("--straight", default=None)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.05, help="seconds added to every step")
    parser.add_argument("--stall", type=float, default=0.0)
    parser.add_argument("--stall-from", type=int, default=1)
    parser.add_argument("--save-on-interrupt", choices=["none", "true", "false"], default="none")
    parser.add_argument("--grace", type=float, default=None)
    parser.add_argument("--resume", action="store_true")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    if opts.stall:
        faults.arm("before_rename", _stall(opts.stall))

    from async_ckpt.trainer import TrainingInterrupted
    from async_ckpt.trainer.ddp import DDPTrainer, DDPTrainingArguments

    class Child(DDPTrainer):
        def training_step(self, batch: Any) -> torch.Tensor:
            global _stalling
            _stalling = _stalling or self.state.global_step + 1 >= opts.stall_from
            loss = super().training_step(batch)
            time.sleep(opts.sleep)
            print(f"step {self.state.global_step + 1}", flush=True)
            return loss

    save_on_interrupt = {"none": None, "true": True, "false": False}[opts.save_on_interrupt]
    runs = [(opts.straight, 0)] if opts.straight else []
    runs += [(out, 99 if opts.resume else 0) for out in opts.outs]
    for out, seed in runs:
        args = DDPTrainingArguments(
            output_dir=out, max_steps=TOTAL, per_device_train_batch_size=4, save_steps=opts.save_steps, learning_rate=1e-2,
            logging_steps=0, save_timeout_s=60, save_on_interrupt=save_on_interrupt, interrupt_grace_s=opts.grace, control_poll_s=0,
            save_io_threads=4,  # the tests' timing model: --stall S per file, 4 files at once (not the machine's default)
        )
        trainer = Child(model=new_model(seed), args=args, train_dataset=RegressionData())
        try:
            output = trainer.train()
        except TrainingInterrupted as stopped:
            print(f"interrupted {stopped.code} {stopped.output.global_step}", flush=True)
            raise
        print(f"done {output.global_step} {output.stop_reason}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
