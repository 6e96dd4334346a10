"""Chapter-faithful mode (off by default): the chapter's printed numbers, reproduced exactly.

The untied output head and its parameter counts (chapter 4's numbers), the chapter's loader
order (section 7.4's batch shapes), its header-less inference prompt and its answer
extraction (section 7.7), and the $COURSE_CHAPTER_COMPAT switch.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.batching import InstructionDataset, make_loaders, padding_share
from helpers.config import GPTConfig, get_config
from helpers.data import split_data
from helpers.generate import GenerationSettings, generate, generate_responses
from helpers.model import (
    GPTModel,
    count_config_parameters,
    count_parameters,
    model_memory_bytes,
    parameter_counts,
)
from helpers.prompts import (
    CHAPTER_COMPAT_ENV,
    chapter_compat_from_env,
    describe_chapter_compat,
    extract_response,
    format_example,
    format_input,
    format_prompt,
)
from helpers.tokenizer import EOS_ID, decode, encode

# Section 7.4 prints the shape of every train batch after torch.manual_seed(123); the first 20.
CHAPTER_TRAIN_WIDTHS = [61, 76, 73, 68, 65, 72, 80, 67, 62, 75, 62, 68, 67, 77, 69, 79, 71, 66, 83, 68]  # fmt: skip
ENTRY = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is fast.", "output": "The car is as fast as lightning."}  # fmt: skip


# --- GPTConfig.tie_embeddings ------------------------------------------------------------------


def test_tie_embeddings_is_validated_and_round_trips() -> None:
    assert GPTConfig().tie_embeddings is True  # off by default: GPT-2's tied head
    with pytest.raises(ValueError, match="tie_embeddings must be True or False"):
        GPTConfig(tie_embeddings=1)  # type: ignore[arg-type]
    cfg = get_config("tiny", tie_embeddings=False)
    assert cfg.to_dict()["tie_embeddings"] is False
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k != "tie_embeddings"}  # saved before
    assert GPTConfig.from_dict(old).tie_embeddings is True
    with pytest.raises(ValueError, match="unknown field 'tied'"):
        GPTConfig.from_dict(cfg.to_dict() | {"tied": False})
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig.from_dict(cfg.to_dict() | {"n_heads": 0})


# --- the untied output head and the parameter counts -------------------------------------------


def test_parameter_counts_tied_and_untied() -> None:
    small = get_config("gpt2-small")
    assert parameter_counts(small) == (124_439_808, 163_037_184)  # OpenAI's GPT-2, qkv_bias
    assert parameter_counts(small).untied - parameter_counts(small).tied == 50257 * 768
    # Chapter 4 (GPT_CONFIG_124M, qkv_bias=False) prints "Total number of parameters:
    # 163,009,536" and "... considering weight tying: 124,412,160".
    book = get_config("gpt2-small", qkv_bias=False)
    assert parameter_counts(book) == (124_412_160, 163_009_536)
    untied = dataclasses.replace(book, tie_embeddings=False)
    assert count_config_parameters(untied) == 163_009_536
    # ... and "Total size of the model: 621.83 MB" (float32), on the meta device.
    with torch.device("meta"):
        model = GPTModel(untied)
    assert f"{model_memory_bytes(model) / (1024 * 1024):.2f} MB" == "621.83 MB"
    # The chapter's own arithmetic: total minus the output head.
    assert count_parameters(model) - model.lm_head.weight.numel() == 124_412_160


def test_untied_model_has_its_own_head(tiny_config: GPTConfig) -> None:
    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(tiny_config, tie_embeddings=False))
    assert not model.tied and model.lm_head.weight is not model.wte.weight
    assert "lm_head.weight" in dict(model.named_parameters())
    assert count_parameters(model) == parameter_counts(tiny_config).untied
    assert count_parameters(GPTModel(tiny_config)) == parameter_counts(tiny_config).tied


def test_untie_output_head_copies_wte_then_trains_separately(tiny_config: GPTConfig) -> None:
    torch.manual_seed(0)
    model = GPTModel(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 7))
    before = model(ids).detach()
    assert model.untie_output_head() is model
    assert not model.tied and model.cfg.tie_embeddings is False
    # As the book loads OpenAI's weights: equal values, a separate parameter.
    assert torch.equal(model.lm_head.weight, model.wte.weight)
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()
    torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
    model.untie_output_head()  # a second call changes nothing
    assert torch.equal(model.lm_head.weight, model.wte.weight)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.wte.weight.grad is not None
    # The head's gradient is the output side only: it is not the embedding's.
    assert not torch.equal(model.lm_head.weight.grad, model.wte.weight.grad)
    optimizer.step()
    assert not torch.equal(model.lm_head.weight, model.wte.weight)


def test_untied_model_saves_and_loads_untied(tiny_config: GPTConfig, tmp_path: Path) -> None:
    from helpers.weights import load_model, save_model

    torch.manual_seed(0)
    model = GPTModel(tiny_config).untie_output_head()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    loaded = load_model(save_model(model, tmp_path / "untied.safetensors"))
    assert loaded.cfg.tie_embeddings is False and not loaded.tied
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.wte.weight, model.wte.weight)


# --- the chapter's loaders -----------------------------------------------------------------------


def chapter_train_loader(
    train_data: list[dict[str, str]],
) -> torch.utils.data.DataLoader[Any]:
    """Section 7.4's train loader (its InstructionDataset: the full text tokenized at once)."""
    from helpers.batching import collate_fn

    texts = [format_input(e) + f"\n\n### Response:\n{e['output']}" for e in train_data]
    encoded = [encode(t) for t in texts]
    return torch.utils.data.DataLoader(
        encoded,  # type: ignore[arg-type]
        batch_size=8,
        collate_fn=functools.partial(collate_fn, device="cpu", allowed_max_length=1024),
        shuffle=True,
        drop_last=True,
        num_workers=0,
    )


