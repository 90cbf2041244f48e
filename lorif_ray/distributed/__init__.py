"""Ray layer: moves work and data between processes; all math lives in the Ray-free core.

Only this package imports ray (and only inside functions that start Ray work, so the plain worker
classes can be imported and tested without it). Each stage has one driver in ``lorif_ray.stages``; this
package gives them backends whose rows are made or live on actors.

- ``featurize``: ``RayFeaturize``, stage 1 on gradient replicas (tensor-parallel ranks) and a
  factorization pool, scheduled by ``actor_pool`` (Ray's ActorPool with renewed members).
- ``gram``: ``RayGram``, shard-group actors summing each layer's Gram products for stage 2.
- ``query_pool``: ``ray_query`` and ``QueryPool``, long-lived query actors that keep their shards resident.
- ``backends``: ``run_stage``, each stage on the backend the config names.
"""

from lorif_ray.distributed.gram import GramWorker, RayGram, shard_groups
from lorif_ray.distributed.query_pool import QueryPool, QueryWorker, ray_query

__all__ = ["GramWorker", "QueryPool", "QueryWorker", "RayGram", "ray_query", "shard_groups"]
