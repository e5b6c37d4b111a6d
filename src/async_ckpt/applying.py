"""The apply step of a load: every component is restored, or every live object is left as it was.

Two halves, both on the training thread of every rank:

- ``check_states`` (before anything is touched): for the components whose fit can be checked in
  advance, ``nn.Module`` (keys, shapes, dtype kinds) and ``torch.optim.Optimizer`` (groups, their
  sizes, per-parameter state shapes), it lists every way the checkpoint does not fit. The
  manager gathers these from every rank and raises one ``CheckpointLoadError`` on all of them.
- ``apply_all``: the components that cannot be checked in advance (any other Stateful: LR
  schedulers, GradScaler, RNG, data loaders, user objects) are applied first, each after a
  backup of its own ``state_dict()``; if one fails on any rank, every rank restores them from the
  backups and raises. Then the checked ones are applied. A module or optimizer whose
  ``load_state_dict`` still fails after passing its check (a custom hook) is named in the error
  as possibly partly overwritten.

A module's names are matched through ``torch.compile`` wrappers: a checkpoint saved with
``_orig_mod.`` in its names loads into a plain module and the other way round.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .components import StateComponent
from .errors import CheckpointLoadError

logger = logging.getLogger(__name__)

COMPILE_SEGMENT = "_orig_mod."  # what torch.compile's OptimizedModule adds to every name
MAX_LISTED = 5  # names listed per problem in a message
_FIX = (
    "load a checkpoint of this architecture, or start fresh (a new output_dir, or resume_from_checkpoint=False "
    "in the trainers); for an optional component, delete its file from the checkpoint and load with strict=False"
)
# optimizer state entries that have their parameter's shape (torch.optim's per-element buffers)
_PARAM_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                           "sum", "ax", "prev", "step_size", "grad_avg", "mu_product_buffer"})


def plain_name(name: str) -> str:
    """``name`` without ``torch.compile``'s ``_orig_mod.`` segments."""
    return name.replace(COMPILE_SEGMENT, "") if COMPILE_SEGMENT in name else name


def checkable(stateful: Any) -> bool:
    """Whether ``stateful``'s fit can be checked in advance: a module or optimizer with no load hooks."""
    if isinstance(stateful, torch.nn.Module):
        return not any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks for m in stateful.modules())
    if isinstance(stateful, torch.optim.Optimizer):
        return not (stateful._optimizer_load_state_dict_pre_hooks or stateful._optimizer_load_state_dict_post_hooks)
    return False


def check_states(states: Mapping[str, Any], components: list[StateComponent]) -> list[str]:
    """Every way the read ``states`` do not fit the live checkable components; touches nothing.

    Called by ``loading.load_checkpoint`` on the training thread of every rank, before the
    verdicts are gathered. Pure apart from calling ``state_dict()`` on the live objects.
    """
    problems: list[str] = []
    for component in components:
        if component.key not in states or not checkable(component.stateful):
            continue
        state = states[component.key]
        try:
            if isinstance(component.stateful, torch.nn.Module):
                found = _module_problems(component.stateful, match_names(component.stateful, state))
            else:
                found = _optimizer_problems(component.stateful, state)
        except Exception as exc:  # noqa: BLE001 - every rank must still reach the gather
            found = [f"could not be checked ({type(exc).__name__}: {exc})"]
        problems += [f"component '{component.key}': {p}" for p in found]
    if problems:
        problems[-1] += f". What to do: {_FIX}"
    return problems


def match_names(module: torch.nn.Module, state: Any) -> Any:
    """``state`` with its names spelled as ``module`` spells them (through ``_orig_mod.`` segments)."""
    if not isinstance(state, Mapping):
        return state
    live = module.state_dict(keep_vars=True).keys()
    if all(k in live for k in state if isinstance(k, str)):
        return state
    by_plain = {plain_name(k): k for k in live}
    renamed = type(state)() if type(state) in (dict, OrderedDict) else {}
    for k, v in state.items():
        renamed[by_plain.get(plain_name(k), k) if isinstance(k, str) else k] = v
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        renamed._metadata = metadata  # type: ignore[attr-defined]
    return renamed


