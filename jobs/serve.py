"""The HTTP query service: the model, curvature and index of ``output_dir`` loaded once, then queries answered
over HTTP until Ctrl-C (SIGINT) or SIGTERM.

    python jobs/serve.py output_dir=out                            # same keys as jobs/attribute.py
    python jobs/serve.py output_dir=out serve.port=8000 serve.host=127.0.0.1
    python jobs/serve.py output_dir=out cluster=none               # no Ray: one process
    curl -s localhost:8000/query -d '{"queries": [{"text": "the capital of zorvia is"}], "top_k": 5}'

Needs the index and curvature that jobs/attribute.py (or jobs/index.py + curvature.py) wrote for the same
keys (``output_dir``, or ``index_dir``). ``POST /query`` takes {"queries": [rows as in a data file], "top_k": k}
and answers each query's proponents and opponents with their training texts; ``GET /health`` answers 503
until the service is loaded. On Ray it is a Ray Serve app, deleted when the job ends.
"""

from lorif_ray.cli import run_job


def main(cfg) -> None:
    from lorif_ray.distributed.backends import run_service

    run_service(cfg)


if __name__ == "__main__":
    run_job(main, stages=("serve",), doc=__doc__)
