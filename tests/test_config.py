"""Model presets: names, aliases, validation."""

import pytest

from helpers.config import (
    HF_REPOS,
    MODEL_PRESETS,
    GPTConfig,
    get_config,
    is_pretrained_preset,
    resolve_model_name,
)


def test_gpt2_presets_match_openai_sizes() -> None:
    sizes = {name: (c.emb_dim, c.n_layers, c.n_heads) for name, c in MODEL_PRESETS.items()}
    assert sizes["gpt2-small (124M)"] == (768, 12, 12)
    assert sizes["gpt2-medium (355M)"] == (1024, 24, 16)
    assert sizes["gpt2-large (774M)"] == (1280, 36, 20)
    assert sizes["gpt2-xl (1558M)"] == (1600, 48, 25)
    for cfg in MODEL_PRESETS.values():
        assert (cfg.vocab_size, cfg.context_length, cfg.qkv_bias) == (50257, 1024, True)


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("gpt2", "gpt2-small (124M)"),
        ("gpt2-medium", "gpt2-medium (355M)"),
        ("GPT2-XL", "gpt2-xl (1558M)"),
        ("tiny", "tiny"),
        (" gpt2-large (774M) ", "gpt2-large (774M)"),
    ],
)
def test_aliases_resolve(alias: str, canonical: str) -> None:
    assert resolve_model_name(alias) == canonical


def test_unknown_preset_lists_the_valid_names_once() -> None:
    with pytest.raises(ValueError, match="Unknown model preset 'gpt3'") as err:
        resolve_model_name("gpt3")
    message = str(err.value)
    assert "'gpt2-medium (355M)'" in message and "'gpt2-medium'" in message
    assert message.count("'tiny'") == 1


def test_only_gpt2_presets_have_pretrained_weights() -> None:
    assert set(HF_REPOS) == set(MODEL_PRESETS) - {"tiny"}
    assert is_pretrained_preset("gpt2-medium") and not is_pretrained_preset("tiny")


def test_overrides_and_frozen() -> None:
    cfg = get_config("tiny", context_length=64)
    assert cfg.context_length == 64 and MODEL_PRESETS["tiny"].context_length == 1024
    with pytest.raises(AttributeError):
        cfg.emb_dim = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"emb_dim": 0}, "emb_dim must be a positive integer"),
        ({"n_heads": 5}, "divisible by n_heads"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"vocab_size": 2.5}, "vocab_size"),
    ],
)
def test_invalid_configs_are_rejected(
    fields: dict[str, int] | dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        GPTConfig(**fields)
