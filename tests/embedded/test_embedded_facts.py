"""The synthetic facts corpus: determinism, sizes, and one known source per query."""

import re
from collections import defaultdict

import pytest

from lorif_ray.data import load_examples
from lorif_ray.embedded.facts import ATTRIBUTES, build_facts_corpus, write_corpus
from lorif_ray.errors import ConfigError


@pytest.fixture(scope="module")
def corpus():
    return build_facts_corpus(seed=0)


def fact_patterns():
    """(attribute, phrasing index, regex with groups land and value) for every phrasing."""
    patterns = []
    for a in ATTRIBUTES:
        for k, phrasing in enumerate(a.phrasings):
            regex = re.escape(phrasing).replace(r"\{land\}", r"(?P<land>\w+)")
            regex = regex.replace(r"\{value\}", r"(?P<value>\w+)")
            patterns.append((a.name, k, re.compile(regex + "$")))
    return patterns


def parse_fact(text):
    """The (land, attribute, value, phrasing) a sentence states, or None."""
    for name, k, pattern in fact_patterns():
        match = pattern.match(text)
        if match:
            return match["land"], name, match["value"], k
    return None


def test_same_seed_same_corpus():
    assert build_facts_corpus(seed=3) == build_facts_corpus(seed=3)
    assert build_facts_corpus(seed=3) != build_facts_corpus(seed=4)


def test_more_queries_than_lands():
    with pytest.raises(ConfigError, match="num_queries"):
        build_facts_corpus(num_lands=4, num_queries=5)


def test_sizes(corpus):
    assert 400 <= len(corpus.train) <= 800
    assert 32 <= len(corpus.queries) <= 64
    assert all(5 <= len(row["text"].split()) + 1 <= 20 for row in corpus.train)  # +1: <bos>
    assert len({row["id"] for row in corpus.train}) == len(corpus.train)


def test_each_fact_has_one_value_and_each_query_one_source(corpus):
    statements = defaultdict(list)  # (land, attribute) -> [(id, value, phrasing)]
    for row in corpus.train:
        fact = parse_fact(row["text"])
        if fact:
            statements[fact[:2]].append((row["id"], fact[2], fact[3]))
    assert all(len({value for _, value, _ in s}) == 1 for s in statements.values())

    texts = {row["id"]: row["text"] for row in corpus.train}
    queried = set()
    for query in corpus.queries:
        land, name, value, phrasing = parse_fact(query["prompt"] + query["response"] + " .")
        queried.add((land, name))
        assert statements[(land, name)] == [(query["source_id"], value, 1 - phrasing)]
        source_words = texts[query["source_id"]].split()
        assert land in source_words and value in source_words
    assert len(queried) == len(corpus.queries)  # Each query a distinct fact.
    # Every fact that is not queried appears in both phrasings (paraphrase exposure).
    assert all(len(s) == 2 for fact, s in statements.items() if fact not in queried)


def test_values_and_lands_recur(corpus):
    words = [row["text"].split() for row in corpus.train]
    for query in corpus.queries[:8]:
        value = query["response"].strip()
        assert sum(value in w for w in words) >= 3


def test_write_corpus_loads(corpus, tmp_path):
    train_path, queries_path = write_corpus(corpus, tmp_path / "corpus")
    train, queries = load_examples(train_path), load_examples(queries_path)
    assert [e.id for e in train] == [row["id"] for row in corpus.train]
    assert queries[0].prompt == corpus.queries[0]["prompt"]
    assert queries[0].text == corpus.queries[0]["prompt"] + corpus.queries[0]["response"]
    assert '"source_id"' in queries_path.read_text().splitlines()[0]
