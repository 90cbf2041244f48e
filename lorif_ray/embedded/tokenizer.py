"""A word-level tokenizer built offline from a corpus, for the embedded model.

Every lowercased word and punctuation mark of the corpus is one token, so a fact's value is a single
token and attribution results read as words.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
"""Special tokens, with ids 0..3 in this order."""


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Builds a word-level tokenizer whose vocabulary is every word of `texts`.

    Text is lowercased and split on whitespace and punctuation (each punctuation mark its own
    token). Ids 0..3 are <pad>, <unk>, <bos>, <eos>; the words follow in sorted order, so the same
    words always give the same ids whatever the order of `texts`. With add_special_tokens=True (the
    default) <bos> is prepended; no <eos> is appended.

    Args:
        texts: The corpus; unseen words map to <unk> later.

    Returns:
        A fast tokenizer with pad, unk, bos and eos tokens set; it round-trips through
        `save_pretrained` / `AutoTokenizer.from_pretrained` offline.

    Example:
        >>> tok = build_tokenizer(["The capital of Zorvia is kelm."])
        >>> tok.convert_ids_to_tokens(tok("the capital of zorvia is kelm .")["input_ids"])
        ['<bos>', 'the', 'capital', 'of', 'zorvia', 'is', 'kelm', '.']
    """
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    words = {
        word
        for text in texts
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    }
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
    )
