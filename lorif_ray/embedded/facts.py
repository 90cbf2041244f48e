"""A synthetic corpus of invented facts with a known source sentence for each query.

Invented lands (pseudo-words made of syllables) each have one value per attribute (capital,
colour, animal, river, food), drawn from shared pools, so a value word appears in many training
sentences and a land in several. Every attribute has two phrasings, e.g. "the capital of zorvia is
kelm ." and "zorvia has its capital in kelm .".

A query asks for one fact in the phrasing its training sentence does not use, with loss on the
value only, and that fact appears in exactly one training sentence: its known source. Models extract
facts across phrasings only when they have seen paraphrases (Allen-Zhu and Li, "Physics of Language
Models 3.1", 2023), so every fact that is not queried appears in both phrasings. Filler sentences
mention a land or a value without stating a fact, and for each query one distractor names its land
and its value together without stating the fact, so that word overlap alone does not find the
source.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lorif_ray.errors import ConfigError

_ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st",
    "th", "tr",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "l", "m", "n", "r", "s", "k")
_LAND_ENDINGS = ("via", "ria", "dor", "ven", "mar", "tul")


@dataclass(frozen=True)
class Attribute:
    """One kind of fact about a land.

    Attributes:
        name: Short name, used in ids.
        phrasings: Two templates with {land} and {value}; each ends in "{value} ." so that the
            text before " {value}" is a query prompt.
        pool_size: Number of distinct values; 0 means the fixed `values`.
        values: Fixed English values (empty when values are invented words).
    """

    name: str
    phrasings: tuple[str, str]
    pool_size: int = 0
    values: tuple[str, ...] = ()


ATTRIBUTES = (
    Attribute(
        "capital",
        ("the capital of {land} is {value} .", "{land} has its capital in {value} ."),
        pool_size=24,
    ),
    Attribute(
        "colour",
        ("the flag of {land} is {value} .", "people in {land} paint their doors {value} ."),
        values=(
            "red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown",
            "pink", "gold",
        ),
    ),
    Attribute(
        "animal",
        ("the national animal of {land} is the {value} .", "in {land} children love the {value} ."),
        values=(
            "fox", "owl", "bear", "wolf", "hare", "crow", "seal", "deer", "lynx", "heron", "otter",
            "moose", "eagle", "badger", "toad", "swan",
        ),
    ),
    Attribute(
        "river",
        (
            "the longest river of {land} is the {value} .",
            "{land} is crossed by the river {value} .",
        ),
        pool_size=16,
    ),
    Attribute(
        "food",
        (
            "the people of {land} like to eat {value} .",
            "the favourite dish in {land} is {value} .",
        ),
        values=(
            "bread", "rice", "fish", "cheese", "beans", "soup", "plums", "honey", "noodles",
            "apples", "figs", "nuts",
        ),
    ),
)

_FILLERS = (
    "{land} is a small land with many hills .",
    "a traveller from {land} told a long story .",
    "the old maps do not show {land} .",
    "merchants say that {value} is easy to find .",
    "nobody in the village had heard of {value} .",
    "a song about {value} was sung at the market .",
)
_DISTRACTOR = "an old song from {land} tells of {value} ."


@dataclass(frozen=True)
class FactsCorpus:
    """Training sentences and the queries whose source sentence is known.

    Attributes:
        train: Rows with `id` and `text`.
        queries: Rows with `id`, `prompt`, `response` (" " + value) and `source_id` (the id of the
            one training sentence that states the fact).
    """

    train: list[dict]
    queries: list[dict]


def build_facts_corpus(
    seed: int = 0, num_lands: int = 64, num_queries: int = 48, num_fillers: int = 96
) -> FactsCorpus:
    """Generates the corpus; the same arguments always give the identical corpus.

    Args:
        seed: Seed of every random choice (names, values, phrasings, queries, order).
        num_lands: Invented lands; each has one fact per attribute (5 per land).
        num_queries: Queried facts, at most one per land so that queries are about different lands.
        num_fillers: Sentences that mention a land or a value but state no fact; one distractor per
            query, with the query's land and value, comes on top.

    Returns:
        With the defaults, 736 training sentences (2 per unqueried fact, 1 per queried fact, the
        fillers and distractors) of 7 to 10 words, and 48 queries.

    Raises:
        ConfigError: num_queries > num_lands.
    """
    if num_queries > num_lands:
        raise ConfigError(f"num_queries ({num_queries}) must not exceed num_lands ({num_lands})")
    rng = random.Random(seed)
    template_words = {
        word
        for text in (*_FILLERS, _DISTRACTOR, *(p for a in ATTRIBUTES for p in a.phrasings))
        for word in text.split()
    }
    names = _NameMaker(rng, reserved=template_words | {v for a in ATTRIBUTES for v in a.values})
    lands = [names.make(rng.choice(_LAND_ENDINGS)) for _ in range(num_lands)]
    pools = {
        a.name: a.values or tuple(names.make("") for _ in range(a.pool_size)) for a in ATTRIBUTES
    }
    facts = {(land, a.name): rng.choice(pools[a.name]) for land in lands for a in ATTRIBUTES}
    attributes = {a.name: a for a in ATTRIBUTES}

    queried = {land: rng.choice(ATTRIBUTES).name for land in rng.sample(lands, num_queries)}
    sentences: list[tuple[str, tuple[str, str] | None]] = []  # (text, fact it states)
    query_phrasing: dict[tuple[str, str], int] = {}
    for (land, name), value in facts.items():
        phrasings = attributes[name].phrasings
        if queried.get(land) == name:
            source = rng.randrange(2)
            query_phrasing[(land, name)] = 1 - source
            sentences.append((phrasings[source].format(land=land, value=value), (land, name)))
            sentences.append((_DISTRACTOR.format(land=land, value=value), None))
        else:
            sentences += [(p.format(land=land, value=value), (land, name)) for p in phrasings]
    all_values = [v for pool in pools.values() for v in pool]
    for _ in range(num_fillers):
        template = rng.choice(_FILLERS)
        text = template.format(land=rng.choice(lands), value=rng.choice(all_values))
        sentences.append((text, None))
    rng.shuffle(sentences)

    train = [{"id": f"t{i:04d}", "text": text} for i, (text, _) in enumerate(sentences)]
    source_ids = {
        fact: row["id"] for row, (_, fact) in zip(train, sentences) if fact in query_phrasing
    }
    queries = []
    for land, name in sorted(query_phrasing, key=lambda fact: source_ids[fact]):
        template = attributes[name].phrasings[query_phrasing[(land, name)]]
        prompt = template.split(" {value}")[0].format(land=land)
        queries.append(
            {
                "id": f"q{len(queries):03d}",
                "prompt": prompt,
                "response": " " + facts[(land, name)],
                "source_id": source_ids[(land, name)],
            }
        )
    return FactsCorpus(train=train, queries=queries)


def write_corpus(corpus: FactsCorpus, directory: str | Path) -> tuple[Path, Path]:
    """Writes `train.jsonl` and `queries.jsonl` (with its `source_id` column) into `directory`.

    Returns:
        The paths of the training file and the query file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.jsonl", directory / "queries.jsonl"
    for path, rows in zip(paths, (corpus.train, corpus.queries)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


class _NameMaker:
    """Invents distinct pseudo-words of two or three syllables, none of them a reserved word."""

    def __init__(self, rng: random.Random, reserved: set[str]) -> None:
        self._rng = rng
        self._used = set(reserved)

    def make(self, ending: str) -> str:
        while True:
            syllables = self._rng.choice((2, 2, 3))  # Mostly two syllables: short, readable names.
            word = "".join(
                self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) for _ in range(syllables)
            )
            word = word + ending if ending else word + self._rng.choice(_CODAS)
            if word not in self._used:
                self._used.add(word)
                return word
