"""The GPT-2 tokenizer (tiktoken) and text <-> token-id conversions."""

from __future__ import annotations

from functools import lru_cache

import tiktoken
import torch

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256  # GPT-2's <|endoftext|>, also used as the padding token


@lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (offline when TIKTOKEN_CACHE_DIR holds its files)."""
    return tiktoken.get_encoding("gpt2")


def encode(text: str, tokenizer: tiktoken.Encoding | None = None) -> list[int]:
    """Token ids of `text`; `<|endoftext|>` in the text becomes the special token."""
    return (tokenizer or get_tokenizer()).encode(text, allowed_special={EOS_TOKEN})


def decode(ids: list[int] | torch.Tensor, tokenizer: tiktoken.Encoding | None = None) -> str:
    """Text of a flat sequence of token ids."""
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    return (tokenizer or get_tokenizer()).decode(list(ids))


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding | None = None) -> torch.Tensor:
    """The chapter's helper: `text` as a (1, T) tensor of token ids (int64, also when T is 0)."""
    return torch.tensor(encode(text, tokenizer), dtype=torch.long).unsqueeze(0)


def token_ids_to_text(ids: torch.Tensor, tokenizer: tiktoken.Encoding | None = None) -> str:
    """The chapter's helper: a (1, T) or (T,) tensor of token ids back to text."""
    return decode(ids, tokenizer)
