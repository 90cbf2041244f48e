"""Shared fixtures: tiny models built in code (no hub), in float64 for the math tests."""

from __future__ import annotations

import pytest
import torch


def tiny_gpt2(vocab_size: int = 61, seed: int = 0, dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_llama(vocab_size: int = 61, seed: int = 0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]()
