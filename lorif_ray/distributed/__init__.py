"""Ray layer: moves work and data between processes; all math lives in the Ray-free core.

Only this package imports ray (and only inside functions that start Ray work, so the plain worker
classes can be imported and tested without it). Each stage has one driver in ``lorif_ray.stages``; this
package gives them backends whose rows are made or live on actors.

- ``index_pipeline``: ``RayFeaturize``, stage 1 on gradient replicas (tensor-parallel ranks) and a
  factorization pool, scheduled by ``actor_pool`` (Ray's ActorPool with renewed members).
- ``curvature``: ``RayGram``, shard-group actors summing each layer's Gram products for stage 2.
- ``query_service``: ``ray_query``, long-lived query actors that keep their shards resident.
- ``stages``: ``run_stage``, each stage on the backend the config names.
"""

from lorif_ray.distributed.curvature import GramWorker, RayGram, shard_groups
from lorif_ray.distributed.query_service import QueryService, QueryWorker, ray_query

__all__ = ["GramWorker", "QueryService", "QueryWorker", "RayGram", "ray_query", "shard_groups"]
