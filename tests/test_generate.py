"""Generation: cache vs no cache, batched vs one by one, vs transformers, eos, sampling, cutting."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.generate import (
    MIN_SAMPLING_TEMPERATURE,
    GenerationSettings,
    block_repeated_ngrams,
    generate,
    generate_batch,
    generate_responses,
    generate_steps,
    generate_stream,
    generate_test_responses,
    is_greedy,
    sample_next_token,
)
from helpers.model import GPTModel
from helpers.prompts import extract_response, format_prompt
from helpers.review.responses import load_responses
from helpers.tokenizer import decode, encode

LENGTHS = (5, 17, 9, 30, 1, 12)


@pytest.fixture(scope="module")
def model() -> GPTModel:
    """A tiny random model with large weights, so greedy outputs vary instead of repeating."""
    from helpers.config import get_config

    cfg = get_config("tiny", context_length=128, emb_dim=32, n_heads=2, n_layers=2)
    torch.manual_seed(0)
    m = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return m


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50000, (n,), generator=g).tolist() for n in LENGTHS]


def naive_greedy(model: GPTModel, prompt: list[int], n: int) -> list[int]:
    """The chapter's loop: recompute everything, take the argmax of the last position."""
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
    return idx[0, len(prompt) :].tolist()


def test_greedy_identical_cached_uncached_batched_single(
    model: GPTModel, prompts: list[list[int]]
) -> None:
    reference = [naive_greedy(model, p, 20) for p in prompts]
    assert len({tuple(r) for r in reference}) == len(prompts)  # outputs really differ
    for use_cache in (True, False):
        single = [
            generate_batch(
                model, [p], GenerationSettings(max_new_tokens=20, eos_id=None, use_cache=use_cache)
            )[0]
            for p in prompts
        ]
        batched = generate_batch(
            model, prompts, GenerationSettings(max_new_tokens=20, eos_id=None, use_cache=use_cache)
        )
        assert single == reference, use_cache
        assert batched == reference, use_cache


def test_greedy_identical_to_transformers(tmp_path: Path, prompts: list[list[int]]) -> None:
    transformers = pytest.importorskip("transformers")
    from helpers.weights import load_hf_gpt2

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.3
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    model = load_hf_gpt2(tmp_path)
    for p in prompts:
        ids = torch.tensor([p])
        expected = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=50256,
        )
        assert torch.equal(generate(model, ids, 20), expected)
    expected_rows = [
        hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, pad_token_id=50256)[
            0, len(p) :
        ].tolist()
        for p in prompts
    ]
    assert (
        generate_batch(model, prompts, GenerationSettings(max_new_tokens=20, eos_id=None))
        == expected_rows
    )


def test_generate_is_chapter_compatible(model: GPTModel, prompts: list[list[int]]) -> None:
    idx = torch.tensor([prompts[1]])
    out = generate(model, idx, max_new_tokens=10, context_size=128)
    assert out.shape == (1, len(prompts[1]) + 10)
    assert torch.equal(out[:, : idx.shape[1]], idx)
    assert out[0, idx.shape[1] :].tolist() == naive_greedy(model, prompts[1], 10)


def test_eos_stops_each_row_and_is_excluded(model: GPTModel, prompts: list[list[int]]) -> None:
    free = generate_batch(model, prompts, GenerationSettings(max_new_tokens=12, eos_id=None))
    eos = free[2][4]  # row 2 produces this token at step 5
    stopped = generate_batch(model, prompts, GenerationSettings(max_new_tokens=12, eos_id=eos))
    for row, (full, cut) in enumerate(zip(free, stopped, strict=True)):
        expected = full[: full.index(eos)] if eos in full else full
        assert cut == expected, row
        assert (
            cut
            == generate_batch(
                model, [prompts[row]], GenerationSettings(max_new_tokens=12, eos_id=eos)
            )[0]
        )
    assert len(stopped[2]) == 4
    # The chapter's generate: stops without appending eos (batch of one).
    out = generate(model, torch.tensor([prompts[2]]), 12, eos_id=eos)
    assert out[0, len(prompts[2]) :].tolist() == free[2][:4]


