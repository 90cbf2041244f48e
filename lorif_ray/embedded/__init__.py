"""The embedded default: a small GPT-2 trained offline on a synthetic facts corpus, cached."""

from lorif_ray.embedded.facts import FactsCorpus, build_facts_corpus, write_corpus
from lorif_ray.embedded.tokenizer import build_tokenizer
from lorif_ray.embedded.train import (
    EmbeddedAssets,
    EmbeddedRecipe,
    ensure_embedded,
    query_accuracy,
)


def embedded_assets(progress: bool = True) -> EmbeddedAssets:
    """The embedded default model and its facts corpus, trained once into the user cache
    (``Config.embedded_cache_path``): ``.model_dir``, ``.train_path`` (``id``, ``text``) and ``.queries_path``
    (``id``, ``prompt``, ``response``, ``source_id``), the files ``Attributor()`` and ``jobs/attribute.py`` use
    when no model is given.

    Example:
        >>> from lorif_ray.data import load_examples
        >>> load_examples(embedded_assets().queries_path)[0].prompt  # doctest: +SKIP
        'the longest river of noudridor is the'
    """
    from lorif_ray.config import Config

    return ensure_embedded(Config().embedded_cache_path, progress=progress)


__all__ = [
    "EmbeddedAssets",
    "embedded_assets",
    "EmbeddedRecipe",
    "FactsCorpus",
    "build_facts_corpus",
    "build_tokenizer",
    "ensure_embedded",
    "query_accuracy",
    "write_corpus",
]
