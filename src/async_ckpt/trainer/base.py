"""``BaseTrainer``: the training loop, and when it saves and where it resumes from.

One plain loop on the training thread::

    train():  seed -> CheckpointManager(get_state_components()) -> resume -> loop -> final save -> close
    loop:     batch (crossing epoch ends) -> training_step -> global_step += 1 -> log -> maybe save
              -> step boundary: every rank agrees on signals and the control file (control.py)

Saves return as soon as the state is staged; the files are written in the background while the
next steps run. A save that fails is logged and training goes on (the next save retries); a
replication failure (ranks that should agree do not) propagates, since it is a training bug.
``Trainer``, ``DDPTrainer`` and ``PipelineTrainer`` override the small hooks: how the model is
wrapped, where batches come from, what one step does, and how each component is shared.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch

from .. import CheckpointManager, SharingPattern, StateComponent, ValidationLevel, rng_component
from .args import TrainingArguments
from .checkpointing import TrainerCheckpoints
from .control import Decision, StepBoundary
from .data import EpochIterator, batch_rows, build_dataloader, is_stateful, to_device
from .optim import default_optimizer, default_scheduler
from .signals import SignalWatcher, TrainingInterrupted, exit_at_shutdown, exit_code
from .state import TrainerState, TrainOutput

logger = logging.getLogger(__name__)


class BaseTrainer:
    """Trains ``model`` on ``train_dataset`` (or ``train_dataloader``) and checkpoints as it goes.

    Construct on the training thread (every rank, same arguments, when distributed); ``train()``
    is collective across ranks in the distributed trainers. Attributes a subclass or a user may
    read: ``args``, ``model`` (unwrapped), ``train_model`` (what runs the forward),
    ``optimizer``, ``lr_scheduler``, ``train_dataloader``, ``state``, ``history``,
    ``step_stats`` and ``save_stalls`` (timings), ``checkpoint_manager`` (during ``train()``),
    ``exit_code`` (after ``train()``: 0, or 130 / 143 when a signal stopped it).
    """

    args_class: type[TrainingArguments] = TrainingArguments

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: TrainingArguments | Mapping[str, Any] | None = None,
        train_dataset: Any = None,
        train_dataloader: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any = None,
        data_collator: Callable[[list[Any]], Any] | None = None,
        compute_loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    ) -> None:
        self.args = self._check_args(args)
        self.train_dataset = train_dataset
        self.data_collator = data_collator
        self.compute_loss_fn = compute_loss
        self.state = TrainerState()
        self.history: list[dict[str, float]] = []  # one entry per logging step
        self.step_stats: list[tuple[int, float, bool]] = []  # (step, seconds, a save was persisting when it began)
        self.save_stalls: list[tuple[int, float]] = []  # (step, seconds save() blocked training), last train()
        self.checkpoint_manager: CheckpointManager | None = None  # set during train()
        self._stop = False
        self.exit_code = 0
        self.model, self.train_model = self._prepare_model(model)
        self.device = next(iter(self.model.parameters()), torch.empty(0)).device
        self.train_dataloader = train_dataloader if train_dataloader is not None else self._default_dataloader()
        self._data = EpochIterator(self.train_dataloader, self.args.seed)
        self.optimizer = optimizer if optimizer is not None else default_optimizer(self.model.parameters(), self.args)
        self.lr_scheduler = lr_scheduler if lr_scheduler is not None else default_scheduler(self.optimizer, self.args, self._total_steps())

    # --------------------------------------------------------------------------- hooks

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def _prepare_model(self, model: torch.nn.Module | None) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Return (the module whose state is saved, the module that runs the forward)."""
        if model is None:
            raise ValueError(f"{type(self).__name__} needs model=")
        return model, model

    def _default_dataloader(self) -> Any:
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__} needs train_dataset= or train_dataloader=")
        return build_dataloader(self.train_dataset, self.args.per_device_train_batch_size, seed=self.args.seed, **self._loader_options())

    def _loader_options(self) -> dict[str, Any]:
        return {"collate_fn": self.data_collator, "num_workers": self.args.dataloader_num_workers, "drop_last": self.args.dataloader_drop_last}

    def _fetch_batch(self) -> Any:
        """This rank's next batch of the current epoch, or None when the epoch ran out."""
        return self._data.next(self.state.epoch)

    def _global_rows(self, batch: Any) -> int:
        return batch_rows(batch) * self.world_size

    def _sharing(self, key: str) -> tuple[SharingPattern, ValidationLevel]:
        """How the built-in component ``key`` is shared across ranks (one process: GLOBAL)."""
        return SharingPattern.GLOBAL, ValidationLevel.NONE

    def _process_group(self) -> Any:
        return None

    def _mesh(self) -> Any:
        """The ``DeviceMesh`` whose named dimensions PER_GROUP components use (None: no mesh)."""
        return None

    def _steps_per_epoch(self) -> int | None:
        try:
            return len(self.train_dataloader)
        except TypeError:
            return None

    # --------------------------------------------------------------------------- components

    def get_state_components(self) -> list[StateComponent]:
        """Everything a checkpoint holds, in save order; override to add components.

        The model is required; the others are optional, so deleting their files from a
        checkpoint skips them on resume (with a warning). The dataset component exists only
        when the dataloader has ``state_dict``/``load_state_dict``.
        """
        fmt = "safetensors" if self.args.save_safetensors else "torch"
        components = [self._component("model", self.model, required=True, file_format=fmt)]
        if self.optimizer is not None:
            components.append(self._component("optimizer", self.optimizer))
        if self.lr_scheduler is not None:
            components.append(self._component("scheduler", self.lr_scheduler))
        components.append(self._component("trainer", self.state))
        if is_stateful(self.train_dataloader):
            components.append(self._component("dataset", self._data))
        components.append(rng_component())
        return components

    def _component(self, key: str, stateful: Any, **kwargs: Any) -> StateComponent:
        pattern, validation = self._sharing(key)
        return StateComponent(key, stateful, sharing_pattern=pattern, validation=validation, **kwargs)

    # --------------------------------------------------------------------------- one step

    def compute_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The loss of one batch: ``compute_loss(model, batch)`` if given, else ``model(**batch).loss``."""
        if self.compute_loss_fn is not None:
            return self.compute_loss_fn(model, batch)
        if not isinstance(batch, Mapping):
            raise TypeError(f"batches are {type(batch).__name__}, not dicts: pass compute_loss=fn(model, batch) -> loss")
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise TypeError(f"model output {type(out).__name__} has no 'loss': pass compute_loss=fn(model, batch) -> loss")
        return loss

    def training_step(self, batch: Any) -> torch.Tensor:
        """Forward, backward and optimizer step on one batch; returns the detached loss."""
        loss = self.compute_loss(self.train_model, to_device(batch, self.device))
        loss.backward()
        self._optimizer_step()
        return loss.detach()

    def _optimizer_step(self) -> None:
        if self.args.max_grad_norm is not None:
            self._clip_gradients(self.args.max_grad_norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _clip_gradients(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def stop(self) -> None:
        """End training after the current step (a final save follows). Call on every rank at the same step."""
        self._stop = True

    # --------------------------------------------------------------------------- the loop

    def train(self, resume_from_checkpoint: bool | str | Any = None) -> TrainOutput:
        """Resume (per ``args.resume_from_checkpoint``), train, save a final checkpoint, drain saves.

        Training thread (the main thread, where SIGINT/SIGTERM can be handled), every rank.
        Returns once the final checkpoint has committed. Raises ``ReplicationValidationError`` at
        once; raises ``CheckpointSaveError`` only if the final save fails (earlier failed saves are
        logged and retried by the next save). A signal or the control file stops training at a
        step boundary on every rank together (docs/stopping.md); after a signal, once the saves
        have ended, raises ``TrainingInterrupted`` (a ``SystemExit``: status 130 or 143) unless
        ``args.exit_on_interrupt`` is False. A second Ctrl+C raises ``KeyboardInterrupt`` at once.
        ``resume_from_checkpoint`` (HF's argument): True, False or a path overrides
        ``args.resume_from_checkpoint`` for this call; None keeps it.
        """
        self._seed()
        self._stop = False
        self._resume_target = self.args.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint
        with SignalWatcher(self.args.handle_signals, self.rank) as watcher:
            output = self._train(watcher)
        self.exit_code = output.exit_code
        if output.exit_code and self.args.exit_on_interrupt:
            raise TrainingInterrupted(output.exit_code, output)
        return output

    def _train(self, watcher: SignalWatcher) -> TrainOutput:
        manager = self.checkpoint_manager = CheckpointManager(
            self.args.output_dir, self.get_state_components(), process_group=self._process_group(), mesh=self._mesh(), **self.args.manager_options()
        )
        self._checkpoints = checkpoints = TrainerCheckpoints(manager, self.rank)
        self.save_stalls = checkpoints.stalls
        boundary = StepBoundary(watcher, self.args, rank=self.rank, world_size=self.world_size, group=manager.coordination_group)
        stop: Decision | None = None
        try:
            resumed, skipped = checkpoints.resume(self._resume_target, self.state, self.args.overwrite_output_dir)
            first_step, total = self.state.global_step, torch.zeros(())
            if resumed is not None and self._finished() and self.rank == 0:
                logger.warning("[rank 0 step %d] training already finished at step %d (resumed from %s): nothing to do",
                               self.state.global_step, self.state.global_step, resumed)
            self.train_model.train()
            while not self._finished():
                batch = self._next_batch()
                if batch is None:
                    break
                busy, started = checkpoints.in_flight(), time.perf_counter()
                loss = self.training_step(batch)
                self._count_step(batch)
                self.step_stats.append((self.state.global_step, time.perf_counter() - started, busy))
                if self.args.save_strategy != "no":
                    checkpoints.prepare_once()  # outside the timed step: the first save stalls like the rest
                total += loss.float().cpu()
                self._maybe_log(loss)
                if self.args.save_strategy == "steps" and self.state.global_step % self.args.save_steps == 0:
                    checkpoints.save(self.state.global_step)
                decision = boundary.poll(self.state.global_step)
                if decision.stop:
                    stop = decision
                    break
                if decision.save:
                    checkpoints.save(self.state.global_step)
            if stop is not None:
                checkpoints.stop(self.state.global_step, stop, boundary)
            else:
                if self.args.save_strategy != "no":
                    checkpoints.save(self.state.global_step, final=True)
                checkpoints.finish()
        except BaseException as exc:
            if watcher.aborted:  # a second Ctrl+C: leave now; no checkpoint can be torn
                exit_at_shutdown(exit_code(signal.SIGINT), checkpoints.abandon(), self.rank)
            else:
                checkpoints.abort(exc)
            raise
        steps = self.state.global_step - first_step
        mean = float(total) / steps if steps else float("nan")
        reason, code = (stop.reason, stop.exit_code) if stop is not None else (None, 0)
        return TrainOutput(self.state.global_step, mean, steps, resumed, checkpoints.last_committed, skipped, reason, code)

    def _finished(self) -> bool:
        if self._stop:
            return True
        if self.args.max_steps > 0:
            return self.state.global_step >= self.args.max_steps
        return self.state.epoch >= self.args.num_train_epochs

    def _next_batch(self) -> Any:
        """The next batch, crossing epoch ends (saving there with save_strategy="epoch"); None: stop."""
        empty_epochs = 0
        while True:
            batch = self._fetch_batch()
            if batch is not None:
                return batch
            empty_epochs = empty_epochs + 1 if self.state.steps_in_epoch == 0 else 0
            if empty_epochs > 1:
                raise ValueError("the training data yields no batches: check the dataset and the batch size")
            logger.debug("[rank %d step %d] epoch %d done", self.rank, self.state.global_step, self.state.epoch)
            self.state.epoch += 1
            self.state.steps_in_epoch = 0
            if self.args.save_strategy == "epoch":
                self._checkpoints.save(self.state.global_step)
            if self._finished():
                return None

    def _count_step(self, batch: Any) -> None:
        self.state.global_step += 1
        self.state.steps_in_epoch += 1
        self.state.samples_seen += self._global_rows(batch)

    def _maybe_log(self, loss: torch.Tensor) -> None:
        step = self.state.global_step
        if not self.args.logging_steps or step % self.args.logging_steps:
            return
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else float("nan")
        entry = {"step": step, "epoch": self.state.epoch, "loss": float(loss), "lr": float(lr), "step_time_s": self.step_stats[-1][1]}
        self.history.append(entry)
        if self.rank == 0:
            logger.info("[rank 0 step %d] epoch %d loss %.6g lr %.3g step %.1f ms", step, entry["epoch"], entry["loss"], lr, 1000 * entry["step_time_s"])

    def _seed(self) -> None:
        seed = self.args.seed + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _total_steps(self) -> int | None:
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = self._steps_per_epoch()
        return None if per_epoch is None else per_epoch * self.args.num_train_epochs

    def _check_args(self, args: Any) -> TrainingArguments:
        cls = self.args_class
        if args is None:
            return cls()
        if isinstance(args, Mapping):
            return cls(**args)
        if not isinstance(args, cls):
            raise TypeError(f"{type(self).__name__} needs args={cls.__name__}(...), got {type(args).__name__}")
        return args
