"""Trainers that checkpoint asynchronously: ``TrainingArguments(async_save=True)`` is the default.

::

    from async_ckpt.trainer import Trainer, TrainingArguments
    args = TrainingArguments(output_dir="runs/m", max_steps=2000, save_steps=500, save_total_limit=3)
    Trainer(model=model, args=args, train_dataset=ds).train()   # resumes by itself on restart

``async_ckpt.trainer.ddp`` (``DDPTrainer``) and ``async_ckpt.trainer.pipeline``
(``PipelineTrainer``) hold the distributed trainers; see docs/trainers.md.
"""

from .args import TrainingArguments
from .base import BaseTrainer
from .signals import TrainingInterrupted
from .state import TrainerState, TrainOutput
from .trainer import Trainer

__all__ = ["BaseTrainer", "TrainOutput", "Trainer", "TrainerState", "TrainingArguments", "TrainingInterrupted"]
