"""A long-lived query service: the model and the index's shards are loaded once (shards resident in
the query actors), then each query file read from stdin is answered without reloading anything.

    printf 'q1.jsonl\nq2.jsonl\n' | python jobs/serve.py output_dir=out     # same keys as jobs/attribute.py
    python jobs/serve.py output_dir=out       # then type query-file paths, one per line; Ctrl-D ends

Needs the index and curvature of ``output_dir`` (run jobs/attribute.py or jobs/index.py + curvature.py
first). Batch n writes ``<output_dir>/serve/<n>-<file stem>/topk.parquet``; one JSON line per batch
on stdout.
"""

import json
import sys

import hydra

from lorif_ray.config import from_hydra, register_configs
from lorif_ray.distributed.cluster import actor_options, connect
from lorif_ray.distributed.query_service import serve

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> None:
    cfg = from_hydra(cfg)
    connect(cfg.cluster)
    options = actor_options(cfg.cluster, gpu=True)
    for answer in serve(cfg, sys.stdin, cfg.cluster.query_actors, actor_options=options):
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
