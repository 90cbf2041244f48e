"""The HTTP query service on Ray Serve: ``lorif_ray.service.QueryHandler`` in one Serve replica.

The replica is the driver of the stage-3 backend (``ray_query``: a gradient replica for the queries, the
query actors with their shards resident); it reserves no CPU (the actors it starts hold the cluster's)
and there is exactly one, since every replica would load every shard. Concurrent requests share one
pass over the rows through ``@serve.batch``. The job (``serve_on_ray``) starts Serve on ``serve.host``:
``serve.port`` (Serve's HTTP options are fixed per cluster: a running Serve on another port is refused
by name), deploys the app, waits for the backend to load, and deletes the app when it is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from lorif_ray.config import Config
from lorif_ray.distributed.cluster import actor_options, connect
from lorif_ray.distributed.query_pool import ray_query
from lorif_ray.errors import ConfigError
from lorif_ray.stages.query import open_query
from lorif_ray.service import (QueryHandler, QueryRequest, Reply, check_service_config, error_reply,
                                      stop_on_signals, wait_until_ready)

log = logging.getLogger(__name__)

APP_NAME = "lorif-ray-query"


# access logs off: the handler logs one line per answered pass (and the job polls the replica while it loads)
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                  logging_config={"enable_access_log": False})
class QueryDeployment:
    """One replica: a ``QueryHandler`` over a ``ray_query`` backend, loaded in the background (GET /health
    answers 503 until it is ready)."""

    def __init__(self, cfg: Config, num_workers: int, options: dict):
        _log_to_stderr()
        self.handler = QueryHandler(cfg, partial(ray_query, num_workers=num_workers, actor_options=options))
        self.handler.start_loading()
        self.batched.set_max_batch_size(cfg.serve.max_batch_size)
        self.batched.set_batch_wait_timeout_s(cfg.serve.batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def batched(self, requests: list[QueryRequest]) -> list[Reply]:
        return await asyncio.to_thread(self.handler.answer, requests)

    async def __call__(self, request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.handler.cfg.serve.max_body_bytes:
            reply = error_reply(413, f"the body has {length} bytes; at most serve.max_body_bytes="
                                     f"{self.handler.cfg.serve.max_body_bytes}")  # refused unread
        else:
            reply = await asyncio.to_thread(self.handler.accept, request.method, request.url.path, request.headers,
                                            await request.body())
            if isinstance(reply, QueryRequest):
                reply = await self.batched(reply)
        return Response(reply.encoded(), status_code=reply.status, media_type="application/json")

    def status(self) -> tuple[str, str | None]:
        """(loading | ready | failed, the load error) for the job."""
        return self.handler.status, self.handler.error

    def __del__(self) -> None:  # Serve calls it when the replica is shut down
        self.handler.close()


def _log_to_stderr() -> None:
    """This package's INFO lines on the replica's stderr (Ray forwards them to the job's console)."""
    package = logging.getLogger("lorif_ray")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def _http_address() -> tuple[str, int]:
    """(host, port) of the running Serve's HTTP proxies (Serve keeps no public accessor for them)."""
    from ray.serve.context import _get_global_client

    options = _get_global_client().http_config
    return options.host, options.port


def serve_on_ray(cfg: Config, stop: threading.Event | None = None) -> None:
    """The query service on Ray Serve until SIGINT/SIGTERM (or ``stop``); the app is deleted at the end, and
    Serve shut down if this job started it.

    Raises:
        ConfigError: before Ray starts, for settings the service refuses or a port this machine cannot
            listen on (a local instance); after, when Serve already runs on another address or an app of
            this service already runs on the cluster.
    """
    check_service_config(cfg)
    open_query(cfg)  # a missing index or curvature is named before Ray starts
    if not cfg.cluster.address:
        _check_port_free(cfg)
    connect(cfg.cluster)
    started = not serve.status().proxies
    if APP_NAME in serve.status().applications:
        raise ConfigError(f"a query service (Serve app {APP_NAME!r}) already runs on this cluster: stop it first")
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    if _http_address() != (cfg.serve.host, cfg.serve.port):
        host, port = _http_address()
        raise ConfigError(f"serve.host={cfg.serve.host} serve.port={cfg.serve.port}: Serve on this cluster already "
                          f"listens on {host}:{port} (its HTTP options are fixed per cluster); use those")
    options = actor_options(cfg.cluster, gpu=True)
    app = QueryDeployment.bind(cfg, cfg.cluster.query_actors, options)
    try:
        with stop_on_signals(stop) as stop:
            handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
            log.info("query service loading on http://%s:%d (GET /health answers 503 until ready)", cfg.serve.host,
                     cfg.serve.port)
            if wait_until_ready(lambda: handle.status.remote().result(), stop):
                log.info("query service ready: POST http://%s:%d/query", cfg.serve.host, cfg.serve.port)
                while not stop.wait(0.5):
                    pass
            log.info("query service stopping")
    finally:
        start = time.perf_counter()
        serve.delete(APP_NAME)
        if started:
            serve.shutdown()
        log.info("deleted Serve app %s in %.1f s", APP_NAME, time.perf_counter() - start)


def _check_port_free(cfg: Config) -> None:
    """Refuse at once a port this machine cannot listen on (Serve's proxy would fail later, in its log)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in cfg.serve.host else socket.AF_INET) as probe:
            probe.bind((cfg.serve.host, cfg.serve.port))
    except OSError as error:
        raise ConfigError(f"serve.host={cfg.serve.host} serve.port={cfg.serve.port}: cannot listen there "
                          f"({error.strerror or error}); choose another serve.port") from None