def test_chapter_split_and_token_ids(chapter_data: list[dict[str, str]]) -> None:
    splits = split_data(chapter_data)
    # The chapter: train = data[:935], test = data[935:1045], val = data[1045:].
    assert splits.train == chapter_data[:935]
    assert splits.test == chapter_data[935:1045]
    assert splits.validation == chapter_data[1045:]
    dataset = InstructionDataset(chapter_data)
    for entry, example in zip(chapter_data, dataset.examples, strict=True):
        full_text = format_input(entry) + f"\n\n### Response:\n{entry['output']}"
        assert example.ids == encode(full_text)


def test_chapter_loader_order(chapter_data: list[dict[str, str]]) -> None:
    torch.manual_seed(123)  # the chapter seeds right before building its loaders
    loaders = make_loaders(split_data(chapter_data), chapter_compat=True)
    assert (len(loaders.train), len(loaders.validation), len(loaders.test)) == (116, 7, 14)
    share = padding_share(loaders.train)  # must leave the global random state alone
    assert 0.0 < share < 1.0
    widths = []
    for inputs, targets in loaders.train:
        assert inputs.shape == targets.shape and inputs.shape[0] == 8
        widths.append(inputs.shape[1])
    assert widths[:6] == [61, 76, 73, 68, 65, 72]
    assert widths[:20] == CHAPTER_TRAIN_WIDTHS
    # Validation and test: not shuffled, the last (short) batch kept.
    assert [x.shape[0] for x, _ in loaders.validation] == [8] * 6 + [7]
    assert [x.shape[0] for x, _ in loaders.test] == [8] * 13 + [6]
    first_test = encode(format_example(chapter_data[935]))
    assert next(iter(loaders.test))[0][0, : len(first_test)].tolist() == first_test


