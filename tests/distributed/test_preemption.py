"""SIGINT, SIGTERM, a double Ctrl+C and the control file, on a real 2-rank DDP job (gloo, CPU).

The module fixture runs five jobs, each two ``tests.distributed.preempt_child`` processes started
the way srun or torchrun would (``RANK``/``WORLD_SIZE``; the c10d store hosted by the test, like
torchrun's agent), and stops each one a different way. The tests check the real exit status of
both ranks and what is committed on disk. Then one more job (to save start-ups) trains a run
that nobody stops and resumes every stopped run with a differently initialised model: each must
resume from its newest committed checkpoint and end bitwise equal to the straight run (every
parameter and AdamW tensor of ``checkpoint-30``).

Signal steps are drawn at random; a failure message names the step, so it can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from async_ckpt.cli import main as cli_main
from async_ckpt.layout import list_committed, list_leftovers
from tests.distributed.preempt_child import TOTAL

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]  # the first test also runs the module's jobs

ROOT = Path(__file__).resolve().parents[2]
_started: list["Job"] = []  # every job of the module, killed at its end if still running


class Job:
    """Two ranks of ``preempt_child``; the store lives in this process, so no rank takes it down."""

    def __init__(self, tmp_path: Path, out: Path, *args: "str | Path", name: str = "job") -> None:
        from torch.distributed import TCPStore

        _started.append(self)
        self.out = out
        self.store = TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=60), wait_for_workers=False)
        self.logs = [tmp_path / f"{name}_rank{rank}.log" for rank in range(2)]
        self.procs = []
        for rank, log in enumerate(self.logs):
            env = {
                **os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            }
            with open(log, "w") as sink:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tests.distributed.preempt_child", str(out), *map(str, args)],
                    stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                ))

    def text(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()

    def step(self, rank: int = 0) -> int:
        steps = [int(line.split()[1]) for line in self.text(rank).splitlines() if line.startswith("step ")]
        return steps[-1] if steps else 0

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"waiting for {what}: exit codes {[p.poll() for p in self.procs]}\n{self.report()}")
            time.sleep(0.002)

    def send(self, signum: int, ranks: tuple[int, ...] = (0, 1)) -> None:
        for rank in ranks:
            self.procs[rank].send_signal(signum)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def report(self) -> str:
        return "\n".join(f"--- rank {rank}\n{self.text(rank)[-3000:]}" for rank in range(2))


def _committed(out: Path) -> list[int]:
    return [step for step, _ in list_committed(out)]


def _staging(out: Path) -> bool:
    return any(left.kind == "staging" for left in list_leftovers(out))


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer tensor of ``checkpoint-TOTAL``, by name."""
    path = out / f"checkpoint-{TOTAL}"
    state = {f"model.{k}": v for k, v in load_file(path / "model.safetensors").items()}
    optimizer = torch.load(path / "optimizer_state.pt", weights_only=True)
    for pid, slots in optimizer["state"].items():
        for name, value in slots.items():
            state[f"optim.{pid}.{name}"] = torch.as_tensor(value)
    return state


@dataclass
class Stopped:
    """One stopped job: what the tests check."""

    out: Path
    codes: list[int]
    logs: list[str]
    signal_after: int = 0  # the step after which the signal or command was sent
    exit_s: float = 0.0  # seconds from the (last) signal to both ranks' exit
    committed: list[int] = field(default_factory=list)
    staging_left: bool = False
    marks: list[int] = field(default_factory=list)  # control file: the steps rank 0 took each command at
    final: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint-30's tensors after the resume

    def report(self) -> str:
        return f"signal after step {self.signal_after}\n" + "\n".join(f"--- rank {r}\n{t[-3000:]}" for r, t in enumerate(self.logs))

    def stopped_at(self, code: int) -> int:
        """The step both ranks report having stopped at (they must agree)."""
        steps = {int(l.split()[2]) for t in self.logs for l in t.splitlines() if l.startswith(f"interrupted {code} ")}
        assert len(steps) == 1 and all(f"interrupted {code} " in t for t in self.logs), self.report()
        return steps.pop()


