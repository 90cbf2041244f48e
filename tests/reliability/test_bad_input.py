"""Case 6 of issue 12: non-UTF-8 bytes in a JSON Lines file are a DataError naming the file and line,
and the query service answers the next request after any failing one."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lorif_ray.config import QueryConfig
from lorif_ray.data import load_examples
from lorif_ray.distributed.backends import run_service
from lorif_ray.errors import ConfigError, DataError, IndexNotFoundError
from lorif_ray.service import QueryHandler
from tests.reliability.conftest import config


def test_non_utf8_line_is_a_data_error_naming_file_and_line(tmp_path):
    path = tmp_path / "queries.jsonl"
    lines = [json.dumps({"id": "q0", "text": "the cat sat"}).encode(),
             json.dumps({"id": "q1", "text": "a dog"}).encode(),
             b'{"id": "q2", "text": "caf\xe9 latin-1"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"queries\.jsonl, line 3: not UTF-8 \(byte 0xe9 at column 26\)"):
        load_examples(path)
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines[:2]) + b"\n")  # a UTF-8 BOM is accepted
    assert [e.id for e in load_examples(path)] == ["q0", "q1"]


def test_the_service_answers_the_next_request_after_a_failing_pass(baseline):
    """A pass that fails mid-way (here the scorer raises, as a device error would) answers its requests with a
    500 and the error's first line; the same handler answers the next request (no restart)."""
    handler = QueryHandler(baseline["cfg"])
    handler.load()
    try:
        body = json.dumps({"queries": [{"id": "q", "prompt": "the cat", "response": " sat"}], "top_k": 3}).encode()
        request = handler.accept("POST", "/query", {}, body)
        scorer = handler.backend.scorer

        def failing(*args, **kwargs):
            del scorer.score  # fails once: the class's own method again
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported later")

        scorer.score = failing
        [reply] = handler.answer([request])
        assert (reply.status, reply.body) == (500, {"error": "RuntimeError: CUDA error: out of memory"})
        [reply] = handler.answer([request])
        assert reply.status == 200 and len(reply.body["results"][0]["proponents"]) == 3
        assert handler.health().body["passes"] == 1
    finally:
        handler.close()


def test_a_service_that_cannot_start_names_why_before_listening(tiny_assets, tmp_path):
    cfg = config(tiny_assets, tmp_path / "no_index", query=QueryConfig(top_k=5))
    with pytest.raises(IndexNotFoundError, match="no_index"):
        run_service(cfg)
    with pytest.raises(ConfigError, match=r"query.full_scores=true: the service .* writes no files"):
        run_service(replace(cfg, query=replace(cfg.query, full_scores=True)))
