"""The word-level tokenizer: splitting, special tokens, determinism and an offline round trip."""

from transformers import AutoTokenizer

from lorif_ray.embedded.tokenizer import build_tokenizer

TEXTS = ["The capital of Zorvia is kelm.", "zorvia has its capital in kelm ."]


def test_words_punctuation_and_specials():
    tok = build_tokenizer(TEXTS)
    assert tok.convert_ids_to_tokens(tok("ZORVIA is kelm, zorvia!")["input_ids"]) == [
        "<bos>", "zorvia", "is", "kelm", "<unk>", "zorvia", "<unk>",
    ]
    assert tok("kelm", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("kelm")]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)


def test_vocab_does_not_depend_on_text_order():
    assert build_tokenizer(TEXTS).get_vocab() == build_tokenizer(TEXTS[::-1]).get_vocab()


def test_save_and_load_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tokenizer(TEXTS)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab()
    for text in [*TEXTS, "unknown words here"]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        plain = loaded(text, add_special_tokens=False)["input_ids"]
        assert plain == tok(text, add_special_tokens=False)["input_ids"]
    assert (loaded.pad_token, loaded.unk_token, loaded.bos_token, loaded.eos_token) == (
        "<pad>", "<unk>", "<bos>", "<eos>",
    )
