"""``DeviceMesh`` support: named groups from a mesh, the mesh in the manifest, DTensor shards.

``CheckpointManager(..., mesh=mesh)`` turns each named dimension of a
``torch.distributed.device_mesh.DeviceMesh`` into a process group of that name, records the
mesh in the manifest (``metadata["mesh"] = {"dims": [...], "shape": [...]}``) and refuses to
resume on a mesh of another shape. A PER_GROUP component with ``group="dp"`` is then written
once per instance of the "dp" dimension, by that instance's first member.

Which instance is which. The instances of one dimension are numbered by their lowest rank
(``topology.group_places``); for a mesh laid out row-major over the ranks, as
``init_device_mesh`` builds it, that is the flat coordinate over the *other* dimensions. With
``(dp=2, tp=2)`` over ranks ``[[0, 1], [2, 3]]``, the "dp" instances are ``{0, 2}`` (tensor
parallel shard 0) and ``{1, 3}`` (shard 1), so ``model_state_group_dp_1.safetensors`` is TP
shard 1, written by rank 1 and read by ranks 1 and 3; the "tp" instances ``{0, 1}`` and
``{2, 3}`` are the data-parallel replicas.

``LocalShards`` wraps a module or an optimizer whose state holds DTensors: the checkpoint gets
plain local shards (what the staging pool and the safetensors writer take) and loading turns
them back into DTensors with the live placements, without communication.

Everything here runs on the training thread; only ``mesh_groups`` touches torch.distributed
(it asks the mesh for groups it already created).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import CheckpointConfigError, CheckpointLoadError

MESH_KEY = "mesh"  # key of the mesh record in the manifest's metadata


def mesh_groups(mesh: Any, explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{dimension name: this rank's process group along it}`` plus the ``explicit`` groups.

    Called at manager construction, on every rank. Refuses a mesh without dimension names
    and a name that is both a dimension and an explicit group.
    """
    names = _dim_names(mesh)
    groups = dict(explicit or {})
    clash = sorted(set(names) & set(groups))
    if clash:
        raise CheckpointConfigError(
            f"Process group name(s) {', '.join(map(repr, clash))} are both mesh dimensions and entries of "
            "process_groups; rename the explicit group(s)."
        )
    for name in names:
        groups[name] = mesh.get_group(name)
    return groups


def mesh_record(mesh: Any) -> dict[str, list]:
    """The manifest's record of a mesh: ``{"dims": ["dp", "tp"], "shape": [2, 2]}`` (pure)."""
    return {"dims": list(_dim_names(mesh)), "shape": [int(n) for n in mesh.mesh.shape]}


def check_mesh_ranks(mesh: Any, ranks: Sequence[int]) -> None:
    """Refuse a mesh that does not span exactly the manager's ranks (global rank numbers)."""
    in_mesh = sorted(int(r) for r in mesh.mesh.flatten().tolist())
    if in_mesh != sorted(ranks):
        raise CheckpointConfigError(
            f"The DeviceMesh {describe_mesh(mesh_record(mesh))} spans ranks {in_mesh} but the checkpoint's "
            f"process group has ranks {sorted(ranks)}; pass process_group= matching the mesh."
        )


def describe_mesh(record: Mapping[str, Any]) -> str:
    """``(dp=2, tp=2; 4 ranks)`` for a mesh record (pure)."""
    dims, shape = record.get("dims"), record.get("shape")
    total = 1
    for n in shape:  # type: ignore[union-attr]
        total *= n
    return "(" + ", ".join(f"{d}={n}" for d, n in zip(dims, shape)) + f"; {total} ranks)"  # type: ignore[arg-type]


def mesh_refusal(manifest: Any, current: Mapping[str, Any] | None) -> list[str]:
    """Why a checkpoint cannot resume on this job's mesh: ``[]`` when it can (pure).

    ``manifest`` is the candidate's ``Manifest`` (or None when it did not read); ``current`` is
    this job's ``mesh_record`` or None. Only two meshes are compared: a checkpoint saved without
    a mesh, or a job without one, is left to the world size checks of the components.
    """
    saved = None if manifest is None else manifest.metadata.get(MESH_KEY)
    if saved is None or current is None:
        return []
    if not _valid_record(saved):
        return [f"the checkpoint's mesh record {saved!r} is malformed"]
    if list(saved["dims"]) == list(current["dims"]) and list(saved["shape"]) == list(current["shape"]):
        return []
    return [
        f"it was saved on the device mesh {describe_mesh(saved)} and this job's mesh is {describe_mesh(current)}; "
        f"resume on a mesh {describe_mesh(saved)}"
    ]