def apply_all(
    states: Mapping[str, Any],
    components: list[StateComponent],
    *,
    rank: int,
    step: int,
    path: Path,
    gather: Callable[[Any], list[Any]],
) -> list[str]:
    """Restore every component in ``states``; on any rank's failure leave every live object as it was.

    Training thread, every rank; two collectives (``gather`` of each phase's failure), so every
    rank raises the same ``CheckpointLoadError``. Returns the keys restored, in component order.
    """
    chosen = [c for c in components if c.key in states]
    generic = [c for c in chosen if not checkable(c.stateful)]
    generic_keys = {c.key for c in generic}
    backups: list[tuple[StateComponent, Callable[[], None]]] = []
    failure = ""
    for component in generic:
        try:
            backups.append((component, _snapshot(component.stateful)))
        except Exception as exc:  # noqa: BLE001 - no backup: apply it last among these, without one
            logger.debug("[rank %d] component '%s': no backup before load (%s)", rank, component.key, exc)
        failure = _apply(component, states[component.key], rank, step, path)
        if failure:
            break
    failures = [f for f in gather(failure) if f]
    if failures:
        _restore(backups, rank)
        raise CheckpointLoadError("; ".join(failures) + f". Nothing was loaded. What to do: {_FIX}")
    for component in chosen:
        if component.key in generic_keys:
            continue
        failure = _apply(component, states[component.key], rank, step, path)
        if failure:
            failure += " (this object may be partly overwritten: rebuild it before loading again)"
            break
    failures = [f for f in gather(failure) if f]
    if failures:
        _restore(backups, rank)
        raise CheckpointLoadError("; ".join(failures) + f". What to do: {_FIX}")
    return [c.key for c in chosen]


def _apply(component: StateComponent, state: Any, rank: int, step: int, path: Path) -> str:
    """Call ``load_state_dict``; return why it failed, or ""."""
    stateful = component.stateful
    try:
        if isinstance(stateful, torch.nn.Module):
            state = match_names(stateful, state)
        stateful.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - reported to every rank
        return f"[rank {rank} step {step} component '{component.key}'] load_state_dict failed: {type(exc).__name__}: {exc} (path: {path})"
    return ""


_LOADER_FIELDS = ("_iterator", "next_iter_state", "_initial_iter_for_state_dict")  # torchdata's StatefulDataLoader


def _snapshot(stateful: Any) -> Callable[[], None]:
    """What puts ``stateful`` back as it is now, taken without changing it.

    A ``StatefulDataLoader``'s ``state_dict()`` starts an iterator (drawing from its generator, and
    starting workers): its own fields are kept by reference instead, which its
    ``load_state_dict`` only replaces. Anything else: a copy of its ``state_dict()``, taken with
    the global RNG forked so a ``state_dict()`` that draws from it leaves the stream as it was.
    """
    if all(hasattr(stateful, f) for f in _LOADER_FIELDS):
        fields = {f: getattr(stateful, f) for f in _LOADER_FIELDS}
        return lambda: [setattr(stateful, f, v) for f, v in fields.items()] and None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        backup = _backup(stateful.state_dict())
    return lambda: stateful.load_state_dict(_unbackup(backup))


def _restore(backups: list[tuple[StateComponent, Callable[[], None]]], rank: int) -> None:
    for component, restore in reversed(backups):
        try:
            restore()
        except Exception as exc:  # noqa: BLE001 - restore the others still
            logger.error("[rank %d] component '%s' could not be restored after a failed load: %s: %s",
                         rank, component.key, type(exc).__name__, exc)