def test_long_prompt_is_cut_from_the_left_with_warning(model: GPTModel) -> None:
    long_prompt = list(range(1000, 1150))  # 150 tokens > context 128
    with pytest.warns(UserWarning, match="keeping its last 118"):
        got = generate_batch(
            model, [long_prompt], GenerationSettings(max_new_tokens=10, eos_id=None)
        )
    assert got[0] == naive_greedy(model, long_prompt[-118:], 10)
    with pytest.warns(UserWarning, match="keeping its last 118"):
        out = generate(model, torch.tensor([long_prompt]), 10)
    assert out.shape == (1, 160)  # the caller's full prompt is returned, then the new tokens
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch(model, [[1, 2]], GenerationSettings(max_new_tokens=128))


def test_sampling_is_seeded_and_top_k_restricts(model: GPTModel, prompts: list[list[int]]) -> None:
    a = generate_batch(
        model,
        prompts,
        GenerationSettings(max_new_tokens=15, temperature=1.0, top_k=50, seed=5, eos_id=None),
    )
    b = generate_batch(
        model,
        prompts,
        GenerationSettings(max_new_tokens=15, temperature=1.0, top_k=50, seed=5, eos_id=None),
    )
    c = generate_batch(
        model,
        prompts,
        GenerationSettings(max_new_tokens=15, temperature=1.0, top_k=50, seed=6, eos_id=None),
    )
    assert a == b and a != c
    # top_k=1 leaves only the argmax, whatever the temperature.
    assert generate_batch(
        model,
        prompts,
        GenerationSettings(max_new_tokens=15, temperature=2.0, top_k=1, seed=1, eos_id=None),
    ) == (generate_batch(model, prompts, GenerationSettings(max_new_tokens=15, eos_id=None)))
    # Every sampled first token is one of the 3 best.
    with torch.no_grad():
        top3 = model(torch.tensor([prompts[0]]))[0, -1].topk(3).indices.tolist()
    firsts = {
        generate_batch(
            model,
            [prompts[0]],
            GenerationSettings(max_new_tokens=1, temperature=5.0, top_k=3, seed=s),
        )[0][0]
        for s in range(20)
    }
    assert firsts <= set(top3) and len(firsts) > 1


def test_generate_restores_training_mode(model: GPTModel, prompts: list[list[int]]) -> None:
    model.train()
    try:
        generate_batch(model, prompts[:1], GenerationSettings(max_new_tokens=3))
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_generate_responses_batched_equals_one_by_one(
    model: GPTModel, chapter_data: list[dict[str, str]], style: str
) -> None:
    entries = chapter_data[:7]
    prompts = [encode(format_prompt(e, style)) for e in entries]
    assert len({len(p) for p in prompts}) >= 5  # batches really mix prompt lengths
    settings = GenerationSettings(max_new_tokens=8, style=style, batch_size=3)
    got = generate_responses(model, entries, settings, progress=False)
    single = [generate_batch(model, [p], GenerationSettings(max_new_tokens=8))[0] for p in prompts]
    # In the entries' order, and the same tokens as generating each prompt on its own.
    assert got == [extract_response(decode(t), style) for t in single]
    assert len({tuple(t) for t in single}) > 1 and any(got)


