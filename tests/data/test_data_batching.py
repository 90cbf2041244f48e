"""Tokenization with loss masks, truncation, and padding into batches."""

import pytest
import torch

from lorif_ray.data import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    collate,
    iter_batches,
    tokenize_examples,
)
from lorif_ray.embedded.tokenizer import build_tokenizer
from lorif_ray.errors import ConfigError, DataError, NoLossTokensError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["the capital of zorvia is kelm .", "zorvia has its capital in kelm ."])


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_tokens_carry_no_loss(tokenizer):
    example = Example("q", "zorvia has its capital in kelm .", prompt="zorvia has its capital in")
    [t] = tokenize_examples([example], tokenizer, max_length=64)
    bos = tokenizer.bos_token_id
    assert t.input_ids == [bos] + ids(tokenizer, "zorvia has its capital in kelm .")
    assert t.labels == [IGNORE_INDEX] * 6 + ids(tokenizer, "kelm .")


def test_text_tokens_all_carry_loss(tokenizer):
    [t] = tokenize_examples([Example("t", "the capital of zorvia")], tokenizer, max_length=64)
    expected = [tokenizer.bos_token_id] + ids(tokenizer, "the capital of zorvia")
    assert t.input_ids == t.labels == expected


def test_truncation_keeps_the_start(tokenizer):
    examples = [
        Example("t", "the capital of zorvia is kelm ."),
        Example("p", "the capital of zorvia is kelm", prompt="the capital of"),
    ]
    text, prompted = tokenize_examples(examples, tokenizer, max_length=5)
    assert text.input_ids == [tokenizer.bos_token_id] + ids(tokenizer, "the capital of zorvia")
    assert prompted.labels == [IGNORE_INDEX] * 4 + ids(tokenizer, "zorvia")


def test_no_loss_tokens_names_ids(tokenizer):
    long_prompt = Example("long", "the capital of zorvia is kelm", prompt="the capital of zorvia")
    examples = [Example("ok", "the capital"), long_prompt, Example("one", "x")]
    # "x" is one <unk> after <bos> and still carries loss; a bare <bos> would not.
    with pytest.raises(NoLossTokensError, match=r"'long' \[1 in all\]"):
        tokenize_examples(examples, tokenizer, max_length=4)
    many = [Example(f"e{i}", "a b", prompt="a b") for i in range(12)]
    with pytest.raises(NoLossTokensError, match=r"'e9' \(\+2 more\) \[12 in all\]"):
        tokenize_examples(many, tokenizer, max_length=8)


def test_one_token_text_has_no_loss():
    class NoBos:  # A tokenizer that adds no special tokens: one word is one token.
        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[len(w) for w in t.split()] for t in texts]}

    with pytest.raises(NoLossTokensError, match="'single'"):
        tokenize_examples([Example("single", "word")], NoBos(), max_length=8)


def test_empty_text_and_bad_max_length(tokenizer):
    with pytest.raises(DataError, match="'blank'"):
        tokenize_examples([Example("blank", "")], tokenizer, max_length=8)
    with pytest.raises(ConfigError, match="max_length"):
        tokenize_examples([Example("t", "a b")], tokenizer, max_length=1)


def test_collate_pads_right():
    batch = collate(
        [TokenizedExample("a", [5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample("b", [5], [5])],
        pad_token_id=0,
    )
    assert all(v.dtype == torch.long and v.shape == (2, 3) for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [5, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(DataError):
        collate([], pad_token_id=0)


def test_iter_batches_in_order():
    tokenized = [TokenizedExample(str(i), [1] * (i + 1), [1] * (i + 1)) for i in range(5)]
    batches = list(iter_batches(tokenized, batch_size=2, pad_token_id=0))
    assert [b_ids for b_ids, _ in batches] == [["0", "1"], ["2", "3"], ["4"]]
    assert [b["input_ids"].shape for _, b in batches] == [(2, 2), (2, 4), (1, 5)]
    with pytest.raises(ConfigError):
        next(iter_batches(tokenized, batch_size=0, pad_token_id=0))
