"""The Ray Serve query service on a cluster it did not start (here the session's, as with cluster.address=auto):
one replica that reserves no CPU, and nothing of it left once it stops."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from lorif_ray.config import QueryConfig, ServeConfig
from lorif_ray.distributed.serving import APP_NAME
from lorif_ray.distributed.backends import run_service
from lorif_ray.errors import ConfigError
from tests.distributed.conftest import NUM_WORKERS
from tests.jobs.test_ray_job_submit import _free_port
from tests.jobs.test_serve_job import BAD_BODIES, _call, _check_answers, _expected


def _get(url: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}
    except (ConnectionError, urllib.error.URLError):
        return 0, {}


def test_the_serve_app_is_one_cpu_free_replica_and_is_gone_after_the_service_stops(baseline, tiny_assets, ray_cluster):
    """The Ray transport of the query service: one Serve replica holding no CPU, answers equal to jobs/query.py's
    (four concurrent clients sharing passes through @serve.batch), each bad body a 4xx with one line and the
    next request answered, and nothing left once it stops. (The same handler on the plain HTTP server, and the
    job's signals: tests/jobs/test_serve_job.py; the README's block on Ray: tests/user/test_readme.py.)"""
    ray = ray_cluster
    from ray import serve

    port = _free_port()
    cfg = baseline["config"]("serve_app", with_curvature=True, query=QueryConfig(top_k=3),
                             serve=ServeConfig(port=port, max_queries=8, max_body_bytes=8000, batch_wait_s=0.5))
    free_before = _settled_free_cpus(ray)
    stop, failures = threading.Event(), []
    thread = threading.Thread(target=lambda: _run(cfg, stop, failures), daemon=True)
    thread.start()
    try:
        deadline = time.time() + 180
        while _get(f"http://127.0.0.1:{port}/health")[0] != 200:
            assert time.time() < deadline and thread.is_alive(), failures
            time.sleep(0.2)
        app = serve.status().applications[APP_NAME]
        assert {name: d.replica_states for name, d in app.deployments.items()} == {"QueryDeployment": {"RUNNING": 1}}
        held = free_before - ray.available_resources().get("CPU", 0)
        assert held == (NUM_WORKERS + 1) * cfg.cluster.cpus_per_actor  # query actors + the query-gradient replica

        queries = [json.loads(line) for line in tiny_assets["queries"].read_text().splitlines()]
        expected = _expected(baseline)
        status, body = _call(port, "/query", {"queries": queries, "top_k": 5})
        assert status == 200, body
        _check_answers(body["results"], queries, expected, 5)
        for bad, code, words in BAD_BODIES:
            status, body = _call(port, "/query", bad)
            assert (status, "\n" in body["error"]) == (code, False), (bad, body)
            assert words in body["error"], (words, body["error"])
        passes = _call(port, "/health")[1]["passes"]
        asks = [(queries[0:2], 5), (queries[2:3], 3), (queries[3:6], 4), (queries[5:6], 1)]
        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(lambda ask: _call(port, "/query", {"queries": ask[0], "top_k": ask[1]}), asks))
        for (asked, k), (status, body) in zip(asks, answers):
            assert status == 200, body
            _check_answers(body["results"], asked, expected, k)
        assert _call(port, "/health")[1]["passes"] - passes < len(asks)  # concurrent requests shared passes
    finally:
        stop.set()
        thread.join(120)
    assert not thread.is_alive() and not failures, failures
    status = serve.status()
    assert APP_NAME not in status.applications and not status.proxies  # the app deleted; Serve, which it started, too
    assert _get(f"http://127.0.0.1:{port}/health")[0] == 0


def _settled_free_cpus(ray, timeout_s: float = 60) -> float:
    """The cluster's free CPUs once the actors that earlier tests killed have let theirs go (ray.kill is
    asynchronous), so that what this test's service holds is measured alone."""
    total, deadline = ray.cluster_resources().get("CPU", 0), time.time() + timeout_s
    while ray.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0)


def _run(cfg, stop: threading.Event, failures: list) -> None:
    try:
        run_service(cfg, stop)
    except BaseException as error:  # noqa: BLE001 - reported by the test
        failures.append(error)


def test_serve_listening_elsewhere_on_the_cluster_is_refused_by_name(baseline, ray_cluster):
    """Serve's HTTP options are fixed per cluster: a service asked for another port says where Serve listens."""
    from ray import serve

    running, asked = _free_port(), _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": running})
    try:
        cfg = baseline["config"]("serve_elsewhere", with_curvature=True, query=QueryConfig(top_k=3),
                                 serve=ServeConfig(port=asked))
        with pytest.raises(ConfigError, match=rf"serve.port={asked}: Serve on this cluster already listens on "
                                              rf"127.0.0.1:{running}"):
            run_service(cfg, threading.Event())
        assert not serve.status().applications
    finally:
        serve.shutdown()
