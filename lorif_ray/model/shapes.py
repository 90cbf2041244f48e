"""A model's shapes without its weights: its Hugging Face config, from ``model.arch``, a local folder (or a Hub
id in the local cache) or the embedded recipe. ``lorif_ray.model.tensor_parallel.meta_model`` builds the model
from it on the meta device (the planner's shapes, a sharded load's skeleton)."""

from __future__ import annotations

from lorif_ray.config import ModelConfig
from lorif_ray.errors import ConfigError


def model_config(model: ModelConfig):
    """The Hugging Face config of ``model``: from ``arch``, else ``path`` (local), else the embedded recipe."""
    from transformers import AutoConfig

    if model.arch is not None:
        arch = dict(model.arch)
        model_type = arch.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.arch needs a model_type (e.g. gpt2, llama, olmo3, apertus)")
        try:
            return AutoConfig.for_model(model_type, **arch)
        except ValueError as e:
            import transformers

            raise ConfigError(f"model.arch.model_type={model_type!r} is not a model type of "
                              f"transformers {transformers.__version__}") from e
    if model.path is not None:
        from lorif_ray.model.hub import resolve_model_path
        from lorif_ray.model.loading import read_model_config

        folder = resolve_model_path(model.path)  # a folder, or a Hub id in the local cache
        read_model_config(folder)  # a missing or damaged config.json, named
        try:
            return AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path={model.path}: no usable Hugging Face config ({e})") from e
    return embedded_config()


def embedded_config():
    """GPT2Config of the embedded default, from its recipe and the vocabulary of its corpus (~1 s)."""
    import tempfile

    from transformers import GPT2Config

    from lorif_ray.data import load_examples
    from lorif_ray.embedded.facts import build_facts_corpus, write_corpus
    from lorif_ray.embedded.tokenizer import build_tokenizer
    from lorif_ray.embedded.train import EmbeddedRecipe

    recipe = EmbeddedRecipe()
    corpus = build_facts_corpus(seed=recipe.corpus_seed, num_lands=recipe.num_lands,
                                num_queries=recipe.num_queries, num_fillers=recipe.num_fillers)
    with tempfile.TemporaryDirectory() as directory:
        train_path, queries_path = write_corpus(corpus, directory)
        examples = load_examples(train_path) + load_examples(queries_path)
    tokenizer = build_tokenizer(e.text for e in examples)  # as in embedded.train._build
    return GPT2Config(vocab_size=len(tokenizer), n_positions=recipe.n_positions, n_embd=recipe.n_embd,
                      n_layer=recipe.n_layer, n_head=recipe.n_head, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
