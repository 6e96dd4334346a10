"""Checkpoints, transformers/OpenAI GPT-2 conversion (proved offline), build_model, load_pretrained."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.config import GPTConfig, get_config
from helpers.model import GPTModel
from helpers.weights import (
    CheckpointMismatchError,
    build_model,
    convert_hf_state_dict,
    load_hf_gpt2,
    load_model,
    load_pretrained,
    load_state_checked,
    read_metadata,
    save_model,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")


def make_hf_model(path: Path, vocab_size: int = 50257) -> Any:
    """A small random transformers GPT-2 saved with save_pretrained (no download)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=vocab_size
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, GPTModel, Path]:
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf = make_hf_model(path)
    return hf, load_hf_gpt2(path), path


def test_hf_conversion_gives_equal_logits(hf_pair: tuple[Any, GPTModel, Path]) -> None:
    hf, model, _ = hf_pair
    ids = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert got.shape == expected.shape == (3, 40, 50257)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_hf_conversion_maps_every_tensor(hf_pair: tuple[Any, GPTModel, Path]) -> None:
    hf, model, _ = hf_pair
    assert model.cfg == get_config(
        "tiny",
        context_length=128,
        emb_dim=32,
        n_heads=2,
        n_layers=2,
        vocab_size=50257,
        drop_rate=0.0,
    )
    ours = model.state_dict()
    for key, tensor in hf.state_dict().items():
        name = key.removeprefix("transformer.")
        expected = tensor.t() if tensor.dim() == 2 and ".h." in key and "ln" not in key else tensor
        assert ours[name].shape == expected.shape, name
        torch.testing.assert_close(ours[name], expected, atol=0, rtol=0)
    assert model.lm_head.weight is model.wte.weight


def test_to_hf_state_dict_round_trips(hf_pair: tuple[Any, GPTModel, Path]) -> None:
    hf, model, _ = hf_pair
    exported = to_hf_state_dict(model)
    # Back through convert_hf_state_dict: every tensor exactly as it was.
    back = convert_hf_state_dict(exported)
    assert set(back) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(back[key], tensor), key
    # Into a fresh transformers model: every weight of it set, the same logits as the original.
    torch.manual_seed(9)
    fresh = transformers.GPT2LMHeadModel(hf.config).eval()
    missing, unexpected = fresh.load_state_dict(exported, strict=False)
    assert not unexpected
    assert all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing), missing
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_greedy_generation_equals_transformers(hf_pair: tuple[Any, GPTModel, Path]) -> None:
    from helpers.generate import generate

    hf, model, _ = hf_pair
    prompt = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=25,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=50256,
    )
    got = generate(model, prompt, max_new_tokens=25)
    assert torch.equal(got, expected)


def test_load_from_bare_safetensors_file(
    hf_pair: tuple[Any, GPTModel, Path], tmp_path: Path
) -> None:
    _, model, path = hf_pair
    # With config.json beside it, the file alone is enough.
    again = load_hf_gpt2(path / "model.safetensors")
    ids = torch.randint(0, 50257, (1, 8))
    assert torch.equal(again(ids), model(ids))
    # Without config.json a non-OpenAI width is ambiguous: clear error, or pass config=.
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="config"):
        load_hf_gpt2(tmp_path / "model.safetensors")
    explicit = load_hf_gpt2(tmp_path / "model.safetensors", config=model.cfg)
    assert torch.equal(explicit(ids), model(ids))


def test_openai_layout_without_prefix_and_mask_buffers() -> None:
    # OpenAI's files on the Hub: no "transformer." prefix, attn.bias mask buffers inside.
    hf_state = {
        "wte.weight": torch.zeros(10, 4),
        "h.0.attn.bias": torch.ones(1, 1, 8, 8),
        "h.0.attn.masked_bias": torch.tensor(-1e4),
        "h.0.attn.c_attn.bias": torch.zeros(12),
        "h.0.attn.c_attn.weight": torch.arange(48.0).reshape(4, 12),
    }
    out = convert_hf_state_dict(hf_state)
    assert set(out) == {"wte.weight", "h.0.attn.c_attn.bias", "h.0.attn.c_attn.weight"}
    assert out["h.0.attn.c_attn.weight"].shape == (12, 4)


