"""Tiny models built in-process for the tests: nothing is downloaded.

A character-level tokenizer with a Qwen-style chat template, a 2-layer `Qwen2ForCausalLM` policy and a
2-layer `Qwen2ForSequenceClassification` reward model over the same characters. `make_tokenizer` can
also shuffle the token ids or drop characters, to build a reward model whose vocabulary differs from
the policy's.
"""
import string

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from toy_arith import CHAT_TEMPLATE, char_tokenizer

CHARS = list(string.printable[:95]) + ["\n"]


def make_tokenizer(chars=CHARS, shuffle_seed=None, chat_template=CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per character. `shuffle_seed` permutes the ids (same strings, other numbering)."""
    return char_tokenizer(chars, shuffle_seed=shuffle_seed, chat_template=chat_template)


def _config(tok, hidden: int, layers: int, **extra) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra,
    )


def make_lm(tok, seed: int = 0, hidden: int = 64, layers: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(_config(tok, hidden, layers)).eval()
    lm.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    lm.generation_config.pad_token_id = tok.pad_token_id
    return lm


def make_rm(tok, seed: int = 1, hidden: int = 64, layers: int = 2) -> Qwen2ForSequenceClassification:
    torch.manual_seed(seed)
    return Qwen2ForSequenceClassification(_config(tok, hidden, layers, num_labels=1)).eval()


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="session")
def lm(tok):
    return make_lm(tok)


@pytest.fixture(scope="session")
def rm(tok):
    return make_rm(tok)