class LocalShards:
    """A Stateful over a module or optimizer holding DTensors: saves local shards, loads them back.

    ``state_dict()`` is the wrapped state with every DTensor replaced by its local tensor
    (``to_local()``); plain tensors and other values pass through. ``load_state_dict(state)``
    wraps each saved local tensor back into a DTensor with the mesh and placements of the live
    one (``DTensor.from_local``, no communication) and hands the result to the wrapped object's
    own ``load_state_dict``. For an optimizer the placements come from its parameters, so a
    fresh optimizer (no state yet) loads too. A saved shard whose shape is not this rank's
    shard's (another tensor parallel layout) is refused. Training thread only.
    """

    def __init__(self, stateful: Any) -> None:
        self.stateful = stateful

    def state_dict(self) -> Any:
        return _to_local(self.stateful.state_dict())

    def load_state_dict(self, state: Any) -> Any:
        template = self._template(state)
        return self.stateful.load_state_dict(_from_local(state, template, ""))

    def _template(self, state: Any) -> Any:
        """The live DTensors each saved value must become (None where a value stays plain)."""
        if not isinstance(self.stateful, torch.optim.Optimizer):
            return self.stateful.state_dict()
        params = [p for group in self.stateful.param_groups for p in group["params"]]
        per_param = {}
        for index, entries in (state.get("state") or {}).items():
            param = params[int(index)] if 0 <= int(index) < len(params) else None
            if _is_dtensor(param) and isinstance(entries, Mapping):
                local_shape = tuple(param.to_local().shape)  # type: ignore[union-attr]
                per_param[index] = {k: param for k, v in entries.items() if isinstance(v, torch.Tensor) and v.dim() and tuple(v.shape) == local_shape}
        return {"state": per_param}


def _dim_names(mesh: Any) -> tuple[str, ...]:
    names = getattr(mesh, "mesh_dim_names", None)
    if not names:
        raise CheckpointConfigError(
            "The DeviceMesh has no dimension names; build it with "
            "init_device_mesh(device, shape, mesh_dim_names=('dp', 'tp')) so components can name groups."
        )
    return tuple(names)


def _valid_record(record: Any) -> bool:
    if not isinstance(record, Mapping):
        return False
    dims, shape = record.get("dims"), record.get("shape")
    return (
        isinstance(dims, list) and isinstance(shape, list) and len(dims) == len(shape)
        and all(isinstance(d, str) for d in dims) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    )


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
    return DTensor


def _is_dtensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and isinstance(value, _dtensor_type())


def _to_local(value: Any) -> Any:
    if _is_dtensor(value):
        return value.to_local().detach()
    if isinstance(value, Mapping):
        return {k: _to_local(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_local(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_local(v) for v in value)
    return value


def _from_local(saved: Any, template: Any, path: str) -> Any:
    if _is_dtensor(template) and isinstance(saved, torch.Tensor) and not _is_dtensor(saved):
        local_shape = tuple(template.to_local().shape)
        if tuple(saved.shape) != local_shape:
            raise CheckpointLoadError(
                f"saved shard {path.lstrip('.') or '<root>'} has shape {tuple(saved.shape)} but this rank's shard is "
                f"{local_shape}: the checkpoint was saved with another tensor parallel layout"
            )
        return _dtensor_type().from_local(saved, template.device_mesh, template.placements, run_check=False, shape=template.shape, stride=template.stride())
    if isinstance(saved, Mapping):
        sub = template if isinstance(template, Mapping) else {}
        return {k: _from_local(v, sub.get(k), f"{path}.{k}") for k, v in saved.items()}
    if isinstance(saved, (list, tuple)) and not hasattr(saved, "_fields"):
        subs = list(template) if isinstance(template, (list, tuple)) and len(template) == len(saved) else [None] * len(saved)
        items = [_from_local(v, t, f"{path}.{i}") for i, (v, t) in enumerate(zip(saved, subs))]
        return items if isinstance(saved, list) else tuple(items)
    return saved


def manifest_metadata(metadata: Mapping[str, Any] | None, mesh: Any) -> dict[str, Any]:
    """The manager's ``metadata`` for every manifest, with the mesh record under ``"mesh"``.

    Refuses values JSON cannot hold (they would fail every commit) and a ``"mesh"`` key given
    together with a mesh.
    """
    out = dict(metadata or {})
    if mesh is not None:
        if MESH_KEY in out:
            raise CheckpointConfigError(f"metadata['{MESH_KEY}'] is set by the manager from mesh=; use another key")
        out[MESH_KEY] = mesh_record(mesh)
    try:
        json.dumps(out)
    except (TypeError, ValueError) as exc:
        raise CheckpointConfigError(f"metadata must be JSON-serialisable (it goes into the manifest): {exc}") from None
    return out
