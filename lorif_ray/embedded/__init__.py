"""The embedded default: a small GPT-2 trained offline on a synthetic facts corpus, cached."""

from lorif_ray.embedded.facts import FactsCorpus, build_facts_corpus, write_corpus
from lorif_ray.embedded.tokenizer import build_tokenizer
from lorif_ray.embedded.train import (
    EmbeddedAssets,
    EmbeddedRecipe,
    ensure_embedded,
    query_accuracy,
)

__all__ = [
    "EmbeddedAssets",
    "EmbeddedRecipe",
    "FactsCorpus",
    "build_facts_corpus",
    "build_tokenizer",
    "ensure_embedded",
    "query_accuracy",
    "write_corpus",
]
