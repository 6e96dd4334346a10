"""LoRA from scratch (helpers.lora.layers): init, counts, freezing, merging, adapter files, training."""

from __future__ import annotations

import json
import math
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from helpers.config import GPTConfig, get_config
from helpers.lora.adapters import (
    LORA_FORMAT,
    LoRAAdapterError,
    load_lora_adapters,
    lora_state_dict,
    save_lora_adapters,
)
from helpers.lora.layers import (
    LinearWithLoRA,
    LoRAConfig,
    LoRALayer,
    apply_lora,
    count_parameters,
    lora_settings,
    merge_lora,
    parameter_report,
)
from helpers.model import GPTModel
from helpers.train import calc_loss_batch
from helpers.weights import load_model, save_model

VOCAB = 1000  # small vocabulary: LoRA never touches the embeddings, and tests stay fast


@pytest.fixture()
def cfg() -> GPTConfig:
    # No dropout: these tests compare outputs and losses of the same model step for step.
    return get_config(
        "tiny",
        vocab_size=VOCAB,
        context_length=64,
        emb_dim=32,
        n_heads=2,
        n_layers=2,
        drop_rate=0.0,
    )


def make_model(cfg: GPTConfig, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def ids(n: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def randomize_b(model: nn.Module, seed: int = 2) -> None:
    """Give every B a non-zero value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --- layers ---------------------------------------------------------------------------------


def test_lora_layer_init_and_book_scaling() -> None:
    torch.manual_seed(0)
    layer = LoRALayer(8, 6, rank=4, alpha=16)
    assert layer.A.shape == (8, 4) and layer.B.shape == (4, 6)
    assert torch.count_nonzero(layer.B) == 0
    # kaiming_uniform_(a=sqrt(5)) on an (8, 4) tensor: bound = 1 / sqrt(fan_in = 4)
    assert layer.A.abs().max() <= 1 / math.sqrt(4) and layer.A.std() > 0
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 5, 8)
    # The book's formula: alpha * (x @ A @ B), no division by the rank.
    assert layer.scaling == 16
    torch.testing.assert_close(layer(x), 16 * (x @ layer.A @ layer.B))


def test_rank_scaled_is_the_papers_alpha_over_rank() -> None:
    layer = LoRALayer(8, 6, rank=4, alpha=16, rank_scaled=True)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 8)
    assert layer.scaling == 4
    torch.testing.assert_close(layer(x), 4 * (x @ layer.A @ layer.B))


@pytest.mark.parametrize("rank, alpha", [(0, 8), (-1, 8), (2.0, 8), (True, 8), (4, 0), (4, -1)])
def test_bad_rank_or_alpha_is_rejected(rank: Any, alpha: int) -> None:
    with pytest.raises(ValueError, match="rank|alpha"):
        LoRALayer(8, 6, rank, alpha)


def test_linear_with_lora_adds_the_update() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=3)
    x = torch.randn(4, 8)
    torch.testing.assert_close(wrapped(x), linear(x))  # B = 0: same outputs
    with torch.no_grad():
        wrapped.lora.B.normal_()
    torch.testing.assert_close(wrapped(x), linear(x) + wrapped.lora(x))
    assert (wrapped.in_features, wrapped.out_features) == (8, 6)


# --- apply_lora, counts ---------------------------------------------------------------------


def test_apply_lora_keeps_logits_and_wraps_only_attn_and_mlp(cfg: GPTConfig) -> None:
    model = make_model(cfg)
    x = ids()
    before = logits(model, x)
    assert apply_lora(model, rank=4, alpha=8) is model
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)  # B = 0
    for block in model.h:
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert isinstance(block.get_submodule(name), LinearWithLoRA)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.wte.weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora.A", ".lora.B")) for n in trainable)
    assert not model.wte.weight.requires_grad and not model.ln_f.weight.requires_grad


def test_trainable_count_matches_the_formula(cfg: GPTConfig) -> None:
    model = make_model(cfg)
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    rank, d, layers = 4, cfg.emb_dim, cfg.n_layers
    apply_lora(model, rank=rank, alpha=8)
    # Per block: c_attn r(D + 3D) + attn.c_proj r(D + D) + c_fc r(D + 4D) + mlp.c_proj r(4D + D)
    expected = layers * rank * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    assert expected == 16 * rank * d * layers
    assert count_parameters(model) == (expected, total + expected)


def test_trainable_count_for_gpt2_small_shapes() -> None:
    # Shapes only (meta device): the 124M model with the book's rank 16.
    with torch.device("meta"):
        model = GPTModel(get_config("gpt2-small (124M)"))
        apply_lora(model, rank=16, alpha=16)
    trainable, total = count_parameters(model)
    assert trainable == 16 * 16 * 768 * 12 == 2_359_296
    assert total == 124_439_808 + trainable


def test_targets_select_linears(cfg: GPTConfig) -> None:
    model = apply_lora(make_model(cfg), rank=2, alpha=2, targets=("attn.c_attn", "mlp"))
    block = model.h[0]
    assert isinstance(block.get_submodule("attn.c_attn"), LinearWithLoRA)
    assert isinstance(block.get_submodule("attn.c_proj"), nn.Linear)
    assert isinstance(block.get_submodule("mlp.c_fc"), LinearWithLoRA)
    settings = lora_settings(model)
    assert settings == LoRAConfig(
        rank=2, alpha=2, targets=("attn.c_attn", "mlp.c_fc", "mlp.c_proj")
    )
    assert settings is not None and settings.targets == ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")
    assert lora_settings(make_model(cfg)) is None
    with pytest.raises(ValueError, match="Unknown LoRA target 'ffn'"):
        apply_lora(make_model(cfg), rank=2, alpha=2, targets=("ffn",))


def test_lora_config_is_validated_once_and_names_linears(cfg: GPTConfig) -> None:
    book = LoRAConfig(rank=16, alpha=16)
    assert book.targets == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert book == LoRAConfig(rank=16, alpha=16.0, targets=["mlp", "attn", "mlp.c_fc"])
    assert LoRAConfig(rank=2, alpha=1, targets="attn").targets == ("attn.c_attn", "attn.c_proj")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rank": 0}, "LoRAConfig.rank must be > 0"),
        ({"rank": 2.0}, "LoRAConfig.rank must be an integer"),
        ({"alpha": float("inf")}, "LoRAConfig.alpha must be > 0"),
        ({"targets": ()}, "LoRAConfig.targets must name LoRA targets: LoRA needs at least one"),
        ({"targets": ("head",)}, "Unknown LoRA target 'head'"),
        ({"rank_scaled": "yes"}, "LoRAConfig.rank_scaled must be True or False"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            LoRAConfig(**{"rank": 4, "alpha": 8, **bad})
    with pytest.raises(FrozenInstanceError):
        book.rank = 8  # type: ignore[misc]
    # apply() is apply_lora with the settings already checked: the same layers.
    x = ids()
    one, two = make_model(cfg), make_model(cfg)
    torch.manual_seed(5)
    LoRAConfig(rank=2, alpha=4, targets="mlp").apply(one)
    torch.manual_seed(5)
    apply_lora(two, rank=2, alpha=4, targets="mlp")
    randomize_b(one)
    randomize_b(two)
    torch.testing.assert_close(logits(one, x), logits(two, x), atol=0, rtol=0)
    assert lora_settings(one) == lora_settings(two) == LoRAConfig(rank=2, alpha=4, targets="mlp")


def test_apply_twice_is_refused(cfg: GPTConfig) -> None:
    model = apply_lora(make_model(cfg), rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=2, alpha=2)


def test_parameter_report(cfg: GPTConfig) -> None:
    model = make_model(cfg)
    _, total = count_parameters(model)
    apply_lora(model, rank=4, alpha=8)
    lines = parameter_report(model).splitlines()
    lora = 16 * 4 * cfg.emb_dim * cfg.n_layers
    assert lines[0] == f"Total trainable parameters before: {total:,}"
    assert lines[1] == f"Total trainable parameters after: {lora:,}"
    assert lines[2] == f"Total trainable LoRA parameters: {lora:,}"
    assert lines[3].startswith(f"Trainable share: {100 * lora / total:.2f}%")


# --- merge ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rank_scaled", [False, True])
def test_merge_gives_identical_logits(cfg: GPTConfig, rank_scaled: bool) -> None:
    model = apply_lora(make_model(cfg), rank=4, alpha=8, rank_scaled=rank_scaled)
    randomize_b(model)
    x = ids()
    base = logits(make_model(cfg), x)
    unmerged = logits(model, x)
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapters do something
    merge_lora(model)
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    assert set(model.state_dict()) == set(make_model(cfg).state_dict())
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)


def test_merged_model_saves_and_loads_as_a_plain_checkpoint(cfg: GPTConfig, tmp_path: Path) -> None:
    model = apply_lora(make_model(cfg), rank=4, alpha=8)
    randomize_b(model)
    x = ids()
    expected = logits(model, x)
    save_model(merge_lora(model), tmp_path / "merged.safetensors")
    loaded = load_model(tmp_path / "merged.safetensors")
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-5, rtol=0)


# --- adapter files --------------------------------------------------------------------------


def test_adapter_round_trip(cfg: GPTConfig, tmp_path: Path) -> None:
    model = apply_lora(make_model(cfg), rank=4, alpha=8)
    randomize_b(model)
    x = ids()
    expected = logits(model, x)
    path = save_lora_adapters(model, tmp_path / "a" / "adapters.safetensors", rank=4, alpha=8)
    assert [p.name for p in path.parent.iterdir()] == ["adapters.safetensors"]  # no temp left
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == set(lora_state_dict(model))
    assert len(keys) == 2 * 4 * cfg.n_layers  # A and B of 4 linears per block
    assert meta["lora_format"] == LORA_FORMAT
    assert (json.loads(meta["rank"]), json.loads(meta["alpha"])) == (4, 8)
    assert json.loads(meta["targets"]) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]

    fresh = make_model(cfg)
    assert load_lora_adapters(fresh, path) is fresh
    assert lora_settings(fresh) == lora_settings(model)
    torch.testing.assert_close(logits(fresh, x), expected, atol=0, rtol=0)
    assert count_parameters(fresh) == count_parameters(model)  # base frozen, adapters train

    # Loading into a model that already has the same LoRA layers just sets the tensors.
    again = apply_lora(make_model(cfg), rank=4, alpha=8)
    torch.testing.assert_close(logits(load_lora_adapters(again, path), x), expected)


def test_adapter_file_keeps_rank_scaled_and_targets(cfg: GPTConfig, tmp_path: Path) -> None:
    model = apply_lora(make_model(cfg), rank=2, alpha=4, targets="attn", rank_scaled=True)
    randomize_b(model)
    save_lora_adapters(model, tmp_path / "a.safetensors")
    fresh = load_lora_adapters(make_model(cfg), tmp_path / "a.safetensors")
    assert lora_settings(fresh) == LoRAConfig(
        rank=2, alpha=4, targets=("attn.c_attn", "attn.c_proj"), rank_scaled=True
    )
    x = ids()
    torch.testing.assert_close(logits(fresh, x), logits(model, x), atol=0, rtol=0)


def test_save_checks_the_model_and_given_settings(cfg: GPTConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora_adapters(make_model(cfg), tmp_path / "a.safetensors")
    model = apply_lora(make_model(cfg), rank=4, alpha=8)
    with pytest.raises(ValueError, match="rank=8 given, but the model's LoRA layers use 4"):
        save_lora_adapters(model, tmp_path / "a.safetensors", rank=8, alpha=8)
    with pytest.raises(ValueError, match="reserved"):
        save_lora_adapters(model, tmp_path / "a.safetensors", metadata={"rank": "1"})
    assert not list(tmp_path.iterdir())


def _one_line(err: pytest.ExceptionInfo[BaseException], path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file_error(cfg: GPTConfig, tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(LoRAAdapterError) as err:
        load_lora_adapters(make_model(cfg), path)
    assert "No LoRA adapter file" in _one_line(err, path)


def test_full_checkpoint_is_not_an_adapter_file(cfg: GPTConfig, tmp_path: Path) -> None:
    path = save_model(make_model(cfg), tmp_path / "model.safetensors")
    model = make_model(cfg)
    with pytest.raises(LoRAAdapterError) as err:
        load_lora_adapters(model, path)
    assert "is not a LoRA adapter file" in _one_line(err, path)
    assert lora_settings(model) is None  # untouched


def test_non_safetensors_file_error(cfg: GPTConfig, tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, not a tensor file\n")
    with pytest.raises(LoRAAdapterError) as err:
        load_lora_adapters(make_model(cfg), path)
    assert "is not a LoRA adapter file" in _one_line(err, path)


def test_bad_metadata_error(cfg: GPTConfig, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    meta = {"lora_format": LORA_FORMAT, "rank": "0", "alpha": "1", "rank_scaled": "false"}
    save_file({"x": torch.zeros(1)}, str(path), metadata={**meta, "targets": '["attn"]'})
    with pytest.raises(LoRAAdapterError) as err:
        load_lora_adapters(make_model(cfg), path)
    assert "invalid LoRA metadata" in _one_line(err, path)


def test_shape_mismatch_error_leaves_the_model_untouched(cfg: GPTConfig, tmp_path: Path) -> None:
    path = tmp_path / "wide.safetensors"
    wide = get_config("tiny", vocab_size=VOCAB, context_length=64, emb_dim=64, n_layers=2)
    save_lora_adapters(apply_lora(make_model(wide), rank=4, alpha=8), path)
    model = make_model(cfg)
    with pytest.raises(LoRAAdapterError) as err:
        load_lora_adapters(model, path)
    msg = _one_line(err, path)
    assert "'h.0.attn.c_attn.lora.A' has shape (64, 4), the model needs (32, 4)" in msg
    assert lora_settings(model) is None
    assert all(p.requires_grad for p in model.parameters())


def test_layer_count_mismatch_error(cfg: GPTConfig, tmp_path: Path) -> None:
    path = tmp_path / "deep.safetensors"
    deep = get_config("tiny", vocab_size=VOCAB, context_length=64, emb_dim=32, n_layers=3)
    save_lora_adapters(apply_lora(make_model(deep), rank=4, alpha=8), path)
    with pytest.raises(LoRAAdapterError) as err:
        load_lora_adapters(make_model(cfg), path)
    assert "unexpected tensor 'h.2.attn.c_attn.lora.A'" in _one_line(err, path)


def test_different_existing_lora_is_refused(cfg: GPTConfig, tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_lora_adapters(apply_lora(make_model(cfg), rank=4, alpha=8), path)
    with pytest.raises(LoRAAdapterError) as err:
        load_lora_adapters(apply_lora(make_model(cfg), rank=2, alpha=8), path)
    assert "already has LoRA" in _one_line(err, path)


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("only_trainable", [True, False])
def test_training_changes_only_lora_weights(cfg: GPTConfig, only_trainable: bool) -> None:
    model = apply_lora(make_model(cfg), rank=4, alpha=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # helpers.train.train builds AdamW over model.parameters(): frozen parameters never get a
    # gradient, so AdamW skips them (weight decay included). Both ways must leave them alone.
    params = (
        filter(lambda p: p.requires_grad, model.parameters())
        if only_trainable
        else model.parameters()
    )
    optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.1)
    x = ids(4, 32, seed=3)
    inputs, targets = x[:, :-1], x[:, 1:]
    model.train()
    with torch.no_grad():
        start = calc_loss_batch(inputs, targets, model, "cpu").item()
    for _ in range(10):
        optimizer.zero_grad()
        loss = calc_loss_batch(inputs, targets, model, "cpu")
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = calc_loss_batch(inputs, targets, model, "cpu").item()
    assert end < start - 0.1
    params_now = dict(model.named_parameters())
    for name, before in frozen.items():
        assert params_now[name].grad is None, name
        assert torch.equal(params_now[name], before), name
    for name, before in lora.items():
        assert not torch.equal(params_now[name], before), name
