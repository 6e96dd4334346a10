"""LoRA adapter files: only the A/B tensors and their settings, as safetensors.

`save_lora_adapters` writes the adapters of a model that `helpers.lora.layers.apply_lora`
wrapped (a few MB instead of the whole model) with its `LoRAConfig` in the metadata;
`load_lora_adapters` applies LoRA with the file's settings to a base model and loads the
tensors, after checking every one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from helpers.atomic import atomic_path
from helpers.lora.layers import LinearWithLoRA, LoRAConfig, _blocks, lora_settings
from helpers.model import GPTModel
from helpers.weights import first_nonfinite, random_model, weights_fingerprint

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
    path: str | os.PathLike[str],
    rank: int | None = None,
    alpha: float | None = None,
    *,
    metadata: dict[str, Any] | None = None,
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
        used = getattr(settings, key)
        if given is not None and given != used:
            raise ValueError(f"{key}={given!r} given, but the model's LoRA layers use {used!r}")
    meta = {"format": "pt", "lora_format": LORA_FORMAT}
    meta |= {key: json.dumps(value) for key, value in asdict(settings).items()}
    if hasattr(model, "cfg"):
        meta["base_config"] = json.dumps(model.cfg.to_dict())  # for reference only
    meta["base_fingerprint"] = weights_fingerprint(_base_state(model))  # checked at load
    for key, value in (metadata or {}).items():
        if key in meta:
            raise ValueError(f"metadata key {key!r} is reserved")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    with atomic_path(path, suffix=".safetensors.tmp") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under their unwrapped names (LoRA tensors left out)."""
    return {
        name.replace(".linear.", "."): tensor
        for name, tensor in model.state_dict().items()
        if not name.endswith((".lora.A", ".lora.B"))
    }


def _recorded_base(meta: dict[str, str]) -> tuple[str, str | None]:
    """(description, weights fingerprint or None) of the base an adapter file was trained on.

    Files written before fingerprints were recorded, on a seeded random init, get the
    fingerprint of that init rebuilt from `base_model` and `base_seed`.
    """
    seed = json.loads(meta["base_seed"]) if "base_seed" in meta else None
    parts = [meta.get("base_model"), meta.get("base_weights")]
    parts += [] if seed is None else [f"seed {seed}"]
    described = ", ".join(p for p in parts if p) or "its base"
    if "base_fingerprint" in meta:
        return described, meta["base_fingerprint"]
    if meta.get("base_weights") != "random init" or seed is None or "base_model" not in meta:
        return described, None
    tie = not json.loads(meta.get("chapter_compat", "false"))
    try:
        base = random_model(meta["base_model"], seed=int(seed), tie_embeddings=tie)
    except (KeyError, TypeError, ValueError):
        return described, None  # not a preset this course knows: nothing to check against
    return described, weights_fingerprint(base.state_dict())


def _check_base(path: Path, model: nn.Module) -> None:
    """Refuse adapters whose file records another base model than `model` (same shapes or not)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    try:
        described, recorded = _recorded_base(meta)
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise LoRAAdapterError(f"{path} has invalid base-model metadata: {err}") from err
    actual = weights_fingerprint(_base_state(model))
    if recorded is not None and recorded != actual:
        raise LoRAAdapterError(
            f"{path} was trained on another base model: the file records {described} "
            f"(weights fingerprint {recorded}), this model's weights have fingerprint {actual}; "
            "load them into that base model, or pass force=True to apply them anyway"
        )


def _read_adapter_file(path: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
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
        settings = LoRAConfig(**{f.name: json.loads(meta[f.name]) for f in fields(LoRAConfig)})
    except (KeyError, ValueError, TypeError) as err:
        raise LoRAAdapterError(f"{path} has invalid LoRA metadata: {err}") from err
    bad = first_nonfinite(tensors)
    if bad is not None:  # no flag lets these in: they would turn every answer into NaN
        raise LoRAAdapterError(
            f"{path}: tensor {bad[0]!r} holds {bad[1]} of {bad[2]} values that are NaN or "
            "infinite; these adapters are broken (did their training diverge?)"
        )
    return settings, tensors


def _expected_shapes(model: GPTModel, settings: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """Adapter tensor names and shapes that `settings` would give `model`."""
    rank = settings.rank
    shapes: dict[str, tuple[int, ...]] = {}
    for i, block in enumerate(_blocks(model)):
        for name in settings.targets:
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


def load_lora_adapters(
    model: GPTModel, path: str | os.PathLike[str], *, force: bool = False
) -> GPTModel:
    """Apply LoRA with the file's rank/alpha/targets to a base `model` and load its A/B tensors.

    A model that already has matching LoRA layers just gets the tensors. Everything is
    checked before the model is touched, so a bad file leaves `model` as it was; that
    includes the base model the file records (`force=True` skips only that check).
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
    if not force:
        _check_base(path, model)
    if current is None:
        settings.apply(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor)  # casts to the parameter's dtype and device
    return model
