"""Optimizer state keyed by parameter name, so it reshards and follows parameters across stages.

torch optimizers key their state by the position of a parameter in their ``param_groups``; that
position means nothing on another pipeline split and is fragile across model edits. Like
``torch.distributed.checkpoint.state_dict.get_state_dict``, ``OptimizerState(model, optimizer)``
saves ``{"state": {fqn: {name: value}}, "param_groups": [{..., "params": [fqn, ...]}]}`` and maps
it back onto this optimizer's parameters by name on load.

A freshly built optimizer has no state yet (AdamW creates it at the first step): loading still
works, because the saved moments get their placement from the parameter of the same name
(``sharded_target``): a moment whose global shape is its parameter's becomes a DTensor placed
like that parameter; scalars such as ``step`` stay plain tensors. Training thread only.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CheckpointLoadError


class OptimizerState:
    """A Stateful over ``optimizer`` whose state dict names parameters by ``model``'s FQNs.

    Use it as the ``stateful`` of a SHARDED (or any other) optimizer component. Parameters the
    model does not name (held by the optimizer only) are refused at ``state_dict()``. On load,
    saved entries of parameters this optimizer does not hold (another pipeline stage's) are
    ignored; group hyperparameters are taken from the saved group of the same index.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self._by_name: dict[str, Any] | None = None

    def _names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        names, params = self._names(), self._params()
        missing = [i for i, p in enumerate(params) if id(p) not in names]
        if missing:
            raise CheckpointLoadError(
                f"optimizer parameter(s) {missing} are not parameters of the model; "
                "build OptimizerState with the model that owns them"
            )
        raw = self.optimizer.state_dict()
        fqns = [names[id(p)] for p in params]
        state = {fqns[int(i)]: dict(entries) for i, entries in raw["state"].items()}
        groups = [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in raw["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names, params = self._names(), self._params()
        index = {names[id(p)]: i for i, p in enumerate(params) if id(p) in names}
        saved_groups = state.get("param_groups") or []
        live_groups = self.optimizer.state_dict()["param_groups"]
        if len(saved_groups) < len(live_groups):
            raise CheckpointLoadError(
                f"the checkpoint's optimizer has {len(saved_groups)} parameter group(s), this one {len(live_groups)}"
            )
        groups = []
        for live, saved in zip(live_groups, saved_groups):
            groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": live["params"]})
        per_index = {index[fqn]: entries for fqn, entries in (state.get("state") or {}).items() if fqn in index}
        self.optimizer.load_state_dict({"state": per_index, "param_groups": groups})
        self._by_name = None

    def sharded_target(self, path: tuple, shape: tuple) -> Any:
        """The live tensor a saved one at ``path`` becomes (loader's callback, training thread).

        ``("state", fqn, name)`` with the parameter's global shape: the parameter itself (its
        mesh and placements); anything else: None (read as a full plain tensor).
        """
        if len(path) == 3 and path[0] == "state":
            if self._by_name is None:  # built once per load; dropped by load_state_dict
                self._by_name = dict(self.model.named_parameters(remove_duplicate=False))
            param = self._by_name.get(path[1])
            if param is not None and tuple(param.shape) == tuple(shape):
                return param
        return None
