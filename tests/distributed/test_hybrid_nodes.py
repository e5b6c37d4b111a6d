"""Two "nodes" on one machine: two torchrun launches (--nnodes=2) writing into one directory.

The test starts ``torchrun --nnodes=2 --node-rank=K --nproc-per-node=2`` twice in parallel with
this module as the worker (``-m tests.distributed.test_hybrid_nodes``), so every rank gets the
launcher's real LOCAL_RANK / GROUP_RANK / LOCAL_WORLD_SIZE. Round one saves twice (PER_NODE,
PER_RANK, GLOBAL and a "node" PER_GROUP over the node's ranks); round two, the same launch
again, resumes and checks every value. Each worker writes its findings to
``<out>/results/<phase>_rank<R>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_TORCHRUN = Path(sys.executable).with_name("torchrun")
TORCHRUN = [str(_TORCHRUN)] if _TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]


class Box:
    def __init__(self, value: float) -> None:
        self.tensor = torch.full((4,), float(value))

    def state_dict(self) -> dict:
        return {"w": self.tensor}

    def load_state_dict(self, state: dict) -> None:
        self.tensor.copy_(state["w"])


def _components(rank: int, node: int, seed: int):
    from async_ckpt import SharingPattern, StateComponent, rng_component

    return [
        StateComponent("model", Box(seed), required=True, file_format="torch"),
        StateComponent("cache", Box(seed * 100 + node), sharing_pattern=SharingPattern.PER_NODE),
        StateComponent("optimizer", Box(seed * 100 + 10 + rank), sharing_pattern=SharingPattern.PER_RANK),
        StateComponent("shard", Box(seed * 100 + 50 + node), sharing_pattern=SharingPattern.PER_GROUP, group="node"),
        rng_component(),
    ]


def worker(out: Path, phase: str) -> None:
    """One torchrun worker: save (phase "save") or resume and compare (phase "resume")."""
    import torch.distributed as dist

    from async_ckpt import CheckpointManager

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    node, local = int(os.environ["GROUP_RANK"]), int(os.environ["LOCAL_RANK"])
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    groups = [dist.new_group(list(range(n * per_node, (n + 1) * per_node))) for n in range(world // per_node)]
    result = {"rank": rank, "node": node, "local_rank": local, "world": world}
    comps = _components(rank, node, 1 if phase == "save" else 0)
    with CheckpointManager(out / "run", comps, process_groups={"node": groups[node]}, timeout_s=60) as mgr:
        if phase == "save":
            mgr.save(4).wait()
            result["committed"] = str(mgr.save(5).wait())
        else:
            loaded = mgr.load()
            result["step"] = loaded.step
            expected = _components(rank, node, 1)
            result["mismatched"] = [a.key for a, b in zip(comps, expected) if a.key != "rng" and not torch.equal(a.stateful.tensor, b.stateful.tensor)]
    dist.destroy_process_group()
    (out / "results").mkdir(exist_ok=True)
    (out / "results" / f"{phase}_rank{rank}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------------- the test


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_nodes(out: Path, phase: str, timeout: float = 90) -> None:
    """Start both launches at once and wait for both; kill them (by process group) on a hang."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    for name in ("LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    procs, logs = [], []
    for node in (0, 1):
        log = open(out / f"{phase}_node{node}.log", "w")  # noqa: SIM115 - closed below
        cmd = [*TORCHRUN, "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={port}", "-m", "tests.distributed.test_hybrid_nodes", "--out", str(out), "--phase", phase]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        text = "\n".join((out / f"{phase}_node{n}.log").read_text()[-3000:] for n in (0, 1))
        raise AssertionError(f"torchrun {phase}: exit codes {codes}\n{text}")


def _results(out: Path, phase: str) -> list[dict]:
    return [json.loads((out / "results" / f"{phase}_rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_two_torchrun_launches_share_one_checkpoint_directory(tmp_path: Path) -> None:
    from async_ckpt.cli import main as cli_main

    _launch_two_nodes(tmp_path, "save")
    saved = _results(tmp_path, "save")
    assert [(r["node"], r["local_rank"]) for r in saved] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    ckpt = tmp_path / "run" / "checkpoint-5"
    assert all(r["committed"] == str(ckpt) for r in saved)
    assert sorted(n for n in os.listdir(tmp_path / "run") if n != "async_ckpt.lock") == ["checkpoint-4", "checkpoint-5"]
    manifest = json.loads((ckpt / "checkpoint_manifest.json").read_text())
    files = manifest["files"]
    assert manifest["world_size"] == 4
    assert {n: (f["slot"], f["rank"]) for n, f in files.items() if f["component"] in ("cache", "shard")} == {
        "cache_state_node_0.pt": ("node:0", 0), "cache_state_node_1.pt": ("node:1", 2),
        "shard_state_group_node_0.pt": ("group:node:0", 0), "shard_state_group_node_1.pt": ("group:node:1", 2)}
    assert manifest["components"]["cache"]["ranks"] == [0, 2]
    assert sorted(n for n in files if n.startswith("optimizer")) == [f"optimizer_state_rank_{r}.pt" for r in range(4)]
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert cli_main(["inspect", str(ckpt)]) == 0
    assert "cache_state_node_1.pt" in shown.getvalue() and "node:1" in shown.getvalue()

    _launch_two_nodes(tmp_path, "resume")
    for result in _results(tmp_path, "resume"):
        assert result["step"] == 5 and result["mismatched"] == [], result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phase", choices=["save", "resume"], required=True)
    args = parser.parse_args()
    worker(args.out, args.phase)
