"""GPTModel: shapes, GPT-2 layout, weight tying, masks, position ids and the KV cache."""

from __future__ import annotations

import pytest
import torch

from helpers.config import MODEL_PRESETS, GPTConfig, get_config
from helpers.model import (
    CausalSelfAttention,
    GPTModel,
    count_config_parameters,
    count_parameters,
    make_position_ids,
    model_memory_bytes,
)


@pytest.fixture()
def model(tiny_config: GPTConfig) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config).eval()


def test_forward_shape_and_plain_call(model: GPTModel, tiny_config: GPTConfig) -> None:
    ids = torch.randint(0, tiny_config.vocab_size, (3, 11))
    logits = model(ids)
    assert logits.shape == (3, 11, tiny_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert model.cfg == tiny_config


def test_gpt2_module_names_and_tied_head(model: GPTModel, tiny_config: GPTConfig) -> None:
    names = set(model.state_dict())
    d = tiny_config.emb_dim
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["wte.weight"] == (tiny_config.vocab_size, d)
    assert shapes["wpe.weight"] == (tiny_config.context_length, d)
    assert shapes["h.0.attn.c_attn.weight"] == (3 * d, d)
    assert shapes["h.0.attn.c_attn.bias"] == (3 * d,)
    assert shapes["h.1.mlp.c_fc.weight"] == (4 * d, d)
    assert shapes["h.1.mlp.c_proj.weight"] == (d, 4 * d)
    assert {"ln_f.weight", "ln_f.bias", "h.1.ln_2.weight", "lm_head.weight"} <= names
    assert model.lm_head.weight is model.wte.weight
    assert model.get_submodule("h.0.ln_1").eps == 1e-5


def test_chapter_dict_config_is_accepted(tiny_config: GPTConfig) -> None:
    model = GPTModel(tiny_config.to_dict())
    assert model.cfg == tiny_config


def test_parameter_counts_match_gpt2() -> None:
    # OpenAI's GPT-2 with the tied head; the chapter's untied copy adds vocab * emb_dim.
    assert count_config_parameters(MODEL_PRESETS["gpt2-small (124M)"]) == 124_439_808
    assert count_config_parameters(MODEL_PRESETS["gpt2-medium (355M)"]) == 354_823_168
    small = MODEL_PRESETS["gpt2-small (124M)"]
    untied = 124_439_808 + small.vocab_size * small.emb_dim
    assert untied == 163_037_184


def test_count_and_memory_on_real_model(model: GPTModel) -> None:
    n = count_parameters(model)
    assert n == sum(p.numel() for p in set(model.parameters()))
    assert n == count_config_parameters(model.cfg)
    assert model_memory_bytes(model) == 4 * n  # float32, no buffers
    assert model_memory_bytes(model.to(torch.bfloat16)) == 2 * n


def test_causality(model: GPTModel, tiny_config: GPTConfig) -> None:
    ids = torch.randint(0, tiny_config.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % tiny_config.vocab_size
    torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])


def test_full_attention_mask_equals_no_mask(model: GPTModel, tiny_config: GPTConfig) -> None:
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    torch.testing.assert_close(
        model(ids, attention_mask=torch.ones(2, 9, dtype=torch.long)), model(ids), atol=1e-5, rtol=0
    )


def test_left_padding_gives_unpadded_logits(model: GPTModel, tiny_config: GPTConfig) -> None:
    ids = torch.randint(0, tiny_config.vocab_size, (1, 7))
    padded = torch.cat([torch.full((1, 3), 50256), ids], dim=1)  # (1, 10)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    out = model(padded, attention_mask=mask)
    assert torch.isfinite(out).all()  # padding queries must not produce NaN
    torch.testing.assert_close(out[:, 3:], model(ids), atol=1e-5, rtol=0)


def test_kv_cache_matches_full_forward(model: GPTModel, tiny_config: GPTConfig) -> None:
    ids = torch.randint(0, tiny_config.vocab_size, (2, 10))
    full = model(ids)
    cache = model.new_kv_cache(2)
    parts = [model(ids[:, :4], kv_cache=cache)]  # prefill 4 positions
    parts.append(model(ids[:, 4:7], kv_cache=cache))  # 3 more at once (explicit causal mask)
    parts += [model(ids[:, i : i + 1], kv_cache=cache) for i in range(7, 10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_position_ids_count_real_tokens_only() -> None:
    cpu = torch.device("cpu")
    assert make_position_ids(None, 3, 0, cpu).tolist() == [[0, 1, 2]]
    assert make_position_ids(None, 1, 5, cpu).tolist() == [[5]]  # after 5 cached positions
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert make_position_ids(mask, 5, 0, cpu).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert make_position_ids(mask, 2, 3, cpu).tolist() == [[1, 2], [3, 4]]  # the last 2


def test_kv_cache_with_left_padding_needs_no_position_ids(
    model: GPTModel, tiny_config: GPTConfig
) -> None:
    # Batched generation's pattern: left-padded prefill, then one token per step with a
    # growing mask; the model derives every position itself, matching unpadded runs.
    short = torch.randint(0, tiny_config.vocab_size, (1, 6))
    long = torch.randint(0, tiny_config.vocab_size, (1, 9))
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
    cache = model.new_kv_cache(2)
    prefill = model(ids[:, :7], attention_mask=mask[:, :7], kv_cache=cache)
    steps = [
        model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], kv_cache=cache) for i in (7, 8)
    ]
    out = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(out[:1, 3:], model(short), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:], model(long), atol=1e-5, rtol=0)


def test_last_only_returns_final_position(model: GPTModel, tiny_config: GPTConfig) -> None:
    ids = torch.randint(0, tiny_config.vocab_size, (2, 6))
    last = model(ids, last_only=True)
    assert last.shape == (2, 1, tiny_config.vocab_size)
    torch.testing.assert_close(last, model(ids)[:, -1:])


def test_too_long_input_is_an_error(model: GPTModel, tiny_config: GPTConfig) -> None:
    ids = torch.zeros(1, tiny_config.context_length + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="context length"):
        model(ids)


def test_dropout_only_in_training(tiny_config: GPTConfig) -> None:
    torch.manual_seed(0)
    model = GPTModel(get_config("tiny", drop_rate=0.1, context_length=32, emb_dim=32, n_heads=2))
    ids = torch.randint(0, 1000, (1, 8))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_backward_reaches_tied_embedding(model: GPTModel, tiny_config: GPTConfig) -> None:
    model.train()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 5))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0


def test_set_dropout_reaches_every_dropout_and_the_config(tiny_config: GPTConfig) -> None:
    torch.manual_seed(0)
    model = GPTModel(tiny_config).set_dropout(0.3)
    assert model.cfg.drop_rate == 0.3  # a saved model records it
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(m.drop_rate == 0.3 for m in model.modules() if isinstance(m, CausalSelfAttention))
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    model.train()
    assert not torch.equal(model(ids), model(ids))  # masks differ between calls
    model.set_dropout(0.0)
    assert torch.equal(model(ids), model(ids))
    with pytest.raises(ValueError, match="drop_rate"):
        model.set_dropout(1.0)