def test_every_tensor_shape_is_checked(hf_pair: tuple[Any, GPTModel, Path], tmp_path: Path) -> None:
    _, _, path = hf_pair
    state = load_file(str(path / "model.safetensors"))
    state["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(100)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointMismatchError, match=r"h\.1\.mlp\.c_fc\.bias.*\(100,\).*\(128,\)"):
        load_hf_gpt2(tmp_path)


def test_save_load_roundtrip(tiny_config: GPTConfig, tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = GPTModel(tiny_config)
    path = save_model(model, tmp_path / "ckpt" / "model.safetensors", metadata={"epoch": 2})
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp files left
    meta = read_metadata(path)
    assert meta["epoch"] == "2"
    assert "lm_head.weight" not in load_file(str(path))  # tied head stored once
    loaded = load_model(path)
    assert loaded.cfg == tiny_config
    assert loaded.lm_head.weight is loaded.wte.weight
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_read_metadata_keys_come_sorted(tiny_config: GPTConfig, tmp_path: Path) -> None:
    # safetensors hands metadata back in hash order; printed metadata must read the same
    # on every run (notebook 04 prints it).
    meta = {"zeta": "1", "prompt_style": "alpaca", "alpha": "2", "mask_prompt": "false"}
    path = save_model(GPTModel(tiny_config), tmp_path / "m.safetensors", metadata=meta)
    keys = list(read_metadata(path))
    assert keys == sorted(keys) and {"zeta", "alpha", "config"} <= set(keys)


def test_mismatch_errors_name_key_and_shapes(tiny_config: GPTConfig) -> None:
    model = GPTModel(tiny_config)
    state = dict(model.state_dict())
    state["h.0.attn.c_attn.weight"] = torch.zeros(3 * 32, 16)
    with pytest.raises(
        CheckpointMismatchError, match=r"h\.0\.attn\.c_attn\.weight.*\(96, 16\).*\(96, 32\)"
    ):
        load_state_checked(model, state)
    state = dict(model.state_dict())
    del state["ln_f.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing 'ln_f\.bias'.*\(32,\)"):
        load_state_checked(model, state)
    state = dict(model.state_dict()) | {"extra.weight": torch.zeros(2)}
    with pytest.raises(CheckpointMismatchError, match="unexpected key 'extra.weight'"):
        load_state_checked(model, state)


def test_untied_head_is_refused(tiny_config: GPTConfig) -> None:
    model = GPTModel(tiny_config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] += 1.0  # the chapter's separate out_head copy
    with pytest.raises(CheckpointMismatchError, match="ties"):
        load_state_checked(model, state)


def test_load_model_rejects_file_without_config(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors has no model config"):
        load_model(tmp_path / "other.safetensors")


def test_build_model_tiny_is_seeded_and_labelled() -> None:
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a, desc = build_model("tiny")
    assert torch.equal(torch.rand(1), before)  # the caller's random state is untouched
    b, _ = build_model("tiny")
    assert desc == "random init"
    assert not a.training
    for key, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], tensor), key


def test_build_model_unknown_name_lists_presets() -> None:
    with pytest.raises(ValueError, match="valid names.*gpt2-medium"):
        build_model("gpt5")


def test_load_pretrained_offline_explains_how_to_work_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # An empty cache, so a developer's cached GPT-2 cannot make this test pass by accident.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        load_pretrained("gpt2-small", cache_dir=tmp_path)
    message = str(info.value)
    assert "Cannot download the gpt2-small (124M) weights" in message
    assert "openai-community/gpt2" in message
    assert "load_hf_gpt2" in message and "COURSE_MODEL=tiny" in message
    with pytest.raises(RuntimeError):
        build_model("gpt2-medium")  # same path, no download attempted offline


def test_load_pretrained_rejects_tiny() -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        load_pretrained("tiny")


def test_untied_config_loads_openai_files_without_lm_head(
    hf_pair: tuple[Any, GPTModel, Path],
) -> None:
    # OpenAI's and transformers' GPT-2 files store the head once, as wte: an untied config
    # (the chapter's separate out_head) loads them tied, then unties the head.
    _, model, path = hf_pair
    untied = load_hf_gpt2(path, config=replace(model.cfg, tie_embeddings=False))
    assert not untied.tied and untied.cfg.tie_embeddings is False
    assert torch.equal(untied.lm_head.weight, untied.wte.weight)
    ids = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(untied(ids), model(ids))


def test_hf_config_tie_word_embeddings_false_loads_the_separate_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=300, tie_word_embeddings=False
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = load_hf_gpt2(tmp_path)
    assert model.cfg.tie_embeddings is False and not model.tied
    assert not torch.equal(model.lm_head.weight, model.wte.weight)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_load_pretrained_and_build_model_untie_for_chapter_compat(
    hf_pair: tuple[Any, GPTModel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    import helpers.weights as weights

    _, model, path = hf_pair
    # No download: the hub hands back the small local file, the preset's config matches it.
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda *a, **k: str(path / "model.safetensors")
    )
    monkeypatch.setattr(weights, "get_config", lambda name: model.cfg)
    assert load_pretrained("gpt2-small").tied
    untied = load_pretrained("gpt2-small", tie_embeddings=False)
    assert not untied.tied and torch.equal(untied.lm_head.weight, model.wte.weight)
    chapter, desc = build_model("gpt2-small", chapter_compat=True)
    assert desc == "OpenAI GPT-2 weights" and not chapter.tied
    assert build_model("gpt2-small")[0].tied


def test_build_model_tiny_chapter_compat_is_untied() -> None:
    model, desc = build_model("tiny", chapter_compat=True)
    assert desc == "random init" and not model.tied and model.cfg.tie_embeddings is False
    assert build_model("tiny")[0].tied


def test_save_model_stores_the_real_tie_state(tiny_config: GPTConfig, tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = GPTModel(tiny_config)
    # Untied by hand, not through untie_output_head: model.cfg still says tied.
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach() + 1.0)
    assert model.cfg.tie_embeddings and not model.tied
    loaded = load_model(save_model(model, tmp_path / "model.safetensors"))
    assert not loaded.tied and loaded.cfg.tie_embeddings is False
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    # untie_output_head keeps cfg in step; the reload is untied too.
    again = load_model(
        save_model(GPTModel(tiny_config).untie_output_head(), tmp_path / "b.safetensors")
    )
    assert not again.tied
