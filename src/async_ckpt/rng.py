"""Random number generator state: Python, NumPy, torch CPU and every CUDA device.

``RNGState`` is an ordinary Stateful component. Its state dict holds plain containers and tensors
only, so it is written with ``torch.save`` and read back with ``torch.load(weights_only=True)``::

    {"python": {"version": 3, "state": int64[625], "gauss_next": float | None},
     "numpy": {"bit_generator": "MT19937", "keys": int64[624], "pos": int,
               "has_gauss": int, "cached_gaussian": float},        # absent without NumPy
     "torch_cpu": uint8[N],
     "cuda": [uint8[M], ...],                                      # absent without CUDA
     "torch_initial_seed": int}                                    # informational only

Each rank has its own generators, so the component is PER_RANK (``rng_state_rank_N.pt``).

Another world size. Streams cannot map one to one when a job resumes on more or fewer ranks,
so each new rank's state is derived deterministically from the saved ones (``rederive``):
rank ``r`` below the saved world size keeps saved rank ``r``'s state exactly; a rank beyond it
gets fresh generators seeded with ``xxh3_64(saved rank r % W's torch CPU state || r)``, so
the same resume always draws the same numbers and no two new ranks share a stream. Rank 0 logs
one warning; the load is never refused for it.
"""

from __future__ import annotations

import logging
import random
from typing import Any, NoReturn

import torch
import xxhash

from .components import SharingPattern, StateComponent
from .errors import CheckpointLoadError

try:
    import numpy as np
except ImportError:  # NumPy is optional
    np = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


class RNGState:
    """Captures and restores every process-global random generator of this rank.

    Both methods are called on the training thread by the checkpoint manager: ``state_dict()``
    during the snapshot of ``save()``, ``load_state_dict()`` during ``load()``. Neither blocks on
    other ranks; capturing CUDA state synchronises with each device.
    """

    def state_dict(self) -> dict[str, Any]:
        """Return a point-in-time copy of every generator's state (new tensors, not views)."""
        version, internal, gauss_next = random.getstate()
        sd: dict[str, Any] = {
            "python": {
                "version": int(version),
                "state": torch.tensor(internal, dtype=torch.int64),
                "gauss_next": gauss_next,
            },
            "torch_cpu": torch.get_rng_state(),
            "torch_initial_seed": int(torch.initial_seed()),
        }
        if np is not None:
            name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
            sd["numpy"] = {
                "bit_generator": str(name),
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }
        if torch.cuda.is_available():
            sd["cuda"] = list(torch.cuda.get_rng_state_all())
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generators from ``state_dict``; a missing ``numpy`` or ``cuda`` is skipped.

        Types and shapes are checked before any generator is touched; a malformed state dict
        raises ``CheckpointLoadError``.
        """
        if not isinstance(state_dict, dict):
            _fail(f"expected a dict, got {type(state_dict).__name__}")
        python = _python_state(_require(state_dict, "python", dict))
        torch_cpu = _byte_tensor(_require(state_dict, "torch_cpu", torch.Tensor), "torch_cpu")
        if torch_cpu.numel() != torch.get_rng_state().numel():
            _fail(f"'torch_cpu' has {torch_cpu.numel()} bytes, expected {torch.get_rng_state().numel()}")
        numpy_state = None if state_dict.get("numpy") is None else _numpy_state(_require(state_dict, "numpy", dict))
        cuda = state_dict.get("cuda")
        if cuda is not None:
            if not isinstance(cuda, (list, tuple)):
                _fail(f"'cuda' must be a list of tensors, got {type(cuda).__name__}")
            cuda = [_byte_tensor(t, f"cuda[{i}]") for i, t in enumerate(cuda)]
        try:
            random.setstate(python)
            torch.set_rng_state(torch_cpu)
            if numpy_state is not None and np is None:
                logger.warning("Checkpoint holds NumPy RNG state but NumPy is not installed; skipped.")
            elif numpy_state is not None:
                np.random.set_state(numpy_state)
            if cuda is not None:
                _restore_cuda(cuda)
            if isinstance(state_dict.get("cuda_seed"), int) and torch.cuda.is_available():
                torch.cuda.manual_seed_all(state_dict["cuda_seed"])  # a re-derived rank (rederive)
        except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
            _fail(f"{type(exc).__name__}: {exc}")


    def rederive(self, saved: dict[str, Any], rank: int, saved_world_size: int) -> dict[str, Any]:
        """This rank's state on a job of another world size, from saved rank ``rank % saved_world_size``.

        Called by the loader on the training thread, before anything is applied; pure (returns
        a new state dict, touches no generator). See the module docstring for the rule.
        """
        if rank == 0:
            logger.warning(
                "RNG state was saved by %d rank(s); re-deriving per-rank generators for this world size "
                "(ranks below %d keep their saved streams, the others are seeded from them): random draws "
                "differ from an uninterrupted run on the old world size", saved_world_size, saved_world_size,
            )
        if rank < saved_world_size:
            return saved
        source = _byte_tensor(_require(saved, "torch_cpu", torch.Tensor), "torch_cpu")
        seed = xxhash.xxh3_64_intdigest(bytes(source.numpy()) + rank.to_bytes(8, "little"))
        out: dict[str, Any] = {**saved, "torch_cpu": torch.Generator().manual_seed(seed).get_state()}
        version, internal, gauss = random.Random(seed).getstate()
        out["python"] = {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss}
        if np is not None and "numpy" in saved:
            name, keys, pos, has_gauss, cached = np.random.RandomState(seed % 2**32).get_state(legacy=True)
            out["numpy"] = {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
        if "cuda" in saved:  # a CUDA generator's state is not a CPU one's: seeded at load instead
            del out["cuda"]
            out["cuda_seed"] = seed
        return out


def rng_component(key: str = "rng") -> StateComponent:
    """Return the optional PER_RANK component that saves this rank's RNG state."""
    return StateComponent(key, RNGState(), sharing_pattern=SharingPattern.PER_RANK, required=False)


