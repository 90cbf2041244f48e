"""The Ray Serve query service on a cluster it did not start (here the session's, as with cluster.address=auto):
one replica that reserves no CPU, and nothing of it left once it stops."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from lorif_ray.config import QueryConfig, ServeConfig
from lorif_ray.distributed.serving import APP_NAME
from lorif_ray.distributed.stages import run_service
from lorif_ray.errors import ConfigError
from tests.distributed.conftest import NUM_WORKERS
from tests.jobs.test_ray_job_submit import _free_port


def _get(url: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}
    except (ConnectionError, urllib.error.URLError):
        return 0, {}


def test_the_serve_app_is_one_cpu_free_replica_and_is_gone_after_the_service_stops(baseline, ray_cluster):
    ray = ray_cluster
    from ray import serve

    port = _free_port()
    cfg = baseline["config"]("serve_app", with_curvature=True, query=QueryConfig(top_k=3), serve=ServeConfig(port=port))
    free_before = _settled_free_cpus(ray)
    stop, failures = threading.Event(), []
    thread = threading.Thread(target=lambda: _run(cfg, stop, failures), daemon=True)
    thread.start()
    try:
        deadline = time.time() + 180
        while _get(f"http://127.0.0.1:{port}/health")[0] != 200:
            assert time.time() < deadline and thread.is_alive(), failures
            time.sleep(0.2)
        status, body = _get(f"http://127.0.0.1:{port}/query", {"queries": [{"text": "the cat sat on a mat"}]})
        assert status == 200 and len(body["results"][0]["proponents"]) == 3
        app = serve.status().applications[APP_NAME]
        assert {name: d.replica_states for name, d in app.deployments.items()} == {"QueryDeployment": {"RUNNING": 1}}
        held = free_before - ray.available_resources().get("CPU", 0)
        assert held == (NUM_WORKERS + 1) * cfg.cluster.cpus_per_actor  # query actors + the query-gradient replica
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