def test_chapter_loader_equals_the_chapters_tensors(chapter_data: list[dict[str, str]]) -> None:
    splits = split_data(chapter_data)
    torch.manual_seed(123)
    reference = [(x, y) for x, y in chapter_train_loader(splits.train)]
    torch.manual_seed(123)
    ours = [(x, y) for x, y in make_loaders(splits, chapter_compat=True).train]
    assert len(ours) == len(reference) == 116
    for (x, y), (rx, ry) in zip(ours, reference, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # Each epoch draws a new order from the global state, as the chapter's loader does.
    torch.manual_seed(123)
    loader = make_loaders(splits, chapter_compat=True).train
    first, second = ([x.shape[1] for x, _ in loader] for _ in range(2))
    assert first == [x.shape[1] for x, _ in reference] and second != first


def test_default_loaders_are_unchanged_by_the_global_seed(
    chapter_data: list[dict[str, str]],
) -> None:
    splits = split_data(chapter_data[:200])
    torch.manual_seed(1)
    a = [x.shape[1] for x, _ in make_loaders(splits).train]
    torch.manual_seed(2)
    b = [x.shape[1] for x, _ in make_loaders(splits).train]
    assert a == b  # their own seeded generators: the global state plays no part
    with pytest.raises(ValueError, match="grouped=False"):
        make_loaders(splits, chapter_compat=True, grouped=True)


# --- the chapter's inference prompt and extraction -------------------------------------------


@pytest.mark.parametrize("entry", [ENTRY, {**ENTRY, "input": ""}])
def test_chapter_prompt_ends_before_the_response_header(entry: Any) -> None:
    prompt = format_prompt(entry, chapter_compat=True)
    assert prompt == format_input(entry)
    assert "### Response:" not in prompt
    assert format_prompt(entry) == prompt + "\n\n### Response:\n"  # the default is unchanged
    # Token level: the chapter prompt's ids start the training ids; the header's ids follow.
    ids, full = encode(prompt), encode(format_example(entry))
    assert full[: len(ids)] == ids
    assert decode(full[len(ids) : len(encode(format_prompt(entry)))]) == "\n\n### Response:\n"


def test_chapter_prompt_is_a_token_prefix_on_chapter_data(
    chapter_data: list[dict[str, str]],
) -> None:
    dataset = InstructionDataset(chapter_data)
    for entry, example in zip(chapter_data, dataset.examples, strict=True):
        ids = encode(format_prompt(entry, chapter_compat=True))
        assert example.ids[: len(ids)] == ids


def test_chapter_extraction_rule() -> None:
    prompt = format_input(ENTRY)
    text = prompt + "\n\n### Response:\nThe car is as fast as lightning.\n\n### Instruction:\nMore"
    # The chapter: generated_text[len(input_text):].replace("### Response:", "").strip()
    chapter = text[len(prompt) :].replace("### Response:", "").strip()
    assert extract_response(text, prompt=prompt, chapter_compat=True) == chapter
    assert chapter.endswith("### Instruction:\nMore")  # the chapter keeps an invented turn
    assert extract_response(text, prompt=prompt) == "The car is as fast as lightning."
    new_only = "\n\n### Response:\nYes.\n### Response: again"
    assert extract_response(new_only, chapter_compat=True) == "Yes.\n again"
    phi3 = "\n<|assistant|>:\nYes."
    assert extract_response(phi3, "phi3", chapter_compat=True) == "Yes."


@pytest.fixture(scope="module")
def tiny_model() -> GPTModel:
    cfg = get_config("tiny", context_length=128, emb_dim=32, n_heads=2, n_layers=2)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # large weights: greedy outputs vary instead of repeating
        for p in model.parameters():
            p.mul_(20.0)
    return model


def test_generate_responses_chapter_mode_equals_the_chapters_loop(
    tiny_model: GPTModel, chapter_data: list[dict[str, str]]
) -> None:
    entries = chapter_data[935:940]
    chapter = GenerationSettings(max_new_tokens=12, batch_size=1, chapter_compat=True)
    ours = generate_responses(tiny_model, entries, chapter, progress=False)
    for entry, answer in zip(entries, ours, strict=True):
        # Section 7.7, token for token.
        input_text = format_input(entry)
        token_ids = generate(
            tiny_model,
            torch.tensor([encode(input_text)]),
            max_new_tokens=12,
            context_size=tiny_model.cfg.context_length,
            eos_id=EOS_ID,
        )
        generated_text = decode(token_ids[0])
        assert answer == generated_text[len(input_text) :].replace("### Response:", "").strip()
    # Batched (left-padded) prompts give the same answers; the default prompt differs.
    batched = generate_responses(
        tiny_model, entries, dataclasses.replace(chapter, batch_size=8), progress=False
    )
    assert batched == ours
    default = generate_responses(
        tiny_model, entries, GenerationSettings(max_new_tokens=12), progress=False
    )
    assert default != ours


# --- the switch --------------------------------------------------------------------------------


def test_switch_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHAPTER_COMPAT_ENV, raising=False)
    assert chapter_compat_from_env() is False
    assert chapter_compat_from_env(default=True) is True
    for value, expected in [("1", True), ("on", True), ("TRUE", True), ("0", False), ("", False)]:
        monkeypatch.setenv(CHAPTER_COMPAT_ENV, value)
        assert chapter_compat_from_env() is expected
    monkeypatch.setenv(CHAPTER_COMPAT_ENV, "maybe")
    with pytest.raises(ValueError, match="COURSE_CHAPTER_COMPAT must be 1 or 0.*'maybe'"):
        chapter_compat_from_env()
    assert describe_chapter_compat(False) == "chapter-faithful mode: off"
    assert describe_chapter_compat(True).startswith("chapter-faithful mode: on")
