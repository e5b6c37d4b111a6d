"""Run a function on several real gloo ranks, one process each, and collect what they return.

The one helper every multi-process test goes through::

    def _allreduce(rank, world_size, value):          # module level: it is pickled by name
        t = torch.tensor([value * (rank + 1)])
        dist.all_reduce(t)
        return t.item()

    def test_allreduce():
        assert run_ranks(_allreduce, 2, 1.0) == [3.0, 3.0]

How it works. The parent (the pytest process) hosts a c10d ``TCPStore`` on 127.0.0.1 on a port
the OS picks, so the store outlives every rank and no rank can take it down by finishing first.
It starts ``world_size`` processes with the ``spawn`` context. Each child applies the test's
environment, sets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``, calls
``torch.set_num_threads(1)``, joins the store as a client, runs
``init_process_group("gloo", store=...)``, calls ``fn(rank, world_size, *args)``, destroys the
process group and sends back one message on its own pipe: the pickled return value, or the
exception's type name, message and formatted traceback.

Every wait has a deadline. A rank that has not reported when ``timeout`` runs out gets SIGUSR1
(``faulthandler`` dumps all its threads' Python stacks), then every child is killed and an
``AssertionError`` names the ranks that did not finish, with their stacks and any other rank's
error. Children are always joined or killed before the helper returns: no zombies.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from datetime import timedelta
from multiprocessing import connection, get_context
from pathlib import Path
from typing import Any, Optional, Union

EnvSpec = Union[Mapping[str, Optional[str]], Callable[[int], Mapping[str, Optional[str]]], None]

# Launcher variables that must not leak from the parent's environment into a rank: a test that
# wants a multi-node layout says so through ``env``.
_LAUNCHER_VARS = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK")
_STACK_DUMP_WAIT_S = 2.0  # time given to a hung rank to write its stacks before it is killed
_EXIT_GRACE_S = 10.0  # time given to a rank that reported to exit on its own


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120,
    env: EnvSpec = None,
    tmp_path: Optional[Union[str, os.PathLike]] = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    Called from the test (main) thread; blocks at most about ``timeout`` seconds plus a few
    seconds of clean-up. ``fn`` and ``args`` must be picklable (``fn`` defined at module level)
    and so must what ``fn`` returns.

    ``env``: extra environment for every rank, a dict, or a callable ``rank -> dict`` for
    per-rank values such as ``LOCAL_RANK``/``GROUP_RANK``; a value of ``None`` unsets the name.
    ``tmp_path``: where the stack dumps of hung ranks are kept (``<tmp_path>/_run_ranks/``);
    by default a private temporary folder, removed afterwards.

    Raises ``AssertionError`` if any rank raised or died (with every failing rank's traceback)
    or did not finish within ``timeout`` (naming those ranks, with their stacks).
    """
    outcomes = _run(fn, world_size, args, timeout, env, tmp_path)
    failures = [f"rank {r}: {o[1]}: {o[2]}\n{o[3]}" for r, o in enumerate(outcomes) if o[0] != "ok"]
    if failures:
        raise AssertionError(
            f"{len(failures)} of {world_size} ranks failed in {_name(fn)}:\n\n" + "\n".join(failures)
        )
    return [o[1] for o in outcomes]


def run_ranks_expect(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120,
    env: EnvSpec = None,
    tmp_path: Optional[Union[str, os.PathLike]] = None,
) -> list[tuple]:
    """Like ``run_ranks`` but does not raise for ranks that raised: for tests expecting errors.

    Returns one tuple per rank, by rank: ``("ok", value)`` or ``("error", exc_type_name,
    message)``. A rank that died without reporting (``os._exit``, a signal) reads
    ``("error", "ProcessDied", "exit code N")``. A hang is never expected: it still raises
    ``AssertionError``.
    """
    outcomes = _run(fn, world_size, args, timeout, env, tmp_path)
    return [("ok", o[1]) if o[0] == "ok" else ("error", o[1], o[2]) for o in outcomes]


# ---------------------------------------------------------------------------------------------
# parent side