def test_generate_test_responses_records_settings(model: GPTModel, tmp_path: Path) -> None:
    entries = [
        {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
        {"instruction": "Add.", "input": "2 + 3", "output": "5"},
    ]
    settings = GenerationSettings(max_new_tokens=5, style="phi3")
    rs = generate_test_responses(
        model,
        entries,
        tmp_path / "out.json",
        settings,
        model_name="tiny",
        checkpoint="none",
        progress=False,
    )
    # Same code path as generate_responses: identical answers.
    expected = generate_responses(model, entries, settings, progress=False)
    assert [e["model_response"] for e in rs.entries] == expected
    loaded = load_responses(tmp_path / "out.json")
    assert loaded.entries == rs.entries
    meta = loaded.metadata
    assert (
        meta["model"] == "tiny" and meta["prompt_style"] == "phi3" and meta["checkpoint"] == "none"
    )
    assert meta["generation"] == {
        "max_new_tokens": 5,
        "temperature": 0.0,
        "top_k": None,
        "seed": None,
        "batch_size": 8,
        "decoding": "greedy",
        "chapter_compat": False,
    }


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-8, MIN_SAMPLING_TEMPERATURE / 2])
def test_tiny_temperatures_are_greedy_not_nan(
    model: GPTModel, prompts: list[list[int]], temperature: Any
) -> None:
    # softmax(logits / 1e-300) overflows float32 to NaN: such temperatures decode greedily.
    assert is_greedy(temperature)
    logits = torch.tensor([[3.0, 1.0, -2.0, 2.9], [-1.0, 0.5, 0.4, float("-inf")]])
    assert sample_next_token(logits, temperature).tolist() == [0, 1]
    greedy = generate_batch(model, prompts, GenerationSettings(max_new_tokens=6, eos_id=None))
    assert (
        generate_batch(
            model,
            prompts,
            GenerationSettings(max_new_tokens=6, temperature=temperature, seed=3, eos_id=None),
        )
        == greedy
    )


def test_small_sampling_temperature_gives_finite_probabilities() -> None:
    # Just above the threshold logits / T reach ~1e8, fine once the maximum is shifted to 0.
    assert not is_greedy(MIN_SAMPLING_TEMPERATURE)
    logits = torch.tensor([[1000.0, 999.0, -1000.0], [5.0, 5.0, float("-inf")]])
    g = torch.Generator().manual_seed(0)
    draws = [sample_next_token(logits, MIN_SAMPLING_TEMPERATURE, generator=g) for _ in range(20)]
    assert all(d[0] == 0 for d in draws)  # the best token by far
    assert {int(d[1]) for d in draws} == {0, 1}  # a tie: both are drawn, never the -inf one


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", -1),
        ("max_new_tokens", 2.0),
        ("max_new_tokens", True),
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "1"),
        ("top_k", 0),
        ("top_k", 2.5),
        ("seed", 1.5),
        ("eos_id", -1),
        ("use_cache", 1),
        ("no_repeat_ngram", 0),
        ("no_repeat_ngram", 2.0),
        ("chapter_compat", "yes"),
        ("batch_size", 0),
        ("style", "chatml"),
    ],
)
def test_settings_refuse_bad_values_naming_the_field(field: str, value: Any) -> None:
    match = "prompt style" if field == "style" else f"GenerationSettings.{field} must be"
    with pytest.raises(ValueError, match=match):
        GenerationSettings(**{field: value})