def _finish(job: Job, signal_after: int = 0, sent: float | None = None, timeout: float = 60.0) -> Stopped:
    try:
        codes = [p.wait(timeout) for p in job.procs]
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"the job did not exit within {timeout} s\n{job.report()}") from None
    exit_s = time.monotonic() - sent if sent is not None else 0.0
    return Stopped(job.out, codes, [job.text(r) for r in range(2)], signal_after, exit_s, _committed(job.out), _staging(job.out))


def _sigterm_all_during_save(tmp: Path) -> Stopped:
    out, at = tmp / "sigterm", random.randint(6, 22)
    job = Job(tmp, out, "--stall", "0.15", name="sigterm")
    job.wait_for(f"step {at} and a save in flight", lambda: job.step() >= at and _staging(out))
    job.send(signal.SIGTERM)
    return _finish(job, at)


def _sigint_one_rank(tmp: Path) -> Stopped:
    out, at = tmp / "sigint", random.randint(3, 24)
    job = Job(tmp, out, "--save-on-interrupt", "true", name="sigint")
    job.wait_for(f"step {at}", lambda: job.step() >= at)
    job.send(signal.SIGINT, ranks=(1,))
    return _finish(job, at)


def _grace_too_short(tmp: Path) -> Stopped:
    """Saves take ~0.6 s on rank 0 (6 files, 4 writers, 0.3 s each): 1 s of grace holds no extra one."""
    out, at = tmp / "grace", random.choice([*range(11, 18), *range(21, 28)])
    job = Job(tmp, out, "--stall", "0.3", "--save-steps", "10", "--sleep", "0.1", "--grace", "1.0", name="grace")
    job.wait_for(f"step {at}", lambda: job.step() >= at)
    sent = time.monotonic()
    job.send(signal.SIGTERM, ranks=(0,))
    return _finish(job, at, sent)


def _double_ctrl_c(tmp: Path) -> Stopped:
    """The save of step 10 hangs (30 s per file): the first Ctrl+C waits for it, the second leaves at once."""
    out = tmp / "double"
    job = Job(tmp, out, "--stall", "30", "--stall-from", "8", name="double")
    job.wait_for("the stalled save of step 10", lambda: job.step() >= 11 and _staging(out))
    job.send(signal.SIGINT)
    job.wait_for("both ranks stopping", lambda: all("stopping for SIGINT" in job.text(r) for r in range(2)))
    time.sleep(0.6)  # a second Ctrl+C, not the same one forwarded twice
    sent = time.monotonic()
    job.send(signal.SIGINT)
    return _finish(job, 11, sent, timeout=10)


def _control_file(tmp: Path) -> Stopped:
    out = tmp / "control"
    job = Job(tmp, out, "--save-steps", "100", name="control")
    marks = []
    for at, command in ((random.randint(2, 10), "save"), (random.randint(14, 24), "save-and-stop")):
        job.wait_for(f"step {at}", lambda: job.step() >= at)
        assert cli_main(["ctl", str(out), command]) == 0
        job.wait_for(f"rank 0 to take {command}", lambda: f"control file: {command}\n" in job.text(0))
        line = next(l for l in job.text(0).splitlines() if l.endswith(f"control file: {command}"))
        marks.append(int(line.split("step ")[1].split("]")[0]))
    stopped = _finish(job)
    stopped.marks = marks
    return stopped


