"""Case 6 of issue 12: non-UTF-8 bytes in a JSON Lines file are a DataError naming the file and line,
and the query service answers the next file after any failing one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lorif_ray.data import load_examples
from lorif_ray.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


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


def _serve_job():
    spec = importlib.util.spec_from_file_location("serve_job", ROOT / "jobs" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_service_survives_an_unexpected_error_and_answers_the_next_file(tmp_path):
    """`jobs/serve.py` answers through `answer_each`: an error the service does not handle in its batch
    loop (here the UnicodeDecodeError that used to end it) becomes that batch's error line; the service
    is started again for the next lines and keeps the batch numbers. The stand-in service answers like
    `query_service.serve` (the real one needs Ray; tests/jobs/test_serve_job.py runs it)."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "q0", "text": "the cat sat"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "q0", "text": "caf\xe9"}\n')
    starts = []

    def service(files):
        starts.append(1)
        for batch, line in enumerate(q.strip() for q in files):
            if not line:
                continue
            with open(line, encoding="utf-8") as f:  # what an unguarded reader does with bad.jsonl
                f.read()
            yield {"batch": batch, "queries": line, "queries_count": 1}

    stdin = [f"{good}\n", f"{bad}\n", "\n", f"{good}\n"]
    answers = list(_serve_job().answer_each(service, stdin))
    assert [a["batch"] for a in answers] == [0, 1, 3]
    assert "error" not in answers[0] and "error" not in answers[2]
    assert answers[1]["queries"] == str(bad) and answers[1]["error"].startswith("UnicodeDecodeError")
    assert len(starts) == 2


def test_service_that_cannot_start_still_raises():
    def broken(files):
        raise FileNotFoundError("no index")
        yield  # pragma: no cover

    with pytest.raises(FileNotFoundError):
        list(_serve_job().answer_each(broken, ["a.jsonl\n"]))