def _run(fn, world_size, args, timeout, env, tmp_path) -> list[tuple]:
    """Start the ranks, collect one outcome per rank, always reap every child."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    try:
        payload = pickle.dumps((fn, args))
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise TypeError(
            f"run_ranks: {_name(fn)} and its args must be picklable (define fn at module level): "
            f"{exc}"
        ) from exc
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=timeout), wait_for_workers=False)
    dump_dir, own_dir = _dump_dir(tmp_path)
    ctx = get_context("spawn")
    procs, conns = [], []
    grace = 0.0  # kill at once unless every rank reported
    try:
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe(duplex=False)
            rank_env = _rank_env(env, rank)
            proc = ctx.Process(
                target=_child_main,
                args=(rank, world_size, store.port, timeout, rank_env, payload, child_end,
                      str(dump_dir / f"rank_{rank}.stacks")),
                name=f"run_ranks-rank{rank}",
                daemon=False,  # a rank may start processes of its own (data loader workers)
            )
            proc.start()
            child_end.close()  # so the parent sees EOF if the child dies before sending
            procs.append(proc)
            conns.append(parent_end)
        outcomes = _collect(procs, conns, time.monotonic() + timeout)
        hung = [r for r, o in enumerate(outcomes) if o is None]
        if hung:
            _dump_stacks(procs, hung)
            raise AssertionError(_hang_report(fn, timeout, outcomes, hung, dump_dir))
        grace = _EXIT_GRACE_S
        return outcomes
    finally:
        _reap(procs, grace)
        for conn in conns:
            conn.close()
        del store
        if own_dir:
            shutil.rmtree(dump_dir, ignore_errors=True)


def _rank_env(env: EnvSpec, rank: int) -> dict:
    if env is None:
        return {}
    values = env(rank) if callable(env) else env
    return {str(k): (None if v is None else str(v)) for k, v in dict(values).items()}


def _dump_dir(tmp_path) -> tuple[Path, bool]:
    if tmp_path is None:
        return Path(tempfile.mkdtemp(prefix="run_ranks_")), True
    path = Path(tmp_path) / "_run_ranks"
    path.mkdir(parents=True, exist_ok=True)
    return path, False


def _collect(procs, conns, deadline: float) -> list[Optional[tuple]]:
    """Read one message per rank until all reported, died, or the deadline passed (-> None)."""
    outcomes: list[Optional[tuple]] = [None] * len(procs)
    pending = set(range(len(procs)))
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        connection.wait([conns[r] for r in pending], timeout=remaining)
        for rank in list(pending):
            if not conns[rank].poll():
                continue
            outcomes[rank] = _receive(conns[rank], procs[rank])
            pending.discard(rank)
    return outcomes


def _receive(conn, proc) -> tuple:
    try:
        return pickle.loads(conn.recv_bytes())
    except EOFError:
        proc.join(5)
        code = proc.exitcode
        return ("error", "ProcessDied", f"exit code {code}", f"(process exited with code {code} "
                "without reporting a result)")
    except Exception as exc:  # noqa: BLE001 - an unreadable result is that rank's failure
        return ("error", type(exc).__name__, f"could not unpickle the result: {exc}",
                traceback.format_exc())


def _dump_stacks(procs, ranks: list[int]) -> None:
    for rank in ranks:
        if procs[rank].is_alive() and procs[rank].pid is not None:
            try:
                os.kill(procs[rank].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
    time.sleep(_STACK_DUMP_WAIT_S)


def _hang_report(fn, timeout, outcomes, hung, dump_dir: Path) -> str:
    lines = [f"ranks {hung} of {len(outcomes)} did not finish {_name(fn)} within {timeout} s; "
             "all ranks were killed."]
    for rank, outcome in enumerate(outcomes):
        if outcome is not None and outcome[0] != "ok":
            lines.append(f"\nrank {rank} failed: {outcome[1]}: {outcome[2]}\n{outcome[3]}")
    for rank in hung:
        stacks = dump_dir / f"rank_{rank}.stacks"
        text = stacks.read_text(errors="replace").strip() if stacks.exists() else ""
        lines.append(f"\nrank {rank} stacks at the deadline:\n{text or '(none written)'}")
    return "\n".join(lines)


def _reap(procs, grace: float) -> None:
    """Join every child; kill those still running after ``grace`` seconds. Leaves no zombies.

    A rank that reported but does not exit within the grace period (a non-daemon thread left
    running, say) is killed with a warning: the test still passes, the leak is visible.
    """
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    lingering = [p for p in procs if p.is_alive()]
    for proc in lingering:
        proc.kill()
    for proc in lingering:
        proc.join(10)
    if lingering and grace > 0:
        names = [p.name for p in lingering]
        warnings.warn(f"run_ranks: {names} did not exit {grace} s after reporting; killed",
                      stacklevel=4)


def _name(fn) -> str:
    return getattr(fn, "__qualname__", repr(fn))


# ---------------------------------------------------------------------------------------------
# child side


def _child_main(rank, world_size, port, timeout, rank_env, payload, conn, stacks_path) -> None:
    """Entry point of one rank's process; sends exactly one message on ``conn``."""
    stacks_file = open(stacks_path, "w")  # noqa: SIM115 - faulthandler needs it open until exit
    faulthandler.register(signal.SIGUSR1, file=stacks_file, all_threads=True)
    for name in _LAUNCHER_VARS:
        os.environ.pop(name, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    for name, value in rank_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        result = ("ok", _run_fn(rank, world_size, port, timeout, payload))
        message = pickle.dumps(result)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        message = pickle.dumps(("error", type(exc).__name__, str(exc), traceback.format_exc()))
    conn.send_bytes(message)
    conn.close()


def _run_fn(rank, world_size, port, timeout, payload) -> Any:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, False, timedelta(seconds=timeout))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    try:
        fn, args = pickle.loads(payload)
        return fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
