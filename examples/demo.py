"""async_ckpt in one minute: async saves, a SIGKILL in the middle of a save, automatic resume.

    .venv/bin/python examples/demo.py          # or: make demo

Trains a small MLP (DDP, 2 ranks, gloo on CPU) with examples/demo_worker.py, three times:

1. with async checkpoints every 25 steps (``save_total_limit=3``), until the parent (this
   script) SIGKILLs both ranks while a save is still being written;
2. the same command again: it resumes by itself from the newest committed checkpoint, after
   removing the torn save, and trains to the end;
3. a reference run trained straight through, without checkpoints: its final parameters must be
   bitwise identical to those of the killed-and-resumed run.

Everything is written under ./demo_output/ (wiped at start). Exit code 0 and ``demo OK`` when
every check passes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

WORKER = Path(__file__).resolve().parent / "demo_worker.py"
OUT = Path("demo_output")
WORLD_SIZE = 2
RUN_TIMEOUT_S = 100  # a run that takes longer than this is stuck: kill it and fail


class DemoFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(mode: str, out: Path, on_event) -> list[int]:
    """Start WORLD_SIZE ranks of demo_worker.py; pass each JSON report of rank 0 to ``on_event``.

    ``on_event(event, procs)`` may return "stop" to stop reading (after it killed the ranks).
    Returns the ranks' exit codes. Each rank's stderr goes to ``out/<mode>_rank<N>.log``.
    """
    out.mkdir(parents=True, exist_ok=True)
    port, procs = free_port(), []
    for rank in range(WORLD_SIZE):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(out / f"{mode}_rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), mode], env=env, text=True,
                                          stdout=subprocess.PIPE if rank == 0 else log, stderr=log))
    timed_out = threading.Event()
    watchdog = threading.Timer(RUN_TIMEOUT_S, lambda: (timed_out.set(), [p.kill() for p in procs]))
    watchdog.start()
    try:
        for line in procs[0].stdout:
            if not line.startswith("{"):
                print("   " + line.rstrip())
            elif on_event(json.loads(line), procs) == "stop":
                break
    except BaseException:
        for p in procs:
            p.kill()
        raise
    finally:
        watchdog.cancel()
        codes = [p.wait() for p in procs]
        procs[0].stdout.close()
    if timed_out.is_set():
        raise DemoFailed(f"the {mode} run took longer than {RUN_TIMEOUT_S} s; see {out}/{mode}_rank*.log")
    return codes


def check_exit(mode: str, out: Path, codes: list[int], expected: int = 0) -> None:
    if all(code == expected for code in codes):
        return
    tails = "\n".join(f"--- {log}:\n" + "\n".join(log.read_text().splitlines()[-15:]) for log in sorted(out.glob(f"{mode}_rank*.log")))
    raise DemoFailed(f"the {mode} run ended with exit codes {codes} (expected {expected}); rank logs:\n{tails}")


def freeze_during_save(procs: list[subprocess.Popen], ckpt_dir: Path, step: int) -> Path | None:
    """SIGSTOP every rank while the save of ``step`` is on disk but not committed.

    Returns its staging directory with every rank stopped, or None (ranks running again) if
    the save committed before the freeze. SIGSTOP halts all threads of a process, background
    writers included, and waitid() returns once they really are halted: what we see on disk
    then cannot change any more. No timing guess is involved.
    """
    while True:
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        for p in procs:
            os.waitid(os.P_PID, p.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
        staging = sorted(ckpt_dir.glob(f".checkpoint-{step}.staging-*"))
        committed_already = (ckpt_dir / f"checkpoint-{step}").exists()
        if staging and not committed_already:
            return staging[0]
        for p in procs:
            p.send_signal(signal.SIGCONT)
        if committed_already:
            return None
        time.sleep(0.001)  # the background writer has not created the staging directory yet


def committed(ckpt_dir: Path) -> list[int]:
    """Steps of the committed checkpoints (``checkpoint-<step>/``), oldest first."""
    return sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*"))


def names(steps: list[int]) -> str:
    return " ".join(f"checkpoint-{s}" for s in steps) or "(none)"


def print_save(ev: dict, saves: list[dict]) -> None:
    saves.append(ev)
    print(f"   step {ev['step']:3d}  loss {ev['loss']:.3f}  -> {ev['path']} committed;"
          f"  training stalled {ev['stall_ms']:5.1f} ms  (torch.save + fsync: {ev['torch_save_ms']:6.1f} ms)")


def main() -> None:
    started = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    run, ref = OUT / "run", OUT / "reference"
    ckpt_dir = run / "checkpoints"
    saves: list[dict] = []  # every committed save of the two checkpointing runs
    killed: dict = {}  # what happened to the first run
    config: dict = {}  # what the workers train

    # ---------------------------------------------------------------- 1 + 2: train, then kill mid-save
    def on_killed_run(ev: dict, procs: list[subprocess.Popen]) -> str | None:
        if ev["event"] == "config":
            config.update(ev)
            mib = ev["params"] * 4 * 3 / 2**20  # weights + AdamW's two moments, float32
            print(f"async_ckpt demo: MLP with {ev['params'] / 1e6:.1f}M parameters (~{mib:.0f} MiB of state with AdamW), "
                  f"DDP over {ev['world_size']} ranks (gloo, CPU), {ev['steps']} steps, a save every {ev['save_every']}")
            print(f"output: {OUT}/\n\n1. training with async saves (CheckpointManager, save_total_limit=3)")
        elif ev["event"] == "save":
            print_save(ev, saves)
        elif ev["event"] == "in_flight":
            # save() has returned on rank 0; the files are being written in the background.
            # Freeze both ranks mid-save, then SIGKILL them: no cleanup code runs, as in a crash.
            staging = freeze_during_save(procs, ckpt_dir, ev["step"])
            if staging is None:  # (rare) it committed before the freeze: catch the next save
                print(f"   (the save of step {ev['step']} committed before the freeze; waiting for the next one)")
                return None
            for p in procs:
                p.kill()
            killed.update(ev, pids=[p.pid for p in procs], staging=staging)
            return "stop"
        return None

    codes = run_ranks("killed", run, on_killed_run)
    if not killed:
        raise DemoFailed("the first run ended before a save could be caught in flight")
    check_exit("killed", run, codes, expected=-signal.SIGKILL)
    print("\n2. SIGKILL during a save")
    print(f"   step {killed['step']}: save() returned after {killed['stall_ms']:.1f} ms, training went on, files still being written"
          f"\n   -> SIGKILL to both ranks (pids {' '.join(map(str, killed['pids']))}), exit codes {codes}")
    torn = killed["staging"]
    if not torn.is_dir() or (ckpt_dir / f"checkpoint-{killed['step']}").exists():
        raise DemoFailed(f"expected a torn {torn.name}/ and no checkpoint-{killed['step']}/ after the kill")
    files = " ".join(sorted(p.name for p in torn.iterdir())) or "(empty)"
    print(f"   left behind: {torn.name}/  (torn: never read, never published)\n      holding: {files}")
    newest = max(committed(ckpt_dir), default=None)
    print(f"   committed:   {names(committed(ckpt_dir))}   (older ones removed by save_total_limit=3)")

    # ---------------------------------------------------------------- 3: the same command again
    print("\n3. restart: automatic resume")

    def on_resumed_run(ev: dict, procs: list[subprocess.Popen]) -> None:
        if ev["event"] == "start":
            if ev["leftovers"] or torn.exists():
                raise DemoFailed(f"the torn save was not cleaned up: {ev['leftovers']}")
            print(f"   CheckpointManager(...) removed the torn {torn.name}/ at start-up")
            killed["resumed"] = ev["resumed_step"]
            print(f"   mgr.load() -> resumed from step {ev['resumed_step']} ({ev['resumed_path']}/): model, AdamW, "
                  f"progress and each rank's RNG restored")
        elif ev["event"] == "save":
            print_save(ev, saves)
        elif ev["event"] == "done":
            print(f"   finished step {ev['step']}, final loss {ev['loss']:.3f}; committed: {names(committed(ckpt_dir))}")
            last = ckpt_dir / f"checkpoint-{ev['step']}"
            print(f"   {last.name}/ holds: {', '.join(sorted(p.name for p in last.iterdir()))}")

    check_exit("resumed", run, run_ranks("resumed", run, on_resumed_run))
    if killed.get("resumed") != newest:
        raise DemoFailed(f"resumed from step {killed.get('resumed')}, expected the newest committed one, {newest}")

    # ---------------------------------------------------------------- 4: compare with a straight run
    print("\n4. check: resumed == uninterrupted")
    check_exit("reference", ref, run_ranks("reference", ref, lambda ev, procs: None))
    resumed_params = torch.load(run / "final_params.pt", weights_only=True)
    reference_params = torch.load(ref / "final_params.pt", weights_only=True)
    equal = [name for name in reference_params if torch.equal(resumed_params[name], reference_params[name])]
    print(f"   reference run: {config['steps']} steps straight through, no checkpoints, no kill")
    print(f"   final parameters bitwise equal (torch.equal): {len(equal)}/{len(reference_params)} tensors")
    if len(equal) != len(reference_params) or resumed_params.keys() != reference_params.keys():
        diff = max((resumed_params[n] - reference_params[n]).abs().max().item() for n in reference_params)
        raise DemoFailed(f"the killed+resumed run differs from the reference (max |diff| {diff:.3g})")

    # ---------------------------------------------------------------- 5: the numbers
    stall = statistics.median(s["stall_ms"] for s in saves)
    baseline = statistics.median(s["torch_save_ms"] for s in saves)
    print("\n5. stall: async_ckpt vs torch.save")
    print(f"   {'':34s}{'median':>10s}{'min':>10s}{'max':>10s}   ({len(saves)} saves)")
    for label, key in (("async_ckpt save() stall", "stall_ms"), ("torch.save + fsync (same state)", "torch_save_ms")):
        values = [s[key] for s in saves]
        print(f"   {label:34s}{statistics.median(values):8.1f}ms{min(values):8.1f}ms{max(values):8.1f}ms")
    print(f"   training is blocked {baseline / stall:.1f}x shorter with async_ckpt (medians)")
    print(f"\ndemo OK ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    try:
        main()
    except DemoFailed as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
