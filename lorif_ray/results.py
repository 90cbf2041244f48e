"""``Results``: a query run read back from its output folder, whoever wrote it (``jobs/attribute.py``,
``jobs/query.py``, ``Attributor.query``), with texts; in a notebook it shows itself as a table.

Example:
    >>> from lorif_ray import Results
    >>> results = Results.open("outputs/lorif_f4_c1_r64")  # doctest: +SKIP
    >>> results.proponents(results.query_ids[0], k=3)  # doctest: +SKIP
    [{'rank': 1, 'train_id': '17', 'train_text': 'the capital of zorvia is kelm .', 'score': 0.93}, ...]
    >>> results.opponents(results.query_ids[0], k=1)  # doctest: +SKIP
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pyarrow as pa

from lorif_ray.data import TrainTexts
from lorif_ray.outputs.report_page import escape, format_score, rows_by_query
from lorif_ray.store.query_run import QueryRun

ROW_KEYS = ("rank", "train_id", "train_text", "score")
SHOWN = 20  # queries in the notebook table


class Results:
    """What a query run wrote to an output folder (``QueryRun``), with texts.

    Attributes:
        topk: Arrow table, one row per (query, rank): query_id, query_text, rank, train_id, train_text, score.
        bottomk: the same for the opponents (rank 1 = the most negative score).
        queries: Arrow table, one row per query: query_id, query_text, query_prompt, source_id, score_bins.
        query_ids: the ids of the queries (the rows of ``scores``), in file order.
        scores: with ``query.full_scores``, (queries, training examples) float32 memory map of ``scores.npy``
            (input order; > 0: proponent); else None.
        train_ids: the ids of the columns of ``scores`` (with ``full_scores``; else []).
        tokens: with ``per_token``, Arrow table of the token rows: token_id (``<query id>@<position>``), query_id,
            position, token, best_score, best_train_id, score_on_top_proponent; else None.
        token_ids: the token rows' ids; token_topk: their top-k (token_id, query_id, position, token, rank,
            train_id, train_text, score); token_scores: with ``full_scores`` too, (token rows, training examples)
            float32; else [], None, None.
        layer_scores, layers: with ``per_layer``, (layers, queries, training examples) float32 memory map whose
            sum over layers is ``scores``, and the layer names; else None, [].
        self_influence: with ``self_influence``, Arrow table train_id, train_text, self_influence (I(t, t); the
            texts are read from the training input when first asked for); else None.
        meta: what made the results (config incl. ``query.measurement``, route, precision, the score's meaning).
        report_path: the run's ``report.html``.

    Raises:
        QueryRunError: the folder holds no query run, or one of an older format (named).
    """

    def __init__(self, output_dir: str | Path):
        self.run = QueryRun.open(output_dir)
        self.output_dir = Path(output_dir)
        self.meta = self.run.table_meta("topk")
        self.topk = self.run.table("topk")
        self.bottomk = self.run.table("opponents")
        self.queries = self.run.table("queries")
        self.query_ids: list[str] = self.queries.column("query_id").to_pylist()
        self.scores = self.run.array("scores")  # (nq, N)
        ids = self.run.sidecar("scores_ids") or self.run.sidecar("layer_scores_ids") or {}
        self.train_ids: list[str] = ids.get("train_ids", [])
        self.tokens = self.run.table("tokens")
        self.token_ids: list[str] = [] if self.tokens is None else self.tokens.column("token_id").to_pylist()
        self.token_topk = self.run.table("token_topk")
        self.token_scores = self.run.array("token_scores")
        self.layer_scores = self.run.array("layer_scores")
        self.layers: list[str] = (self.run.sidecar("layer_scores_ids") or {}).get("layers", [])
        self.report_path = self.run.path("report")

    @classmethod
    def open(cls, output_dir: str | Path) -> "Results":
        """The query run in ``output_dir``, written by the jobs or the Python API."""
        return cls(output_dir)

    @property
    def measurement(self) -> str:
        """What the queries' gradients were taken of (``query.measurement``)."""
        return self.meta.get("config", {}).get("query", {}).get("measurement", "loss")

    @cached_property
    def self_influence(self) -> pa.Table | None:
        table = self.run.table("self_influence")
        if table is None:
            return None
        index = Path(self.meta["index"])  # as the run saw it: relative to its working folder, perhaps
        if not index.is_dir() and (self.output_dir / "index").is_dir():
            index = self.output_dir / "index"
        texts = TrainTexts(index).texts(range(table.num_rows))
        return table.add_column(1, "train_text", pa.array([texts[i] for i in range(table.num_rows)], pa.string()))

    @cached_property
    def _sides(self) -> tuple[dict, dict]:
        return rows_by_query(self.topk), rows_by_query(self.bottomk)

    def proponents(self, query_id: str, k: int | None = None) -> list[dict]:
        """The top proponents of one query, best first: [{rank, train_id, train_text, score}].

        Raises:
            KeyError: no such query id.
        """
        return self._side(0, query_id, k)

    def opponents(self, query_id: str, k: int | None = None) -> list[dict]:
        """The strongest opponents of one query, most negative score first: [{rank, train_id, train_text, score}].

        Raises:
            KeyError: no such query id.
        """
        return self._side(1, query_id, k)

    def _side(self, side: int, query_id: str, k: int | None) -> list[dict]:
        rows = self._sides[side].get(str(query_id))
        if rows is None:
            where = " (a token row: see Results.token_topk)" if str(query_id) in set(self.token_ids) else ""
            raise KeyError(f"no query {query_id!r} in the results{where}; query ids: {self.query_ids[:5]}"
                           f"{' …' if len(self.query_ids) > 5 else ''}")
        return [{key: r[key] for key in ROW_KEYS} for r in rows[:k]]

    def to_pandas(self):
        """``topk`` as a pandas DataFrame (pandas is optional: ``pip install pandas``)."""
        try:
            import pandas  # noqa: F401
        except ImportError as e:
            raise ImportError("Results.to_pandas needs pandas, which lorif-ray does not install; "
                              "`pip install pandas`, or use Results.topk (a pyarrow Table)") from e
        return self.topk.to_pandas()

    def __repr__(self) -> str:
        shape = None if self.scores is None else tuple(self.scores.shape)
        return (f"Results({len(self.query_ids)} queries, top-{self.run.record.get('top_k')} each side, scores {shape}, "
                f"measurement={self.measurement!r}, {self.output_dir})")

    def _repr_html_(self) -> str:
        """A table of the first ``SHOWN`` queries with their top proponent and opponent (notebooks)."""
        top, bottom = self._sides
        rows = []
        for query_id in self.query_ids[:SHOWN]:
            text = self.queries.column("query_text")[self.query_ids.index(query_id)].as_py()
            best, worst = (top.get(query_id) or [None])[0], (bottom.get(query_id) or [None])[0]
            cells = [f"<td><code>{escape(query_id, 60)}</code></td><td>{escape(text, 120)}</td>"]
            for row in (best, worst):
                cells.append("<td>—</td><td></td>" if row is None else
                             f"<td style='text-align:right'>{format_score(row['score'])}</td><td>"
                             f"{escape(row['train_text'], 120)} <small>[{escape(row['train_id'], 40)}]</small></td>")
            rows.append(f"<tr>{''.join(cells)}</tr>")
        more = len(self.query_ids) - SHOWN
        note = f"; the first {SHOWN} shown" if more > 0 else ""
        head = ("<tr><th>query</th><th>text</th><th>score</th><th>top proponent</th><th>score</th>"
                "<th>top opponent</th></tr>")
        return (f"<div><p><b>{len(self.query_ids)} queries</b> × {self.run.record.get('train')} training examples"
                f" ({escape(self.measurement, None)}){note}; every rank in <code>{escape(self.report_path, None)}"
                f"</code></p><table>{head}{''.join(rows)}</table></div>")