@dataclass
class Runs:
    stopped: dict[str, Stopped]
    resume: Stopped  # the job that trained the straight run, then resumed every stopped one
    straight: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Every stopped job, then one job that trains the straight run and resumes each of them."""
    tmp = tmp_path_factory.mktemp("preemption")
    try:
        stopped = {name: run(tmp) for name, run in (
            ("sigterm", _sigterm_all_during_save), ("sigint", _sigint_one_rank), ("grace", _grace_too_short),
            ("double", _double_ctrl_c), ("control", _control_file),
        )}
        job = Job(tmp, *[run.out for run in stopped.values()], "--resume", "--sleep", "0", "--straight", str(tmp / "straight"), name="resume")
        resume = _finish(job, timeout=120)
    finally:
        for started in _started:
            started.kill()
    if resume.codes == [0, 0]:
        for run in stopped.values():
            run.final = _final_state(run.out)
    return Runs(stopped, resume, _final_state(tmp / "straight") if resume.codes == [0, 0] else {})


def test_sigterm_to_every_rank_during_a_background_save_saves_the_step_and_exits_143(runs: Runs) -> None:
    run = runs.stopped["sigterm"]
    assert run.codes == [143, 143], run.report()
    assert run.committed[-1] == run.stopped_at(143), run.report()
    assert "stopping for SIGTERM" in run.logs[1] and not run.staging_left


def test_sigint_to_one_rank_stops_every_rank_at_the_same_step(runs: Runs) -> None:
    run = runs.stopped["sigint"]
    assert run.codes == [130, 130], run.report()
    assert run.committed[-1] == run.stopped_at(130), "save_on_interrupt=True: the step it stopped at is saved"
    assert "[rank 0] SIGINT" not in run.logs[0] and "stopping for SIGINT" in run.logs[0], "rank 0 learned of rank 1's signal"


def test_a_final_save_that_does_not_fit_the_grace_budget_is_skipped(runs: Runs) -> None:
    run = runs.stopped["grace"]
    assert run.codes == [143, 143], run.report()
    stopped = run.stopped_at(143)
    assert run.committed[-1] == stopped // 10 * 10, f"stopped at {stopped}: the previous checkpoint is the newest\n{run.report()}"
    assert "skipping the final save: it would not commit within interrupt_grace_s (estimated" in run.logs[0], run.report()
    assert run.exit_s < 3.0, f"the job must end within the grace budget (1 s, plus the exit): took {run.exit_s:.2f} s"


def test_a_second_ctrl_c_exits_within_a_second_without_a_torn_checkpoint(runs: Runs) -> None:
    run = runs.stopped["double"]
    assert run.codes == [130, 130], run.report()
    assert run.exit_s < 1.0, f"exited {run.exit_s:.2f} s after the second Ctrl+C"
    assert "exiting with status 130 without waiting for the save(s) of step(s) 10" in run.logs[0], run.report()
    assert run.committed == [5] and run.staging_left, "step 10 was never committed; its staging directory waits for the next start"


def test_control_file_save_now_and_save_and_stop(runs: Runs) -> None:
    run = runs.stopped["control"]
    assert run.codes == [0, 0], run.report()
    assert all(f"done {run.marks[1]} save-and-stop\n" in log for log in run.logs), run.report()
    assert run.committed == run.marks, f"the only checkpoints are the two asked for, at {run.marks}"
    assert not (run.out / "async_ckpt.control").exists()


@pytest.mark.parametrize("name", ["sigterm", "sigint", "grace", "double", "control"])
def test_every_stopped_run_resumes_bitwise_equal_to_a_straight_run(runs: Runs, name: str) -> None:
    resume, run = runs.resume, runs.stopped[name]
    assert resume.codes == [0, 0], resume.report()
    newest = run.committed[-1]
    assert f"resumed from {run.out / f'checkpoint-{newest}'} at step {newest}" in resume.logs[0], resume.report()
    assert not list_leftovers(run.out), "the restart removes what the stopped job left behind"
    assert run.final.keys() == runs.straight.keys()
    differ = [k for k in runs.straight if not torch.equal(runs.straight[k], run.final[k])]
    assert not differ, f"resumed from checkpoint-{newest}: tensors differ from the straight run: {differ}"
