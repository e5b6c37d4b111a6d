"""``TrainingArguments``: what to train, when to save, where to resume from.

A frozen, keyword-only dataclass; ``__post_init__`` rejects bad values at construction with the
reason and the fix, so a typo fails before any model is built. ``DDPTrainingArguments`` and
``PipelineTrainingArguments`` (in ``ddp`` and ``pipeline``) add their own fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Union

from .schedulers import SCHEDULER_TYPES

SAVE_STRATEGIES = ("no", "steps", "epoch")


@dataclass(frozen=True, kw_only=True)
class TrainingArguments:
    """Arguments of ``Trainer.train()``; the defaults turn on async, auto-resuming checkpoints."""

    output_dir: Union[str, "os.PathLike[str]"] = field(default="tmp_trainer", kw_only=False)  # positional, as in HF; checkpoints go to <output_dir>/checkpoint-<step>
    max_steps: int = -1  # optimizer steps to train; -1: train num_train_epochs epochs instead
    num_train_epochs: int = 1  # epochs to train when max_steps is -1
    per_device_train_batch_size: int = 8  # samples per rank per step
    learning_rate: float = 5e-5  # peak learning rate of the default AdamW
    weight_decay: float = 0.0  # AdamW weight decay
    lr_scheduler_type: str = "linear"  # "constant" | "constant_with_warmup" | "linear" | "cosine" | "cosine_with_restarts" (HF's formulas)
    warmup_steps: int = 0  # linear warmup steps of the default scheduler (HF: overrides warmup_ratio when > 0)
    max_grad_norm: float | None = None  # clip the gradient norm to this value; None: no clipping
    seed: int = 42  # seeds Python, NumPy and torch at train(); data order is a function of (seed, epoch)
    logging_steps: int = 10  # log loss and learning rate every N steps; 0: never
    dataloader_num_workers: int = 0  # worker processes of the default StatefulDataLoader
    dataloader_drop_last: bool = False  # drop the last incomplete batch of each epoch
    save_strategy: str = "steps"  # "no" | "steps" (every save_steps) | "epoch" (each epoch end)
    save_steps: int = 500  # with "steps": save when global_step % save_steps == 0
    save_total_limit: int | None = None  # keep at most N committed checkpoints; None: keep all
    save_safetensors: bool = True  # model as model.safetensors; False: model.pt (torch.save)
    resume_from_checkpoint: Union[bool, str, "os.PathLike[str]"] = True  # True: newest or fresh; path: that one; False: fresh
    async_save: bool = True  # write checkpoints in the background while training goes on
    save_io_threads: int | None = None  # background writer threads per rank; None: cores - 1, from 1 to 4
    save_compression: str | None = None  # None | "zstd"
    save_compression_level: int = 1  # zstd level (-7..22)
    save_on_busy: str = "block"  # a save while the previous one is in flight: "block" | "skip"
    save_timeout_s: float = 600.0  # a save that has not committed after this long fails
    save_io_nice: int = 0  # 0-19: lower CPU priority for the background writers (few-core machines)
    verify_on_load: bool = True  # check every file's xxh3 before resuming from it
    handle_signals: bool = True  # SIGINT/SIGTERM stop training at the next step boundary on every rank (docs/stopping.md)
    save_on_interrupt: bool | None = None  # save the step a signal stopped at: None: on SIGTERM only; True: SIGINT too; False: never
    interrupt_grace_s: float | None = None  # seconds from a signal to the kill (the scheduler's notice): a final save that would not fit is skipped; None: no limit
    exit_on_interrupt: bool = True  # after a signal stop, train() raises TrainingInterrupted (exit status 130/143); False: it returns
    control_poll_s: float | None = 1.0  # rank 0 looks for <output_dir>/async_ckpt.control this often; 0: every step; None: never
    # ownership of output_dir (issue 15)
    save_lock_timeout_s: float = 60.0  # wait this long for another job that owns output_dir to end (a requeue's predecessor)
    overwrite_output_dir: bool = False  # resume_from_checkpoint=False into a directory with checkpoints deletes them; else refused

    # Hugging Face Trainer habits (issue 19): same names and meanings as transformers.TrainingArguments
    warmup_ratio: float = 0.0  # warmup as a fraction of the training steps, used when warmup_steps is 0
    lr_scheduler_kwargs: dict[str, Any] | None = None  # extra schedule arguments: {"num_cycles": ...} for the cosine ones

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        """Every bad value, each with its fix (subclasses extend the list)."""
        out = []
        if not isinstance(self.output_dir, (str, os.PathLike)) or not os.fspath(self.output_dir):
            out.append(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        if not _is_int(self.max_steps) or (self.max_steps < 1 and self.max_steps != -1):
            out.append(f"max_steps must be a positive integer, or -1 to train num_train_epochs epochs; got {self.max_steps!r}")
        if self.max_steps == -1 and (not _is_int(self.num_train_epochs) or self.num_train_epochs < 1):
            out.append(f"num_train_epochs must be a positive integer when max_steps is -1; got {self.num_train_epochs!r}")
        out += _positive(self, "per_device_train_batch_size", *(["save_io_threads"] if self.save_io_threads is not None else []))
        out += _non_negative_int(self, "warmup_steps", "logging_steps", "dataloader_num_workers", "seed")
        if not isinstance(self.learning_rate, (int, float)) or isinstance(self.learning_rate, bool) or self.learning_rate < 0:
            out.append(f"learning_rate must be a number >= 0, got {self.learning_rate!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            out.append(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0):
            out.append(f"max_grad_norm must be None or a number > 0, got {self.max_grad_norm!r}")
        out += _choice(self, "lr_scheduler_type", SCHEDULER_TYPES)
        out += self._hf_problems()
        out += _choice(self, "save_strategy", SAVE_STRATEGIES)
        if self.save_strategy == "steps" and (not _is_int(self.save_steps) or self.save_steps < 1):
            out.append(f"save_steps must be a positive integer with save_strategy='steps', got {self.save_steps!r}")
        if self.save_total_limit is not None and (not _is_int(self.save_total_limit) or self.save_total_limit < 1):
            out.append(f"save_total_limit must be None (keep all) or at least 1, got {self.save_total_limit!r}")
        out += _bools(self, "save_safetensors", "async_save", "verify_on_load", "dataloader_drop_last", "handle_signals", "exit_on_interrupt")
        if not isinstance(self.save_on_interrupt, (bool, type(None))):
            out.append(f"save_on_interrupt must be None (save on SIGTERM only), True or False; got {self.save_on_interrupt!r}")
        for name in ("interrupt_grace_s", "control_poll_s"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
                out.append(f"{name} must be None or a number of seconds >= 0, got {value!r}")
        resume = self.resume_from_checkpoint
        if not isinstance(resume, (bool, str, os.PathLike)) or (not isinstance(resume, bool) and not os.fspath(resume)):
            out.append(
                f"resume_from_checkpoint must be True (newest checkpoint, or fresh), False (fresh) or "
                f"the path of a checkpoint directory; got {resume!r}"
            )
        if self.save_compression not in (None, "zstd"):
            out.append(f"save_compression must be None or 'zstd', got {self.save_compression!r}")
        if self.save_compression == "zstd" and not (_is_int(self.save_compression_level) and -7 <= self.save_compression_level <= 22):
            out.append(f"save_compression_level must be an integer in -7..22 for zstd, got {self.save_compression_level!r}")
        out += _choice(self, "save_on_busy", ("block", "skip"))
        if not isinstance(self.save_timeout_s, (int, float)) or not self.save_timeout_s > 0:
            out.append(f"save_timeout_s must be a number of seconds > 0, got {self.save_timeout_s!r}")
        if not isinstance(self.save_io_nice, int) or not 0 <= self.save_io_nice <= 19:
            out.append(f"save_io_nice must be an integer from 0 to 19, got {self.save_io_nice!r}")
        out += _ownership_problems(self)
        return out

    def _hf_problems(self) -> list[str]:
        """Bad values of the Hugging Face style arguments (issue 19's block)."""
        out = []
        if not isinstance(self.warmup_ratio, (int, float)) or isinstance(self.warmup_ratio, bool) or not 0 <= self.warmup_ratio <= 1:
            out.append(f"warmup_ratio must be a number from 0 to 1, got {self.warmup_ratio!r}")
        kwargs = self.lr_scheduler_kwargs
        if kwargs is not None and (not isinstance(kwargs, dict) or set(kwargs) - {"num_cycles"}):
            out.append(f"lr_scheduler_kwargs must be None or a dict with 'num_cycles' only, got {kwargs!r}")
        return out

    def manager_options(self) -> dict[str, Any]:
        """The ``CheckpointManager`` keyword arguments these arguments ask for."""
        return {
            "async_save": self.async_save,
            "num_io_threads": self.save_io_threads,
            "compression": self.save_compression,
            "compression_level": self.save_compression_level,
            "save_total_limit": self.save_total_limit,
            "verify_on_load": self.verify_on_load,
            "timeout_s": float(self.save_timeout_s),
            "on_busy": self.save_on_busy,
            "io_nice": self.save_io_nice,
            "lock_timeout_s": float(self.save_lock_timeout_s),
        }


def _ownership_problems(args: Any) -> list[str]:
    """Bad values of the ownership arguments (issue 15)."""
    out = _bools(args, "overwrite_output_dir")
    value = args.save_lock_timeout_s
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        out.append(f"save_lock_timeout_s must be a number of seconds >= 0, got {value!r}")
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(args: Any, *names: str) -> list[str]:
    return [f"{n} must be a positive integer, got {getattr(args, n)!r}" for n in names if not _is_int(getattr(args, n)) or getattr(args, n) < 1]


def _non_negative_int(args: Any, *names: str) -> list[str]:
    return [f"{n} must be an integer >= 0, got {getattr(args, n)!r}" for n in names if not _is_int(getattr(args, n)) or getattr(args, n) < 0]


def _bools(args: Any, *names: str) -> list[str]:
    return [f"{n} must be True or False, got {getattr(args, n)!r}" for n in names if not isinstance(getattr(args, n), bool)]


def _choice(args: Any, name: str, allowed: tuple[str, ...]) -> list[str]:
    value = getattr(args, name)
    if value in allowed:
        return []
    return [f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}"]
