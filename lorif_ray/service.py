"""The HTTP query service: one request handler for every transport, and its plain-HTTP transport.

``QueryHandler`` loads a query backend once (the model for query gradients and the index's rows, e.g.
``local_query`` here or ``lorif_ray.distributed.query_pool.ray_query``), then answers

    POST /query  {"queries": [rows: text | prompt + response | messages, optional id], "top_k": k}
                 → {"results": [{"query_id", "query_text", "proponents": [{"rank", "train_id", "train_text",
                    "score"}], "opponents": [...]}]}
    GET /health  → 200 {"status": "ready", ...}; 503 while the backend loads (or after it failed to)

A request is checked in full before it joins a pass (``accept``: its JSON, its keys and types, its rows
through the same checks as a data file, their loss tokens, the size caps and the token); a bad one gets
a 4xx with one line and changes nothing. Concurrent requests are answered together (``answer``: one
featurization and one pass over the training rows for all their queries), by whichever batcher the
transport has: ``serve_local`` (``cluster=none``: a threaded ``http.server`` in this process) or the
Ray Serve deployment of ``lorif_ray.distributed.serving``.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import signal
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import torch

from lorif_ray.config import Config
from lorif_ray.data import Example, examples_of_rows, tokenize_examples
from lorif_ray.errors import ConfigError, DataError, LorifError, RequestError
from lorif_ray.stages.query import QueryBackend, local_query, open_query, open_train_texts, query_route
from lorif_ray.outputs.query_outputs import TopK
from lorif_ray.store import IndexFolder

log = logging.getLogger(__name__)

BODY_KEYS = ("queries", "top_k")
FILE_OUTPUTS = ("full_scores", "per_layer", "self_influence", "per_token")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status and JSON body."""

    status: int
    body: dict

    def encoded(self) -> bytes:
        """The body as JSON and a newline (so answers printed by curl end their line)."""
        return (json.dumps(self.body) + "\n").encode()


def error_reply(status: int, message: str) -> Reply:
    return Reply(status, {"error": message})


@dataclass(frozen=True)
class QueryRequest:
    """A checked POST /query: its examples (validated, with loss tokens) and how many answers each wants."""

    examples: list[Example]
    top_k: int


def check_service_config(cfg: Config) -> None:
    """Refuse, before any work, settings the service cannot honour; warn about a wide bind without a token.

    Raises:
        ConfigError: a ``query.*`` output that is written to files (the service answers over HTTP).
    """
    asked = [key for key in FILE_OUTPUTS if getattr(cfg.query, key)]
    if asked:
        raise ConfigError(f"query.{asked[0]}=true: the service answers top-k proponents and opponents over HTTP "
                          "and writes no files; run jobs/query.py for it")
    if cfg.serve.host not in LOOPBACK and not cfg.serve.token:
        log.warning("serve.host=%s listens beyond this machine and serve.token is not set: anyone who reaches the "
                    "port can query the index and read training texts", cfg.serve.host)


def service_config(cfg: Config) -> Config:
    """The query config of the service: the rows resident (loaded once, ``cluster=none`` too), no progress bars
    per request (one log line per answered pass instead)."""
    return replace(cfg, progress=False, query=replace(cfg.query, resident=True))


