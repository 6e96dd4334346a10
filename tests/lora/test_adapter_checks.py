"""Adapter files that must not load: NaN/inf tensors, and adapters trained on another base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers.config import GPTConfig, get_config
from helpers.lora.adapters import LoRAAdapterError, load_lora_adapters, save_lora_adapters
from helpers.lora.layers import apply_lora, lora_settings
from helpers.model import GPTModel
from helpers.weights import random_model

VOCAB = 1000


@pytest.fixture()
def cfg() -> GPTConfig:
    return get_config(
        "tiny", vocab_size=VOCAB, context_length=64, emb_dim=32, n_heads=2, n_layers=2
    )


def make_model(cfg: GPTConfig, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def trained_adapters(
    cfg: GPTConfig, path: Path, *, seed: int = 0, metadata: dict[str, Any] | None = None
) -> tuple[GPTModel, Path]:
    """Adapters with non-zero B (as after training) on the base seeded `seed`, saved to `path`."""
    model = apply_lora(make_model(cfg, seed), rank=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(std=0.05)
    return model, save_lora_adapters(model, path, metadata=metadata)


def rewrite_tensor(path: Path, key: str, value: float) -> None:
    """Put `value` into the first element of adapter tensor `key`, keeping the metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(path), metadata=meta)


def one_line(err: pytest.ExceptionInfo[BaseException], path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_tensor_is_refused(cfg: GPTConfig, tmp_path: Path, value: Any) -> None:
    path = tmp_path / "a.safetensors"
    trained_adapters(cfg, path)
    rewrite_tensor(path, "h.1.mlp.c_fc.lora.B", value)
    model = make_model(cfg)
    with pytest.raises(LoRAAdapterError) as err:
        load_lora_adapters(model, path)
    assert "'h.1.mlp.c_fc.lora.B' holds 1 of" in one_line(err, path)
    assert lora_settings(model) is None  # untouched
    with pytest.raises(LoRAAdapterError):  # no flag lets broken adapters in
        load_lora_adapters(make_model(cfg), path, force=True)


def test_adapters_on_another_same_shaped_base_are_refused(cfg: GPTConfig, tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    trained, _ = trained_adapters(cfg, path, seed=0)
    other = make_model(cfg, seed=1)  # same shapes, different weights
    with pytest.raises(LoRAAdapterError) as err:
        load_lora_adapters(other, path)
    msg = one_line(err, path)
    assert "another base model" in msg and "force=True" in msg
    assert lora_settings(other) is None  # untouched
    # force=True applies them anyway; the right base loads without it and gives the same model.
    assert lora_settings(load_lora_adapters(other, path, force=True)) is not None
    right = load_lora_adapters(make_model(cfg, seed=0), path)
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(right(x), trained(x), atol=0, rtol=0)


def test_recorded_seed_and_weights_are_named_both_ways(tmp_path: Path) -> None:
    # As helpers.finetune writes them: the base's preset, weights and seed.
    path = tmp_path / "adapters.safetensors"
    base = apply_lora(random_model("tiny", seed=123), rank=2, alpha=4)
    meta = {"base_model": "tiny", "base_weights": "random init", "base_seed": 123}
    save_lora_adapters(base, path, metadata=meta)
    with pytest.raises(LoRAAdapterError) as err:
        load_lora_adapters(random_model("tiny", seed=7), path)
    msg = one_line(err, path)
    assert "tiny, random init, seed 123" in msg  # the file's base ...
    assert "this model's weights have fingerprint" in msg  # ... and the model's
    load_lora_adapters(random_model("tiny", seed=123), path)


def test_files_without_a_fingerprint_are_checked_by_their_recorded_seed(tmp_path: Path) -> None:
    # An adapter file written before fingerprints: its seeded base is rebuilt and compared.
    path = tmp_path / "old.safetensors"
    meta = {"base_model": "tiny", "base_weights": "random init", "base_seed": 123}
    save_lora_adapters(
        apply_lora(random_model("tiny", seed=123), rank=2, alpha=4), path, metadata=meta
    )
    with safe_open(str(path), framework="pt") as f:
        old_meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del old_meta["base_fingerprint"]
    save_file(tensors, str(path), metadata=old_meta)
    with pytest.raises(LoRAAdapterError, match="tiny, random init, seed 123"):
        load_lora_adapters(random_model("tiny", seed=8), path)
    load_lora_adapters(random_model("tiny", seed=123), path)