def _restore_cuda(states: list[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        logger.warning("Checkpoint holds RNG state for %d CUDA device(s) but CUDA is unavailable; skipped.", len(states))
        return
    count = torch.cuda.device_count()
    if count != len(states):
        logger.warning(
            "Checkpoint holds RNG state for %d CUDA device(s) but %d are visible; restoring the first %d.",
            len(states), count, min(count, len(states)),
        )
    for device in range(min(count, len(states))):
        torch.cuda.set_rng_state(states[device], device)


def _python_state(sd: dict[str, Any]) -> tuple[Any, ...]:
    version, state, gauss_next = sd.get("version"), sd.get("state"), sd.get("gauss_next")
    if not isinstance(version, int) or isinstance(version, bool):
        _fail(f"'python.version' must be an int, got {type(version).__name__}")
    if gauss_next is not None and not isinstance(gauss_next, float):
        _fail(f"'python.gauss_next' must be a float or None, got {type(gauss_next).__name__}")
    if not isinstance(state, torch.Tensor) or state.dtype != torch.int64 or tuple(state.shape) != (625,):
        _fail(f"'python.state' must be an int64 tensor of shape (625,), got {_describe(state)}")
    return (version, tuple(state.tolist()), gauss_next)


def _numpy_state(sd: dict[str, Any]) -> tuple[Any, ...]:
    keys = sd.get("keys")
    if not isinstance(keys, torch.Tensor) or keys.dtype.is_floating_point or tuple(keys.shape) != (624,):
        _fail(f"'numpy.keys' must be an integer tensor of shape (624,), got {_describe(keys)}")
    if keys.min() < 0 or keys.max() >= 2**32:
        _fail("'numpy.keys' must hold uint32 values")
    if sd.get("bit_generator") != "MT19937":
        _fail(f"'numpy.bit_generator' must be 'MT19937', got {sd.get('bit_generator')!r}")
    for name, kind in (("pos", int), ("has_gauss", int), ("cached_gaussian", float)):
        if not isinstance(sd.get(name), kind) or isinstance(sd.get(name), bool):
            _fail(f"'numpy.{name}' must be {kind.__name__}, got {type(sd.get(name)).__name__}")
    if np is None:
        return ()
    return ("MT19937", keys.numpy().astype(np.uint32), sd["pos"], sd["has_gauss"], sd["cached_gaussian"])


def _byte_tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        _fail(f"'{name}' must be a 1-D uint8 tensor, got {_describe(value)}")
    return value.cpu()


def _require(sd: dict[str, Any], key: str, kind: type) -> Any:
    if key not in sd:
        _fail(f"missing key '{key}' (keys present: {sorted(map(str, sd))})")
    if not isinstance(sd[key], kind):
        _fail(f"'{key}' must be {kind.__name__}, got {type(sd[key]).__name__}")
    return sd[key]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _fail(reason: str) -> NoReturn:
    raise CheckpointLoadError(f"Malformed RNG state: {reason}.")
