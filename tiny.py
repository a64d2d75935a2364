"""Tiny tokenizers and models built in-process, so that tests, the benchmark and the miniature need no download.

    char_tokenizer   one token per character (and per listed word), with a Qwen-style chat template
    make_tokenizer   the printable ASCII characters; `shuffle_seed` renumbers them, `chars` drops some
    vocab_chars      n distinct characters, for a tokenizer of a given vocabulary size (bench.py)
    make_lm, make_rm a 2-layer Qwen2ForCausalLM policy and Qwen2ForSequenceClassification reward model

The tests (conftest.py), bench.py and toy_arith.py all build their models here.
"""
import random
import string

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models as token_models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PRINTABLE = list(string.printable[:95]) + ["\n"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(chars, words=(), shuffle_seed: int | None = None,
                   chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per character, plus one token per word in `words`, with a Qwen-style chat template.

    `shuffle_seed` permutes the characters' ids (same strings, other numbering): a reward model whose
    vocabulary is numbered differently from the policy's.
    """
    symbols = list(chars)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(symbols)
    vocab = {s: i for i, s in enumerate(SPECIALS + list(words) + symbols)}
    backend = Tokenizer(token_models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(SPECIALS)
    backend.add_tokens([AddedToken(w, normalized=False) for w in words])
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


def make_tokenizer(chars=PRINTABLE, shuffle_seed: int | None = None,
                   chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per printable character."""
    return char_tokenizer(chars, shuffle_seed=shuffle_seed, chat_template=chat_template)


def vocab_chars(n: int) -> list[str]:
    """n distinct characters (ASCII, CJK, Hangul, private use): an exact one-token-per-character tokenizer."""
    chars = list(PRINTABLE)
    for lo, hi in [(0x4E00, 0xA000), (0xAC00, 0xD7A4), (0xE000, 0xF900), (0xF0000, 0xFFFFE), (0x100000, 0x10FFFE)]:
        chars.extend(chr(c) for c in range(lo, min(hi, lo + n - len(chars))))
    return chars[:n]


def tiny_config(tok, hidden: int, layers: int, **extra) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra,
    )


def make_lm(tok, seed: int = 0, hidden: int = 64, layers: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(tiny_config(tok, hidden, layers)).eval()
    lm.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    lm.generation_config.pad_token_id = tok.pad_token_id
    return lm


def make_rm(tok, seed: int = 1, hidden: int = 64, layers: int = 2) -> Qwen2ForSequenceClassification:
    torch.manual_seed(seed)
    return Qwen2ForSequenceClassification(tiny_config(tok, hidden, layers, num_labels=1)).eval()
