"""Tokenizing examples into input ids and labels, and padding them into batches.

Labels follow the Hugging Face convention: aligned with `input_ids`, -100 where a token carries no
loss (prompt tokens, padding). The caller shifts them for next-token loss, so position i's label is
the token predicted from positions < i, and position 0 is never predicted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lorif_ray.data.examples import Example
from lorif_ray.errors import ConfigError, DataError, NoLossTokensError

IGNORE_INDEX = -100
"""Label of a position that carries no loss (the Hugging Face / PyTorch cross-entropy default)."""

# How many offending ids an error message lists before it only counts the rest.
_SHOWN_IDS = 10


@dataclass
class TokenizedExample:
    """An example as token ids.

    Attributes:
        id: The example's id.
        input_ids: Token ids, (T,).
        labels: (T,): the token id where the token carries loss, else IGNORE_INDEX.
    """

    id: str
    input_ids: list[int]
    labels: list[int]


def tokenize_examples(
    examples: Sequence[Example], tokenizer, max_length: int
) -> list[TokenizedExample]:
    """Tokenizes examples, masking prompt tokens out of the loss.

    With a prompt, the prompt and the rest of the text are tokenized separately (special tokens such
    as a BOS only on the prompt, so they come first) and concatenated, so the prompt/response
    boundary falls exactly between tokens. Chat examples (`messages`) are rendered with the
    tokenizer's chat template turn by turn (``chat_segments``), each piece tokenized on its own, with
    loss on the assistant turns only. Sequences longer than `max_length` keep their start.

    Args:
        examples: Examples to tokenize.
        tokenizer: A Hugging Face tokenizer (callable on a list of strings).
        max_length: Most tokens kept per example; at least 2, since position 0 is never predicted.

    Returns:
        One TokenizedExample per example, in order.

    Raises:
        ConfigError: max_length < 2.
        DataError: An example's text is empty, or chat examples meet a tokenizer without a chat template.
        NoLossTokensError: Some examples have no predicted position (i >= 1) with a label, e.g. a
            prompt of max_length tokens or more, or a one-token text; the message lists their ids.
    """
    if max_length < 2:
        raise ConfigError(
            f"max_length must be at least 2 (position 0 is never predicted), got {max_length}"
        )
    empty = [e.id for e in examples if not e.text]
    if empty:
        raise DataError(f"examples with empty text: {_format_ids(empty)}")

    if not examples:
        return []

    chats = {i: _chat_tokens(tokenizer, e) for i, e in enumerate(examples) if e.messages is not None}
    plain = [i for i in range(len(examples)) if i not in chats]
    # The head is the prompt, or the whole text; only heads get special tokens.
    heads = [examples[i].text if examples[i].prompt is None else examples[i].prompt for i in plain]
    head_ids = dict(zip(plain, tokenizer(heads, add_special_tokens=True)["input_ids"] if heads else []))
    prompt_rows = [i for i in plain if examples[i].prompt is not None]
    responses = [examples[i].text[len(examples[i].prompt) :] for i in prompt_rows]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    tail_ids = dict(zip(prompt_rows, response_ids))

    tokenized = []
    for i, example in enumerate(examples):
        if i in chats:
            input_ids, labels = chats[i]
        elif example.prompt is None:
            input_ids, labels = list(head_ids[i]), list(head_ids[i])
        else:
            input_ids = list(head_ids[i]) + list(tail_ids[i])
            labels = [IGNORE_INDEX] * len(head_ids[i]) + list(tail_ids[i])
        tokenized.append(TokenizedExample(example.id, input_ids[:max_length], labels[:max_length]))

    no_loss = [t.id for t in tokenized if all(label == IGNORE_INDEX for label in t.labels[1:])]
    if no_loss:
        raise NoLossTokensError(
            f"examples with no loss token after truncation to max_length={max_length} (a prompt "
            f"too long, an empty response or a one-token text): {_format_ids(no_loss)}"
        )
    return tokenized


def chat_segments(tokenizer, example: Example) -> list[tuple[str, bool]]:
    """A chat example rendered with the tokenizer's chat template, cut into (text, carries loss) pieces.

    Each turn's text is what rendering one more turn appends; an assistant turn's own header (what
    ``add_generation_prompt=True`` appends) carries no loss, its content and end marker do.

    Raises:
        DataError: the tokenizer has no chat template, or the template does not render the conversation
            turn by turn (a longer conversation must extend the rendering of a shorter one).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"example {example.id!r} has 'messages', but the tokenizer has no chat template: set "
                        "tokenizer.chat_template (and save it with the model), or give 'prompt' + 'response' or "
                        "'text' instead")
    messages = [{"role": role, "content": content} for role, content in example.messages]
    segments, previous = [], ""
    for turn in range(len(messages)):
        pieces = []
        if messages[turn]["role"] == "assistant":
            pieces.append((tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
                           if turn else "", False))
        rendered = tokenizer.apply_chat_template(messages[:turn + 1], tokenize=False)
        pieces.append((rendered, messages[turn]["role"] == "assistant"))
        for text, loss in pieces:
            if not text.startswith(previous):
                raise DataError(f"example {example.id!r}: the chat template does not render turn {turn} as a "
                                "continuation of the turns before it, so the assistant tokens cannot be masked")
            if len(text) > len(previous):
                segments.append((text[len(previous):], loss))
            previous = text
    return segments


def _chat_tokens(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a chat example: each segment tokenized on its own (the template writes its
    special tokens as text), labels on the assistant segments only."""
    input_ids, labels = [], []
    for text, loss in chat_segments(tokenizer, example):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if loss else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def collate(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pads a batch on the right to its longest example.

    Args:
        batch: Tokenized examples (B of them).
        pad_token_id: Id written into padding positions of `input_ids`.

    Returns:
        `input_ids` (B, T), `attention_mask` (B, T) with 1 on tokens and 0 on padding, and `labels`
        (B, T) with IGNORE_INDEX on padding; all int64, T the longest example's length.

    Raises:
        DataError: The batch is empty.

    Example:
        >>> b = collate([TokenizedExample("a", [5, 6, 7], [-100, 6, 7]),
        ...              TokenizedExample("b", [5, 8], [5, 8])], pad_token_id=0)
        >>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()
        ([[5, 6, 7], [5, 8, 0]], [[1, 1, 1], [1, 1, 0]], [[-100, 6, 7], [5, 8, -100]])
    """
    if not batch:
        raise DataError("cannot collate an empty batch")
    length = max(len(t.input_ids) for t in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, t in enumerate(batch):
        n = len(t.input_ids)
        input_ids[row, :n] = torch.tensor(t.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(t.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iter_batches(
    tokenized: Sequence[TokenizedExample], batch_size: int, pad_token_id: int
) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
    """Yields padded batches in input order; the last one may be smaller.

    Args:
        tokenized: Tokenized examples.
        batch_size: Examples per batch, at least 1.
        pad_token_id: Id written into padding positions.

    Yields:
        The batch's example ids and its `collate` output, tensors (B, T).

    Raises:
        ConfigError: batch_size < 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(tokenized), batch_size):
        chunk = tokenized[start : start + batch_size]
        yield [t.id for t in chunk], collate(chunk, pad_token_id)


def _format_ids(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOWN_IDS])
    more = f" (+{len(ids) - _SHOWN_IDS} more)" if len(ids) > _SHOWN_IDS else ""
    return f"{shown}{more} [{len(ids)} in all]"