def test_settings_are_frozen_and_replace_checks_again() -> None:
    settings = GenerationSettings(max_new_tokens=5, temperature=0.7, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.temperature = 1.0  # type: ignore[misc]
    assert settings.decoding == "sampling" and GenerationSettings().decoding == "greedy"
    assert dataclasses.replace(settings, seed=2).seed == 2
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(settings, top_k=-3)


def test_top_k_beyond_the_vocabulary_is_refused(model: GPTModel, prompts: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="top_k must be None or an integer from 1 to"):
        generate_batch(model, prompts, GenerationSettings(max_new_tokens=2, top_k=10**6))


@pytest.mark.parametrize(
    "settings",
    [
        GenerationSettings(max_new_tokens=12, eos_id=None),
        GenerationSettings(max_new_tokens=12, temperature=1.3, top_k=40, seed=9, eos_id=None),
        GenerationSettings(max_new_tokens=12, use_cache=False),
    ],
)
def test_stream_yields_the_batch_tokens_one_by_one(
    model: GPTModel, prompts: list[list[int]], settings: Any
) -> None:
    for p in prompts:
        assert list(generate_stream(model, p, settings)) == generate_batch(model, [p], settings)[0]


def test_stream_stops_at_eos(model: GPTModel, prompts: list[list[int]]) -> None:
    free = generate_batch(model, [prompts[2]], GenerationSettings(max_new_tokens=12, eos_id=None))
    eos = free[0][4]
    stopped = list(generate_stream(model, prompts[2], GenerationSettings(12, eos_id=eos)))
    assert stopped == free[0][: free[0].index(eos)]


def test_steps_hold_the_prompts_still_going(model: GPTModel, prompts: list[list[int]]) -> None:
    free = generate_batch(model, prompts, GenerationSettings(max_new_tokens=12, eos_id=None))
    eos = free[2][4]
    expected = [row[: row.index(eos)] if eos in row else row for row in free]
    steps = list(generate_steps(model, prompts, GenerationSettings(max_new_tokens=12, eos_id=eos)))
    assert len(steps) == max(len(row) for row in expected)
    for i, step in enumerate(steps):
        # Step i: the i-th token of every prompt that has not stopped, in the prompts' order.
        assert step == [(row, toks[i]) for row, toks in enumerate(expected) if len(toks) > i]


def test_closing_a_stream_early_restores_the_mode(
    model: GPTModel, prompts: list[list[int]]
) -> None:
    model.train()
    try:
        stream = generate_stream(model, prompts[0], GenerationSettings(max_new_tokens=20))
        assert model.training  # nothing runs before the first token is asked for
        first = [next(stream), next(stream)]
        assert not model.training  # generating: eval mode (no dropout)
        stream.close()
        assert model.training
        assert first == generate_batch(model, [prompts[0]], GenerationSettings(2))[0]
    finally:
        model.eval()


def test_stream_checks_its_prompt_at_once(model: GPTModel) -> None:
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate_stream(model, [], GenerationSettings(max_new_tokens=3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_stream(model, [1, 2], GenerationSettings(max_new_tokens=128))
    assert generate_batch(model, [], GenerationSettings(max_new_tokens=3)) == []


def _ngram_blocked_reference(logits: torch.Tensor, rows: list[list[int]], n: int) -> torch.Tensor:
    """Brute force: ban each token that followed the row's last n - 1 tokens before."""
    out = logits.clone()
    for r, toks in enumerate(rows):
        if len(toks) < n:
            continue
        last = toks[len(toks) - n + 1 :]
        for i in range(len(toks) - n + 1):
            if toks[i : i + n - 1] == last:
                out[r, toks[i + n - 1]] = float("-inf")
    return out


def test_block_repeated_ngrams_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # few distinct tokens, so repeats are common
        n = int(torch.randint(1, 5, (), generator=g))
        generated = torch.randint(
            0, 3, (3, int(torch.randint(0, 12, (), generator=g))), generator=g
        )
        logits = torch.randn(3, 6, generator=g)
        expected = _ngram_blocked_reference(logits, generated.tolist(), n)
        assert torch.equal(block_repeated_ngrams(logits, generated, n), expected)
    # "a b c a b" -> "c" would repeat "a b c"; with n=2 "b" -> "c" was seen: c is banned too.
    row = torch.tensor([[0, 1, 2, 0, 1]])
    assert block_repeated_ngrams(torch.zeros(1, 4), row, 3).isinf().tolist() == [
        [False, False, True, False]
    ]


def test_no_repeat_ngram_decoding(
    model: GPTModel, prompts: list[list[int]], tmp_path: Path
) -> None:
    greedy = GenerationSettings(max_new_tokens=40, eos_id=None)
    blocked = dataclasses.replace(greedy, no_repeat_ngram=2)

    def repeats(tokens: list[int]) -> bool:
        pairs = list(zip(tokens[:-1], tokens[1:], strict=True))
        return len(pairs) != len(set(pairs))

    plain = generate_batch(model, prompts, greedy)
    assert any(repeats(t) for t in plain)  # greedy decoding of a random model loops...
    new = generate_batch(model, prompts, blocked)
    assert not any(repeats(t) for t in new)  # ...and never repeats a pair with the block
    assert all(len(t) == 40 for t in new)
    # Cached and uncached, batched and one by one: the same tokens.
    assert generate_batch(model, prompts, dataclasses.replace(blocked, use_cache=False)) == new
    assert [generate_batch(model, [p], blocked)[0] for p in prompts] == new
    entries = [{"instruction": "Name a color.", "input": "", "output": "Red."}]
    generate_test_responses(model, entries, tmp_path / "r.json", blocked, model_name="x")
    assert load_responses(tmp_path / "r.json").metadata["generation"]["no_repeat_ngram"] == 2
    assert "no_repeat_ngram" not in greedy.metadata()  # off: recorded as before
