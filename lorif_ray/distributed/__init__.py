"""Ray layer: moves work and data between processes; all math lives in the Ray-free core.

Only this package imports ray (and only inside functions that start Ray work, so the plain worker
classes can be imported and tested without it).

- ``rsvd``: distributed Gram products ``Σ_shards G_sᵀ(G_s Q)`` and stage 2 over shard groups.
- ``query_service``: long-lived query actors that keep their shards resident and return top-k.
"""

from lorif_ray.distributed.query_service import QueryService, QueryWorker, run_query_distributed, shard_groups
from lorif_ray.distributed.rsvd import (
    GramWorker,
    distributed_gram,
    distributed_gram_apply,
    run_curvature_distributed,
)

__all__ = [
    "GramWorker",
    "QueryService",
    "QueryWorker",
    "distributed_gram",
    "distributed_gram_apply",
    "run_curvature_distributed",
    "run_query_distributed",
    "shard_groups",
]
