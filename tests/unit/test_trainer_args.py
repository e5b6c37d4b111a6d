"""TrainingArguments and its subclasses: defaults, bad values refused at construction."""

from __future__ import annotations

import dataclasses

import pytest

from async_ckpt.trainer import TrainingArguments
from async_ckpt.trainer.ddp import DDPTrainingArguments
from async_ckpt.trainer.pipeline import PipelineTrainingArguments


def test_defaults_turn_on_async_auto_resuming_checkpoints() -> None:
    args = TrainingArguments(output_dir="out")
    assert args.async_save is True and args.resume_from_checkpoint is True
    assert args.save_strategy == "steps" and args.save_safetensors is True
    opts = args.manager_options()
    assert opts["async_save"] is True and opts["num_io_threads"] == args.save_io_threads
    assert opts["compression"] is None and opts["on_busy"] == "block" and opts["timeout_s"] == args.save_timeout_s


def test_keyword_only_and_frozen() -> None:
    assert str(TrainingArguments("out").output_dir) == "out"  # output_dir is positional, as in HF
    with pytest.raises(TypeError):
        TrainingArguments("out", 3)  # type: ignore[misc]
    args = TrainingArguments(output_dir="out")
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.max_steps = 3  # type: ignore[misc]
    assert dataclasses.replace(args, max_steps=3).max_steps == 3


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("save_strategy", "step", "save_strategy must be one of 'no', 'steps', 'epoch'"),
        ("save_steps", 0, "save_steps must be a positive integer"),
        ("save_total_limit", 0, "save_total_limit must be None (keep all) or at least 1"),
        ("max_steps", 0, "max_steps must be a positive integer, or -1"),
        ("per_device_train_batch_size", 0, "per_device_train_batch_size must be a positive integer"),
        ("learning_rate", -1.0, "learning_rate must be a number >= 0"),
        ("resume_from_checkpoint", "", "resume_from_checkpoint must be True"),
        ("resume_from_checkpoint", 3, "resume_from_checkpoint must be True"),
        ("async_save", "yes", "async_save must be True or False"),
        ("save_compression", "gzip", "save_compression must be None or 'zstd'"),
        ("save_on_busy", "wait", "save_on_busy must be one of 'block', 'skip'"),
        ("save_timeout_s", 0, "save_timeout_s must be a number of seconds > 0"),
        ("save_io_threads", 0, "save_io_threads must be a positive integer"),
        ("lr_scheduler_type", "cosine_annealing", "lr_scheduler_type must be one of 'constant', 'constant_with_warmup', 'linear', 'cosine'"),
        ("max_grad_norm", 0.0, "max_grad_norm must be None or a number > 0"),
        ("output_dir", "", "output_dir must be a non-empty path"),
    ],
)
def test_bad_values_are_refused_with_the_reason(field: str, value: object, words: str) -> None:
    with pytest.raises(ValueError) as info:
        TrainingArguments(**{"output_dir": "out", field: value})
    assert words in str(info.value)
    assert str(info.value).startswith("TrainingArguments: ")


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as info:
        TrainingArguments(output_dir="out", save_steps=0, save_on_busy="x")
    assert "save_steps" in str(info.value) and "save_on_busy" in str(info.value)


def test_save_steps_only_matters_with_the_steps_strategy() -> None:
    assert TrainingArguments(output_dir="out", save_strategy="epoch", save_steps=0).save_steps == 0


def test_distributed_arguments_add_their_fields() -> None:
    assert DDPTrainingArguments(output_dir="o").dispatch_batches is True
    with pytest.raises(ValueError, match="dispatch_batches must be True or False"):
        DDPTrainingArguments(output_dir="o", dispatch_batches="yes")
    args = PipelineTrainingArguments(output_dir="o", per_device_train_batch_size=8, n_microbatches=4)
    assert args.pipeline_schedule == "gpipe"
    with pytest.raises(ValueError, match="must be a multiple of n_microbatches"):
        PipelineTrainingArguments(output_dir="o", per_device_train_batch_size=6, n_microbatches=4)
    with pytest.raises(ValueError, match="pipeline_schedule must be one of 'gpipe', '1f1b'"):
        PipelineTrainingArguments(output_dir="o", per_device_train_batch_size=4, pipeline_schedule="zb")


def test_pipeline_dp_degree_must_be_positive():
    assert PipelineTrainingArguments(output_dir="o", per_device_train_batch_size=8, n_microbatches=4, dp_degree=2).dp_degree == 2
    with pytest.raises(ValueError, match="dp_degree must be a positive integer"):
        PipelineTrainingArguments(output_dir="o", per_device_train_batch_size=8, n_microbatches=4, dp_degree=0)
