"""Where a rank sits in a data-parallel x pipeline-parallel job (``PipelineTrainer(dp_degree=...)``).

Ranks are laid out replica-major: with 2 replicas of a 2-stage pipeline, ranks 0-1 are replica 0
(stages 0 and 1) and ranks 2-3 replica 1. The ``DeviceMesh`` has two named dimensions:
``"pp"`` (the stages of one replica: {0, 1}, {2, 3}) and ``"dp"`` (one stage across replicas:
{0, 2}, {1, 3}). Checkpoints share the model and optimizer along ``"dp"`` (one file per stage)
and the dataset position along ``"pp"`` (one file per replica). Built once, on the training
thread, at trainer construction; creating the mesh is collective over every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.distributed.device_mesh import init_device_mesh


@dataclass(frozen=True)
class PipelineTopology:
    replicas: int  # data-parallel replicas (dp_degree)
    stages: int  # pipeline stages per replica
    replica: int  # this rank's replica
    stage: int  # this rank's stage
    first: int  # global rank of this replica's first stage (reads and broadcasts the data)
    last: int  # global rank of this replica's last stage (computes the loss)
    mesh: Any = None  # DeviceMesh ("dp", "pp"), None with one replica
    pp_group: Any = None  # this replica's stages; None: the default group
    dp_group: Any = None  # this stage across replicas; None with one replica

    @staticmethod
    def build(dp_degree: int, rank: int, world_size: int, device_type: str) -> "PipelineTopology":
        if world_size % dp_degree:
            raise ValueError(f"world size {world_size} is not a multiple of dp_degree={dp_degree}")
        stages = world_size // dp_degree
        replica, stage = divmod(rank, stages)
        first = replica * stages
        if dp_degree == 1:
            return PipelineTopology(1, stages, 0, stage, first, first + stages - 1)
        mesh = init_device_mesh(device_type, (dp_degree, stages), mesh_dim_names=("dp", "pp"))
        return PipelineTopology(dp_degree, stages, replica, stage, first, first + stages - 1, mesh, mesh.get_group("pp"), mesh.get_group("dp"))