class QueryHandler:
    """Answers the service's requests with one query backend, loaded once.

    Args:
        cfg: the job's config (index and curvature where ``jobs/attribute.py`` put them: ``output_dir``,
            ``index_dir``); ``serve.*`` caps and token.
        make_backend: ``(cfg, manifest, folder, stored) →`` a ``QueryBackend`` (``local_query``, ``ray_query``).

    Example:
        >>> handler = QueryHandler(cfg, local_query)
        >>> handler.load()
        >>> request = handler.accept("POST", "/query", {}, b'{"queries": [{"text": "the cat sat"}]}')
        >>> [reply] = handler.answer([request])
        >>> reply.body["results"][0]["proponents"][0]["train_id"]
    """

    def __init__(self, cfg: Config, make_backend=local_query):
        self.cfg, self.make_backend = service_config(cfg), make_backend
        self.status, self.error = "loading", None
        self.backend: QueryBackend | None = None
        self.texts = None  # TrainTexts of the index's rows, once loaded
        self.answered = self.passes = 0  # queries answered, passes over the rows
        self._lock = threading.Lock()  # one pass over the rows at a time

    # loading

    def load(self) -> None:
        """Open the index and curvature, start the backend; on failure ``status`` is "failed" and ``error``
        the reason in one line (the caller decides to stop)."""
        try:
            self.query_cfg, self.manifest, folder, self.header, self.stored = open_query(self.cfg)
            self.index = IndexFolder(self.query_cfg.index_path)
            self.backend = self.make_backend(self.query_cfg, self.manifest, folder, self.stored)
            self.tokenizer, self.max_length = self.backend.featurize.tokenizer, self.backend.featurize.max_length
            self.texts = open_train_texts(self.query_cfg, self.manifest)  # None: answers without training texts
            self.status = "ready"
            log.info("query backend loaded: %d training examples of %s", self.manifest.num_rows, self.cfg.index_path)
        except Exception as error:  # noqa: BLE001 - reported by health() and the transport's start-up
            self.status, self.error = "failed", f"{type(error).__name__}: {error}"
            log.exception("the query service failed to load")

    def start_loading(self) -> threading.Thread:
        """``load`` in a daemon thread (the transport answers /health with 503 meanwhile)."""
        thread = threading.Thread(target=self.load, name="lorif-serve-load", daemon=True)
        thread.start()
        return thread

    def health(self) -> Reply:
        body = {"status": self.status, "index": str(self.cfg.index_path)}
        if self.status == "ready":
            return Reply(200, {**body, "train": self.manifest.num_rows, "train_texts": self.texts is not None,
                               "answered": self.answered, "passes": self.passes})
        return Reply(503, {**body, **({"error": self.error} if self.error else {})})

    # requests

    def accept(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Reply | QueryRequest:
        """A checked query request, or the reply to anything else (health, a 4xx for a bad request)."""
        try:
            return self._accept(method, urlsplit(path).path, headers, body)
        except RequestError as error:
            return error_reply(error.status, str(error))

    def _accept(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Reply | QueryRequest:
        if path not in ("/health", "/query"):
            raise RequestError(404, f"no such path {path}: the service answers POST /query and GET /health")
        wanted = "GET" if path == "/health" else "POST"
        if method != wanted:
            raise RequestError(405, f"{method} {path}: use {wanted} {path}")
        if path == "/health":
            return self.health()
        self.check_token(headers.get("authorization"))
        self.check_length(len(body))
        if self.status != "ready":
            raise RequestError(503, f"the service is {self.status}"
                               + (f" ({self.error})" if self.error else "; retry once GET /health answers 200"))
        return self.parse(body)

    def check_token(self, authorization: str | None) -> None:
        """With ``serve.token`` set, the request's header must be "Authorization: Bearer <token>"."""
        token = self.cfg.serve.token
        if token and not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
            raise RequestError(401, "missing or wrong token: send the header 'Authorization: Bearer <serve.token>'")

    def check_length(self, length: int) -> None:
        if length > self.cfg.serve.max_body_bytes:
            raise RequestError(413, f"the body has {length} bytes; at most serve.max_body_bytes="
                               f"{self.cfg.serve.max_body_bytes}")

    def parse(self, body: bytes) -> QueryRequest:
        """The request of a POST /query body, checked like a data file (``examples_of_rows``) and tokenized
        like the index's rows (every query needs a loss token).

        Raises:
            RequestError: 400 naming what is wrong (JSON, key, type, row), 413 for too many queries.
        """
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(400, f"the body is not JSON ({error})") from None
        if not isinstance(data, dict):
            raise RequestError(400, f'the body must be a JSON object {{"queries": [...], "top_k": k}}, got '
                               f"{type(data).__name__}")
        unknown = sorted(set(data) - set(BODY_KEYS))
        if unknown:
            raise RequestError(400, f"unknown key {unknown[0]!r}: the body holds 'queries' and an optional 'top_k'")
        rows = data.get("queries")
        if not isinstance(rows, list) or not rows:
            raise RequestError(400, "'queries' must be a non-empty list of rows ({'text': ...}, {'prompt': ..., "
                               "'response': ...} or {'messages': [...]}, each with an optional 'id')")
        limit = self.cfg.serve.max_queries
        if len(rows) > limit:
            raise RequestError(413, f"{len(rows)} queries; at most serve.max_queries={limit} per request")
        top_k = data.get("top_k", min(self.cfg.query.top_k, self.cfg.serve.max_top_k))
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.cfg.serve.max_top_k:
            raise RequestError(400, f"'top_k' must be an integer in 1..{self.cfg.serve.max_top_k} "
                               f"(serve.max_top_k), got {top_k!r}")
        try:
            examples = examples_of_rows("request", rows)
            tokenize_examples(examples, self.tokenizer, self.max_length)  # no loss tokens: named here, not mid-pass
        except DataError as error:
            raise RequestError(400, str(error)) from None
        return QueryRequest(examples, top_k)

    def answer(self, requests: Sequence[QueryRequest]) -> list[Reply]:
        """The replies to checked requests, from one featurization and one pass over the training rows for
        all their queries (each gets its own top_k). A failure fails this pass's requests (500, one line);
        the next pass is answered."""
        try:
            with self._lock:
                start = time.perf_counter()
                results = self._results([e for r in requests for e in r.examples], max(r.top_k for r in requests))
                self.answered, self.passes = self.answered + len(results), self.passes + 1
        except Exception as error:  # noqa: BLE001 - the service keeps answering
            log.exception("a pass of %d request(s) failed", len(requests))
            message = str(error) if isinstance(error, LorifError) else f"{type(error).__name__}: {error}"
            return [error_reply(500, message.splitlines()[0] if message else type(error).__name__)] * len(requests)
        log.info("answered %d queries of %d request(s) in %.3f s", len(results), len(requests),
                 time.perf_counter() - start)
        replies, at = [], 0
        for request in requests:
            mine = results[at:at + len(request.examples)]
            at += len(request.examples)
            replies.append(Reply(200, {"results": [{**r, "proponents": r["proponents"][:request.top_k],
                                                    "opponents": r["opponents"][:request.top_k]} for r in mine]}))
        return replies

    def _results(self, examples: list[Example], top_k: int) -> list[dict]:
        """Each example's answer with ``top_k`` proponents (best first) and opponents (most negative first),
        both ends from the same pass, with the training rows' ids and texts."""
        queries = self.backend.featurize(examples)
        route = query_route(self.query_cfg, self.header, self.stored, len(queries.row_ids))
        ends: TopK = self.backend.score(queries.columns, route, min(top_k, self.manifest.num_rows))
        rows = ends.index.reshape(-1).tolist() + ends.low_index.reshape(-1).tolist()
        ids = self.index.ids_of_rows(self.manifest, rows)
        texts = self.texts.texts(rows) if self.texts is not None else {}

        def ranked(scores: torch.Tensor, index: torch.Tensor) -> list[dict]:
            return [{"rank": rank, "train_id": ids[row], "train_text": texts.get(row), "score": score}
                    for rank, (score, row) in enumerate(zip(scores.tolist(), index.tolist()), start=1)]

        return [{"query_id": e.id, "query_text": e.text, "proponents": ranked(ends.scores[i], ends.index[i]),
                 "opponents": ranked(ends.low_scores[i], ends.low_index[i])} for i, e in enumerate(examples)]

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


class Batcher:
    """Answers requests submitted from many threads in passes of up to ``max_size`` (``answer(requests)``):
    a pass takes every request waiting, after at most ``wait_s`` for more to join."""

    def __init__(self, answer: Callable[[list[QueryRequest]], list[Reply]], max_size: int, wait_s: float):
        self._answer, self.max_size, self.wait_s = answer, max_size, wait_s
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lorif-serve-batch", daemon=True)
        self._thread.start()

    def submit(self, request: QueryRequest) -> Reply:
        future: Future = Future()
        self._queue.put((request, future))
        return future.result()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            batch, deadline = [item], time.monotonic() + self.wait_s
            while len(batch) < self.max_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this pass
                    break
                batch.append(item)
            for (_, future), reply in zip(batch, self._answer([request for request, _ in batch])):
                future.set_result(reply)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def http_server(handler: QueryHandler, submit: Callable[[QueryRequest], Reply]) -> ThreadingHTTPServer:
    """A threaded HTTP server on ``serve.host``:``serve.port`` whose requests go to ``handler`` (queries
    through ``submit``). Not started.

    Raises:
        ConfigError: the address cannot be listened on (in use, not this machine's).
    """
    serve_cfg = handler.cfg.serve

    class Handler(BaseHTTPRequestHandler):
        server_version = "lorif-ray"

        def do_GET(self) -> None:
            self._respond("GET")

        def do_POST(self) -> None:
            self._respond("POST")

        def _respond(self, method: str) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self._send(error_reply(400, "Content-Length is not a number"))
            if length > serve_cfg.max_body_bytes:  # refused unread
                self.close_connection = True
                return self._send(error_reply(413, f"the body has {length} bytes; at most serve.max_body_bytes="
                                                   f"{serve_cfg.max_body_bytes}"))
            outcome = handler.accept(method, self.path, self.headers, self.rfile.read(length))
            self._send(submit(outcome) if isinstance(outcome, QueryRequest) else outcome)

        def _send(self, reply: Reply) -> None:
            data = reply.encoded()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
            log.debug("%s %s", self.address_string(), format % args)

    try:
        return ThreadingHTTPServer((serve_cfg.host, serve_cfg.port), Handler)
    except OSError as error:
        raise ConfigError(f"serve.host={serve_cfg.host} serve.port={serve_cfg.port}: cannot listen there "
                          f"({error.strerror or error}); choose another serve.port") from None


@contextmanager
def stop_on_signals(stop: threading.Event | None = None) -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (the service's way to end: it then deletes what it started); given
    an event (tests, notebooks), no handler is installed."""
    if stop is not None:
        yield stop
        return
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)


def wait_until_ready(status: Callable[[], tuple[str, str | None]], stop: threading.Event) -> bool:
    """Wait until ``status()`` (→ (status, error)) is "ready" (True) or ``stop`` is set (False).

    Raises:
        LorifError: the service failed to load (its error, one line).
    """
    while not stop.wait(0.2):
        state, error = status()
        if state == "ready":
            return True
        if state == "failed":
            raise LorifError(f"the query service failed to load: {error}")
    return False


def serve_local(cfg: Config, stop: threading.Event | None = None) -> None:
    """The query service in this process (``cluster=none``): a threaded HTTP server, one backend, until
    SIGINT/SIGTERM (or ``stop``).

    Raises:
        ConfigError / IndexNotFoundError / ...: before the port is opened, for settings or a missing index.
    """
    check_service_config(cfg)
    open_query(cfg)  # a missing index or curvature is named before anything listens
    handler = QueryHandler(cfg, local_query)
    batcher = Batcher(handler.answer, cfg.serve.max_batch_size, cfg.serve.batch_wait_s)
    server = http_server(handler, batcher.submit)
    thread = threading.Thread(target=server.serve_forever, name="lorif-serve-http", daemon=True)
    thread.start()
    log.info("query service loading on http://%s:%d (GET /health answers 503 until ready)", cfg.serve.host,
             cfg.serve.port)
    try:
        with stop_on_signals(stop) as stop:
            handler.start_loading()
            if wait_until_ready(lambda: (handler.status, handler.error), stop):
                log.info("query service ready: POST http://%s:%d/query", cfg.serve.host, cfg.serve.port)
                while not stop.wait(0.5):
                    pass
            log.info("query service stopping")
    finally:
        server.shutdown()
        server.server_close()
        batcher.close()
        handler.close()
