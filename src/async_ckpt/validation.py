"""Replication validation: check that a REPLICATED component is the same on every rank.

Called on the training thread by every rank of the checkpoint's group at save time, before the
snapshot. Every check is a collective on that group (gloo, used only by the training thread),
and every rank reaches the same verdict: each rank's digests (or bytes) are gathered to all ranks,
every rank compares every rank with rank 0, and on any difference every rank raises
``ReplicationValidationError`` with the same text (only its own ``[rank N]`` differs).

Ranks in messages are ranks of ``group``, like everywhere else in async_ckpt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from .components import ValidationLevel
from .errors import ReplicationValidationError, describe

logger = logging.getLogger(__name__)

WHOLE_STATE = "<whole state>"  # digest_tree(per_tensor=False): the one key
NON_TENSOR = "<non-tensor values>"  # digest_tree(per_tensor=True): all leaves that are not tensors
MAX_LISTED = 5  # differing paths named in an error message


def digest_tree(state_dict: Any, per_tensor: bool, *, with_bytes: bool = True) -> dict[str, str]:
    """Digest a state dict: ``{WHOLE_STATE: hex}``, or ``{path: "dtype[shape]#hex", NON_TENSOR: hex}``.

    Pure; called by ``validate_replication`` on the training thread. Nested dicts, lists, tuples
    and sets are walked at any depth in a deterministic order (dict keys and set items sorted),
    paths are dotted (``state.0.exp_avg``). Tensors are hashed (xxh3-128) by dtype, shape and raw
    bytes (any dtype, bfloat16 included; CUDA tensors are copied to CPU). Other leaves are hashed
    by type and ``repr`` (numpy arrays by their bytes), so a leaf whose repr holds a memory
    address will differ between ranks. ``with_bytes=False`` gives ``dtype[shape]`` only (FULL).
    """
    whole = xxhash.xxh3_128()
    values = xxhash.xxh3_128()
    out: dict[str, str] = {}
    for path, leaf in _walk(state_dict, ""):
        if not isinstance(leaf, torch.Tensor):
            (values if per_tensor else whole).update(f"V\0{path}\0{leaf}\0".encode())
            continue
        meta = f"{leaf.dtype}{list(leaf.shape)}"
        if per_tensor and not with_bytes:
            _check_readable(leaf, path)
            out[path] = meta
        elif per_tensor:
            out[path] = f"{meta}#{xxhash.xxh3_128_hexdigest(_tensor_bytes(leaf, path))}"
        else:
            whole.update(f"T\0{path}\0{meta}\0".encode())
            whole.update(_tensor_bytes(leaf, path))
    if not per_tensor:
        return {WHOLE_STATE: whole.hexdigest()}
    out[NON_TENSOR] = values.hexdigest()
    return out


def compare_digests(all_ranks: list[dict[str, str]]) -> list[str]:
    """Compare every rank's ``digest_tree`` with rank 0's; return the problems, one line each.

    Pure; called by ``validate_replication`` on every rank with the same gathered list, so every
    rank gets the same lines: tensor paths first, sorted, each naming the ranks that share it.
    """
    return _group(_find(all_ranks))


def _find(all_ranks: list[dict[str, str]]) -> list[tuple[str, str, int]]:
    """``(path, detail, rank)`` for every way a rank's digests differ from rank 0's."""
    ref = all_ranks[0]
    found: list[tuple[str, str, int]] = []
    for r, mine in enumerate(all_ranks[1:], start=1):
        for path in sorted(ref.keys() | mine.keys()):
            if path not in mine:
                found.append((path, "missing", r))
            elif path not in ref:
                found.append((path, "not on rank 0, present", r))
            elif mine[path] != ref[path]:
                meta0, meta = ref[path].split("#")[0], mine[path].split("#")[0]
                is_tensor = path not in (WHOLE_STATE, NON_TENSOR)
                detail = f"is {meta} (rank 0: {meta0})" if is_tensor and meta != meta0 else "differs"
                found.append((path, detail, r))
    return found


def validate_replication(
    key: str,
    state_dict: Any,
    level: ValidationLevel,
    group: "dist.ProcessGroup | None",
    *,
    rank: int,
    step: int | None = None,
) -> None:
    """Check that ``state_dict`` is the same on every rank of ``group``; raise if not.

    Called by every rank of the checkpoint, on the training thread, at save time before the
    snapshot. A collective on ``group`` (gloo): blocks until every rank has called it (and, for
    FULL, on one ``all_gather`` per tensor, using world_size x the component's memory). Returns
    at once for NONE, ``group=None`` or a group of one rank. Raises ``ReplicationValidationError``
    on every rank if any rank differs from rank 0, or if any rank could not digest its state.
    """
    level = ValidationLevel(level)
    if level is ValidationLevel.NONE or group is None or dist.get_world_size(group) < 2:
        return
    start = time.perf_counter()
    per_tensor, with_bytes = level is not ValidationLevel.QUICK, level is not ValidationLevel.FULL
    payload: tuple[dict[str, str] | None, str | None]
    try:
        payload = (digest_tree(state_dict, per_tensor, with_bytes=with_bytes), None)
    except Exception as exc:  # noqa: BLE001 - every rank must still join the gather below
        payload = (None, f"{type(exc).__name__}: {exc}")
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, payload, group=group)
    found = [("<digest>", f"failed ({err})", r) for r, (_, err) in enumerate(gathered) if err]
    found = found or _find([digests for digests, _ in gathered])
    if not found and level is ValidationLevel.FULL:
        found = _compare_bytes(state_dict, group)
    logger.debug("[rank %s step %s] %s validation of '%s': %d problem(s) in %.3fs",
                 rank, step, level.value, key, len(found), time.perf_counter() - start)
    if found:
        raise ReplicationValidationError(_message(key, level, found, rank, step))


def _compare_bytes(state_dict: Any, group: "dist.ProcessGroup") -> list[tuple[str, str, int]]:
    """FULL: all-gather each tensor's bytes (shapes already agree) and compare with rank 0's."""
    world = dist.get_world_size(group)
    found: list[tuple[str, str, int]] = []
    for path, leaf in _walk(state_dict, ""):  # same order on every rank: the structure agreed
        if isinstance(leaf, torch.Tensor):
            mine = torch.from_numpy(_tensor_bytes(leaf, path))
            copies = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(copies, mine, group=group)
            found += [(path, "bytes differ", r) for r in range(1, world)
                      if not torch.equal(copies[r], copies[0])]
    return found


def _message(key: str, level: ValidationLevel, found: list[tuple[str, str, int]],
             rank: int, step: int | None) -> str:
    """The one error text every rank raises (only the ``[rank N step S]`` part differs)."""
    ranks = ", ".join(str(r) for r in sorted({r for _, _, r in found}))
    failed = found[0][0] == "<digest>"
    summary = f"rank(s) {ranks} could not be checked" if failed else f"rank(s) {ranks} differ from rank 0"
    problems = _group(found)
    shown = "; ".join(problems[:MAX_LISTED])
    if len(problems) > MAX_LISTED:
        shown += f"; and {len(problems) - MAX_LISTED} more"
    where = describe("", rank=rank, step=step).strip()
    hint = ("every rank must hold readable CPU or CUDA tensors" if failed else "a REPLICATED component "
            "must be identical on every rank: find where the ranks diverged, or save it PER_RANK")
    return (f"Replication validation failed for component '{key}' {where}: {summary} "
            f"({level.value} check): {shown}. Fix: {hint}.")


def _group(found: list[tuple[str, str, int]]) -> list[str]:
    """``[(path, detail, rank)]`` -> ``["'path' detail on rank(s) 1, 2"]``; tensor paths first, sorted."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for path, detail, r in found:
        ranks.setdefault((path, detail), []).append(r)
    order = sorted(ranks, key=lambda pd: (pd[0] in (NON_TENSOR, WHOLE_STATE), pd))
    return [f"'{p}' {d} on rank(s) {', '.join(map(str, ranks[(p, d)]))}" for p, d in order]


def _walk(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(path, leaf)``: tensors as they are, every other leaf and container as a record string."""
    if isinstance(obj, torch.Tensor):
        yield path or "<root>", obj
    elif isinstance(obj, dict):
        yield path, f"{type(obj).__name__}[{len(obj)}]"
        seen: set[str] = set()
        for k, v in sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, str(kv[0]))):
            seg = str(k) if str(k) not in seen else repr(k)  # {0: .., "0": ..} must not collide
            seen.add(seg)
            yield from _walk(v, f"{path}.{seg}" if path else seg)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        # set order follows str hashes, which differ between processes: sort
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        yield path, f"{type(obj).__name__}[{len(items)}]"
        for i, v in enumerate(items):
            yield from _walk(v, f"{path}.{i}" if path else str(i))
    elif isinstance(obj, np.ndarray) and obj.dtype != object:
        data = xxhash.xxh3_128_hexdigest(np.ascontiguousarray(obj).tobytes())
        yield path, f"ndarray {obj.dtype.str}{list(obj.shape)} {data}"
    else:
        yield path, f"{type(obj).__qualname__} {obj!r}"


def _check_readable(t: torch.Tensor, path: str) -> None:
    if t.device.type == "meta":
        raise ValueError(f"tensor '{path}' is on the meta device and has no data")


def _tensor_bytes(t: torch.Tensor, path: str) -> np.ndarray:
    """A tensor's raw bytes as a flat uint8 array on CPU (no copy for contiguous CPU tensors)."""
    _check_readable(t, path)
    t = t.detach()
    if t.layout is not torch.strided:
        t = t.to_dense()
    t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy()
