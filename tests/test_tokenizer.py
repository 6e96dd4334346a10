"""helpers.tokenizer: GPT-2's BPE through tiktoken, and the chapter's text <-> tensor helpers."""

from __future__ import annotations

import pytest
import torch

from helpers.tokenizer import (
    EOS_ID,
    EOS_TOKEN,
    decode,
    encode,
    get_tokenizer,
    text_to_token_ids,
    token_ids_to_text,
)

TEA = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
TEA_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554,
           262, 4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13]  # fmt: skip

# Ids the book prints for these strings (chapters 2, 4 and 5).
KNOWN_IDS = {
    "Hello, world": [15496, 11, 995],
    "Hello, I am": [15496, 11, 314, 716],
    "Every effort moves you": [6109, 3626, 6100, 345],
    TEA: TEA_IDS,
}

ROUND_TRIP = [
    "",
    "Hello, world",
    "  leading and trailing spaces  ",
    "### Instruction:\nRewrite the sentence.\n\n### Response:\n",
    "Tabs\tand\r\nWindows newlines",
    "someunknownPlace and Akwirw ier",  # unknown words split into sub-word pieces
    "Ünïcödé, 日本語, emoji 🙂",
    f"answer{EOS_TOKEN}next text",
]


@pytest.mark.parametrize("text", list(KNOWN_IDS))
def test_encode_gives_gpt2_ids(text: str) -> None:
    assert encode(text) == KNOWN_IDS[text]


def test_endoftext_is_one_special_token() -> None:
    assert EOS_TOKEN == "<|endoftext|>" and EOS_ID == 50256
    assert encode(EOS_TOKEN) == [EOS_ID]
    assert encode(f"a{EOS_TOKEN}b") == [encode("a")[0], EOS_ID, encode("b")[0]]
    assert decode([EOS_ID]) == EOS_TOKEN


def test_gpt2_vocabulary() -> None:
    tokenizer = get_tokenizer()
    assert tokenizer.n_vocab == 50257  # ids 0..50256, the last one <|endoftext|>
    assert tokenizer is get_tokenizer()  # loaded once


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_inverts_encode(text: str) -> None:
    assert decode(encode(text)) == text


def test_decode_takes_lists_and_tensors() -> None:
    ids = encode("Hello, world")
    assert decode(ids) == decode(torch.tensor(ids)) == decode(torch.tensor([ids])) == "Hello, world"


def test_an_explicit_tokenizer_is_used() -> None:
    tokenizer = get_tokenizer()
    assert encode("Hello, world", tokenizer) == KNOWN_IDS["Hello, world"]
    assert decode(KNOWN_IDS["Hello, world"], tokenizer) == "Hello, world"


def test_text_to_token_ids_is_one_row_batch() -> None:
    ids = text_to_token_ids("Every effort moves you")
    assert ids.shape == (1, 4) and ids.dtype == torch.long
    assert ids.tolist() == [KNOWN_IDS["Every effort moves you"]]
    empty = text_to_token_ids("")
    assert empty.shape == (1, 0) and empty.dtype == torch.long


@pytest.mark.parametrize("shape", ["batch", "flat"])
def test_token_ids_to_text_inverts_text_to_token_ids(shape: str) -> None:
    text = "Hello, I am"
    ids = text_to_token_ids(text)
    assert token_ids_to_text(ids if shape == "batch" else ids.squeeze(0)) == text


def test_generated_ids_decode_after_the_prompt() -> None:
    # The chapter appends generated ids to the prompt's row and decodes the whole row.
    prompt = text_to_token_ids("Hello, I am")
    generated = torch.cat([prompt, torch.tensor([[EOS_ID]])], dim=1)
    assert token_ids_to_text(generated) == "Hello, I am" + EOS_TOKEN