class _Moved:
    """A device tensor backed up in host memory, and where it goes back."""

    __slots__ = ("device", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.device = tensor.detach().to("cpu", copy=True), tensor.device


def _backup(value: Any) -> Any:
    """A copy of a state dict that later changes to the live object cannot reach (device tensors go to host)."""
    if isinstance(value, torch.Tensor) and type(value) in (torch.Tensor, torch.nn.Parameter) and value.device.type != "cpu":
        return _Moved(value)
    if type(value) in (dict, OrderedDict):
        out = type(value)((k, _backup(v)) for k, v in value.items())
        if getattr(value, "_metadata", None) is not None:
            out._metadata = copy.deepcopy(value._metadata)  # type: ignore[attr-defined]
        return out
    if type(value) in (list, tuple):
        return type(value)(_backup(v) for v in value)
    return copy.deepcopy(value)


def _unbackup(value: Any) -> Any:
    if type(value) is _Moved:
        return value.tensor.to(value.device)
    if type(value) in (dict, OrderedDict):
        out = type(value)((k, _unbackup(v)) for k, v in value.items())
        if getattr(value, "_metadata", None) is not None:
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if type(value) in (list, tuple):
        return type(value)(_unbackup(v) for v in value)
    return value


def _module_problems(module: torch.nn.Module, state: Any) -> list[str]:
    if not isinstance(state, Mapping):
        return [f"the checkpoint holds a {type(state).__name__}, not a state dict"]
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]  # BatchNorm fills it in
    unexpected = [k for k in state if k not in own]
    problems = []
    if missing:
        problems.append(f"{len(missing)} name(s) of the model are not in the checkpoint ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} name(s) of the checkpoint are not in the model ({_some(unexpected)})")
    shapes, kinds = [], []
    for name, live in own.items():
        saved = state.get(name)
        if not isinstance(saved, torch.Tensor) or not isinstance(live, torch.Tensor):
            continue
        if saved.shape != live.shape:
            shapes.append(f"'{name}' is {list(saved.shape)} in the checkpoint, {list(live.shape)} in the model")
        elif _kind(saved.dtype) != _kind(live.dtype):
            kinds.append(f"'{name}' is {saved.dtype} in the checkpoint, {live.dtype} in the model")
    if shapes:
        problems.append(f"{len(shapes)} shape(s) differ: " + "; ".join(shapes[:MAX_LISTED]) + ("; ..." if len(shapes) > MAX_LISTED else ""))
    if kinds:
        problems.append(f"{len(kinds)} dtype(s) cannot be copied without loss: " + "; ".join(kinds[:MAX_LISTED]))
    return problems


def _optimizer_problems(optimizer: torch.optim.Optimizer, state: Any) -> list[str]:
    if not isinstance(state, Mapping) or not isinstance(state.get("param_groups"), list) or not isinstance(state.get("state"), Mapping):
        return ["the checkpoint holds no optimizer state dict (with 'state' and 'param_groups')"]
    saved_groups, live_groups = state["param_groups"], optimizer.param_groups
    saved_sizes = [len(g.get("params", ())) if isinstance(g, Mapping) else None for g in saved_groups]
    live_sizes = [len(g["params"]) for g in live_groups]
    if saved_sizes != live_sizes:
        return [f"the checkpoint's optimizer has {len(saved_sizes)} parameter group(s) of sizes {saved_sizes}, this one "
                f"has {len(live_sizes)} of sizes {live_sizes}"]
    params = {pid: p for g, lg in zip(saved_groups, live_groups) for pid, p in zip(g["params"], lg["params"])}
    problems = []
    unknown = [k for k in state["state"] if k not in params]
    if unknown:
        problems.append(f"state for parameter id(s) {_some(unknown)} that no group lists")
    shapes = []
    for pid, entry in state["state"].items():
        param = params.get(pid)
        if param is None or not isinstance(entry, Mapping):
            continue
        for name, value in entry.items():
            if name in _PARAM_SHAPED and isinstance(value, torch.Tensor) and value.shape != param.shape:
                shapes.append(f"'state.{pid}.{name}' is {list(value.shape)}, its parameter {list(param.shape)}")
    if shapes:
        problems.append(f"{len(shapes)} state shape(s) differ from their parameters': " + "; ".join(shapes[:MAX_LISTED]))
    return problems


def _kind(dtype: torch.dtype) -> str:
    if dtype is torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def _some(names: list[Any]) -> str:
    shown = ", ".join(repr(n) for n in names[:MAX_LISTED])
    return shown + (f", and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")
