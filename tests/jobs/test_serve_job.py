"""jobs/serve.py as the README tells a user to run it: `python jobs/serve.py output_dir=OUT serve.port=P` as a
subprocess on the index and curvature jobs/attribute.py left in OUT, queried over HTTP with a real client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from tests.jobs.test_ray_job_submit import ROOT, _free_port

TOKEN = "s3cret"


def _call(port: int, path: str, body: bytes | dict | None = None, token: str | None = None,
          method: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request to the service on localhost."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, json.loads(text) if error.code != 404 or text.startswith(b"{") else {"error": text.decode()}


def _health_until_ready(port: int, process: subprocess.Popen, log, seconds: float = 240) -> list[int]:
    """The /health statuses seen, in order (repeats dropped), until one is 200."""
    seen, deadline = [], time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            status, _ = _call(port, "/health")
        except (ConnectionError, urllib.error.URLError):
            status = None  # not listening yet
        if status is not None and (not seen or seen[-1] != status):
            seen.append(status)
        if status == 200:
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"no 200 from /health within {seconds}s: {seen}\n{log.read_text()[-3000:]}")


def _expected(baseline) -> dict[str, dict[str, list[tuple[str, str, float]]]]:
    """{query id: {"proponents" | "opponents": [(train id, train text, score)] by rank}} from the baseline's
    topk.parquet and opponents.parquet (what jobs/query.py writes)."""
    out: dict[str, dict] = {}
    for end, name in (("proponents", "topk"), ("opponents", "opponents")):
        table = pq.read_table(f"{baseline['cfg'].output_dir}/{name}.parquet").to_pylist()
        for row in sorted(table, key=lambda r: (r["query_id"], r["rank"])):
            ranked = out.setdefault(row["query_id"], {}).setdefault(end, [])
            ranked.append((row["train_id"], row["train_text"], row["score"]))
    return out


def _check_answers(results: list[dict], queries: list[dict], expected: dict, k: int) -> None:
    assert [r["query_id"] for r in results] == [q["id"] for q in queries]
    for result, query in zip(results, queries):
        assert result["query_text"] == query["prompt"] + query["response"]
        for end in ("proponents", "opponents"):
            answered, wanted = result[end], expected[query["id"]][end][:k]
            assert [p["rank"] for p in answered] == list(range(1, k + 1))
            assert [(p["train_id"], p["train_text"]) for p in answered] == [(i, t) for i, t, _ in wanted]
            assert [p["score"] for p in answered] == pytest.approx([s for _, _, s in wanted], rel=1e-5, abs=1e-6)
        assert all(p["train_text"] for p in result["proponents"])


BAD_BODIES = [  # (body, status, words the one-line error holds)
    (b"{not json", 400, "not JSON"),
    ({"queries": "the cat"}, 400, "'queries' must be a non-empty list"),
    ({"queries": [{"text": "the cat sat"}], "topk": 3}, 400, "unknown key 'topk'"),
    ({"queries": [{"text": "the cat sat"}], "top_k": "5"}, 400, "'top_k' must be an integer"),
    ({"queries": [{"id": "a", "prompt": "the cat"}]}, 400, "request: expected a 'text' column"),
    ({"queries": [{"id": "a", "text": "the cat"}, {"id": "b", "prompt": "a", "response": " dog"}]}, 400,
     "request, row 1 (id 'b'): prompt + response where row 0 has text"),
    ({"queries": [{"id": "long", "prompt": " ".join(["the"] * 40), "response": " cat"}]}, 400, "long"),  # no loss token
    ({"queries": [{"text": "the cat"}] * 9}, 413, "serve.max_queries=8"),
    ({"queries": [{"text": "the cat " * 2000}]}, 413, "serve.max_body_bytes=8000"),
]


@pytest.mark.parametrize("backend", ["none"])
def test_the_service_answers_like_jobs_query_over_http(backend, baseline, tiny_assets, tmp_path):
    """/health is 503 while loading, then 200; answers equal jobs/query.py's top-k (four concurrent clients too,
    sharing passes); each bad body is a 4xx with one readable line and the next request is answered; SIGINT
    (cluster=none) or SIGTERM (Ray) ends the job cleanly and closes the port. The job on Ray, started and stopped
    (SIGTERM) exactly as the README shows: tests/user/test_readme.py; the same checks against the Ray Serve
    app on the session's cluster: tests/distributed/test_serving.py."""
    one, port, log = baseline["cfg"], _free_port(), tmp_path / "serve.log"
    keys = [f"model.path={tiny_assets['model']}", f"data.train={tiny_assets['train']}", "model.device=cpu",
            "data.max_length=32", f"output_dir={one.output_dir}", f"serve.port={port}", "serve.max_queries=8",
            "serve.max_body_bytes=8000", "serve.batch_wait_s=0.5"]
    keys += ["cluster=none", f"serve.token={TOKEN}"] if backend == "none" else ["cluster.num_cpus=2"]
    token = TOKEN if backend == "none" else None
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "jobs/serve.py", *keys], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        seen = _health_until_ready(port, process, log)
        assert seen[-2:] == [503, 200] and set(seen[:-2]) <= {404}, seen  # 404: Serve's proxy before the app
        queries = [json.loads(line) for line in tiny_assets["queries"].read_text().splitlines()]
        expected = _expected(baseline)

        status, body = _call(port, "/query", {"queries": queries, "top_k": 5}, token)
        assert status == 200, body
        _check_answers(body["results"], queries, expected, 5)

        if token:
            status, body = _call(port, "/query", {"queries": queries[:1]})
            assert status == 401 and "Authorization: Bearer" in body["error"]
        assert _call(port, "/query", method="GET")[0] == 405
        assert _call(port, "/nowhere")[0] == 404
        for bad, code, words in BAD_BODIES:
            status, body = _call(port, "/query", bad, token)
            assert (status, "\n" in body["error"]) == (code, False), (bad, body)
            assert words in body["error"], (words, body["error"])
        status, body = _call(port, "/query", {"queries": queries[2:3], "top_k": 3}, token)
        assert status == 200, body
        _check_answers(body["results"], queries[2:3], expected, 3)

        passes = _call(port, "/health")[1]["passes"]
        asks = [(queries[0:2], 5), (queries[2:3], 3), (queries[3:6], 4), (queries[5:6], 1)]
        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(lambda ask: _call(port, "/query", {"queries": ask[0], "top_k": ask[1]}, token),
                                    asks))
        for (asked, k), (status, body) in zip(asks, answers):
            assert status == 200, body
            _check_answers(body["results"], asked, expected, k)
        assert _call(port, "/health")[1]["passes"] - passes < len(asks)  # concurrent requests shared passes
    finally:
        process.send_signal(signal.SIGINT if backend == "none" else signal.SIGTERM)
        try:
            returncode = process.wait(timeout=90)
        finally:
            process.kill()
    text = log.read_text()
    assert returncode == 0, text[-3000:]
    assert "query service stopping" in text
    if backend == "ray":
        assert "deleted Serve app" in text
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        _call(port, "/health")
