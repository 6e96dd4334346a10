"""LoRA adapter files: only the A/B tensors and their settings, as safetensors.

`save_lora_adapters` writes the adapters of a model that `helpers.lora.layers.apply_lora`
wrapped (a few MB instead of the whole model); `load_lora_adapters` applies LoRA with the
file's rank/alpha/targets to a base model and loads them, after checking every tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from helpers.atomic import atomic_path
from helpers.lora.layers import (
    LinearWithLoRA,
    _blocks,
    _check_rank_alpha,
    _resolve_targets,
    apply_lora,
    lora_settings,
)
from helpers.model import GPTModel

LORA_FORMAT = "course-lora-adapters/1"  # stored in every adapter file's metadata


class LoRAAdapterError(ValueError):
    """An adapter file is missing, not a LoRA adapter file, or does not fit the model."""


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, by state-dict name (e.g. "h.0.attn.c_attn.lora.A")."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if name.endswith((".lora.A", ".lora.B"))
    }


def save_lora_adapters(
    model: GPTModel,
    path: str | os.PathLike,
    rank: int | None = None,
    alpha: float | None = None,
    *,
    metadata: dict | None = None,
) -> Path:
    """Write only the LoRA A/B tensors and their settings as safetensors; atomic.

    `rank`/`alpha` default to the model's; when given they must match it (a guard against
    saving under the wrong settings). `metadata` adds string/JSON entries to the file.
    """
    path = Path(path)
    settings = lora_settings(model)
    if settings is None:
        raise ValueError("model has no LoRA layers to save; call apply_lora first")
    for key, given in (("rank", rank), ("alpha", alpha)):
        if given is not None and given != settings[key]:
            raise ValueError(
                f"{key}={given!r} given, but the model's LoRA layers use {settings[key]!r}"
            )
    meta = {
        "format": "pt",
        "lora_format": LORA_FORMAT,
        "rank": json.dumps(settings["rank"]),
        "alpha": json.dumps(settings["alpha"]),
        "rank_scaled": json.dumps(settings["rank_scaled"]),
        "targets": json.dumps(settings["targets"]),
    }
    if hasattr(model, "cfg"):
        meta["base_config"] = json.dumps(model.cfg.to_dict())  # for reference only
    for key, value in (metadata or {}).items():
        if key in meta:
            raise ValueError(f"metadata key {key!r} is reserved")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    with atomic_path(path, suffix=".safetensors.tmp") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _read_adapter_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(settings, tensors) of an adapter file; LoRAAdapterError naming the file otherwise."""
    if not path.is_file():
        raise LoRAAdapterError(f"No LoRA adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise LoRAAdapterError(
            f"{path} is not a LoRA adapter file (not readable as safetensors: {err})"
        ) from err
    if meta.get("lora_format") != LORA_FORMAT:
        found = meta.get("lora_format", "no lora_format entry")
        raise LoRAAdapterError(
            f"{path} is not a LoRA adapter file ({found}; expected {LORA_FORMAT}, "
            "written by save_lora_adapters)"
        )
    try:
        settings = {k: json.loads(meta[k]) for k in ("rank", "alpha", "rank_scaled", "targets")}
        _check_rank_alpha(settings["rank"], settings["alpha"])
        settings["targets"] = list(_resolve_targets(settings["targets"]))
    except (KeyError, ValueError, TypeError) as err:
        raise LoRAAdapterError(f"{path} has invalid LoRA metadata: {err}") from err
    return settings, tensors


def _expected_shapes(model: GPTModel, settings: dict) -> dict[str, tuple[int, ...]]:
    """Adapter tensor names and shapes that `settings` would give `model`."""
    rank = settings["rank"]
    shapes: dict[str, tuple[int, ...]] = {}
    for i, block in enumerate(_blocks(model)):
        for name in settings["targets"]:
            layer = block.get_submodule(name)
            if isinstance(layer, LinearWithLoRA):
                layer = layer.linear
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"h.{i}.{name} is a {type(layer).__name__}, expected nn.Linear")
            shapes[f"h.{i}.{name}.lora.A"] = (layer.in_features, rank)
            shapes[f"h.{i}.{name}.lora.B"] = (rank, layer.out_features)
    return shapes


def _check_fits(
    path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]
) -> None:
    for key, shape in shapes.items():
        if key not in tensors:
            raise LoRAAdapterError(f"{path} is missing {key!r} (model expects shape {shape})")
        if tuple(tensors[key].shape) != shape:
            raise LoRAAdapterError(
                f"{path} does not fit the model: {key!r} has shape "
                f"{tuple(tensors[key].shape)}, the model needs {shape}"
            )
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise LoRAAdapterError(
            f"{path} does not fit the model: unexpected tensor {extra[0]!r} "
            f"and {len(extra) - 1} more (adapters for a model with more layers?)"
        )


def load_lora_adapters(model: GPTModel, path: str | os.PathLike) -> GPTModel:
    """Apply LoRA with the file's rank/alpha/targets to a base `model` and load its A/B tensors.

    A model that already has matching LoRA layers just gets the tensors. Everything is
    checked before the model is touched, so a bad file leaves `model` as it was.
    Returns `model` (base frozen, adapters trainable, as after apply_lora).
    """
    path = Path(path)
    settings, tensors = _read_adapter_file(path)
    current = lora_settings(model)
    if current is not None and current != settings:
        raise LoRAAdapterError(
            f"{path} holds LoRA {settings}, but the model already has LoRA {current}; "
            "load into the base model"
        )
    _check_fits(path, tensors, _expected_shapes(model, settings))
    if current is None:
        apply_lora(
            model,
            settings["rank"],
            settings["alpha"],
            settings["targets"],
            rank_scaled=settings["rank_scaled"],
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor)  # casts to the parameter's dtype and device
    return model
