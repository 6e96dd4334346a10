"""The book's own checkpoints: `torch.save(model.state_dict())` of the chapter's GPTModel.

`load_book_checkpoint` reads such a `.pth` file (weights_only, no code runs) into this
course's GPTModel and `save_book_checkpoint` writes one the book's code can load;
`book_to_course_state` and `course_to_book_state` rename the tensors between the two
layouts (the book's separate W_query/W_key/W_value are the course's fused c_attn).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from helpers.atomic import atomic_path
from helpers.config import GPTConfig, get_config
from helpers.model import GPTModel
from helpers.weights import (
    LAYER_KEY,
    TIED_KEY,
    CheckpointFileError,
    CheckpointMismatchError,
    check_config_shapes,
    check_finite,
    fsync_file,
    load_state_checked,
)

# Book name -> course name, per block; W_query/W_key/W_value are fused into c_attn.
_BOOK_BLOCK = {
    "att.out_proj.weight": "attn.c_proj.weight",
    "att.out_proj.bias": "attn.c_proj.bias",
    "ff.layers.0.weight": "mlp.c_fc.weight",
    "ff.layers.0.bias": "mlp.c_fc.bias",
    "ff.layers.2.weight": "mlp.c_proj.weight",
    "ff.layers.2.bias": "mlp.c_proj.bias",
    "norm1.scale": "ln_1.weight",
    "norm1.shift": "ln_1.bias",
    "norm2.scale": "ln_2.weight",
    "norm2.shift": "ln_2.bias",
}
_BOOK_TOP = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "final_norm.scale": "ln_f.weight",
    "final_norm.shift": "ln_f.bias",
    "out_head.weight": "lm_head.weight",
}
_BOOK_QKV = ("W_query", "W_key", "W_value")
_BOOK_LAYER = re.compile(r"trf_blocks\.(\d+)\.(.+)$")


def _as_config(config: GPTConfig | Mapping[str, Any] | str) -> GPTConfig:
    if isinstance(config, GPTConfig):
        return config
    if isinstance(config, str):
        return get_config(config)
    return GPTConfig(**config)  # the chapter's plain dict (BASE_CONFIG)


def _book_state_from_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling/zip errors do not say which file
        raise CheckpointFileError(
            f"{path}: not a torch.save checkpoint loadable with weights_only=True "
            f"({type(err).__name__}: {err})"
        ) from err
    if isinstance(state, Mapping) and "model_state_dict" in state:
        state = state["model_state_dict"]  # the chapter's model + optimizer checkpoint
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointFileError(f"{path}: does not hold a state dict of tensors")
    return dict(state)


def book_to_course_state(book: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the book's GPTModel state dict into this course's layout (q/k/v fused, masks dropped)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> parts
    for key, tensor in book.items():
        m = _BOOK_LAYER.match(key)
        if m is None:
            out[_BOOK_TOP.get(key, key)] = tensor  # unknown keys pass through: reported later
            continue
        layer, rest = m.groups()
        if rest == "att.mask":
            continue  # the causal-mask buffer: not a weight
        part, _, kind = rest.removeprefix("att.").partition(".")
        if part in _BOOK_QKV:
            qkv.setdefault((layer, kind), {})[part] = tensor
        else:
            out[f"h.{layer}.{_BOOK_BLOCK.get(rest, rest)}"] = tensor
    for (layer, kind), parts in qkv.items():
        missing = [p for p in _BOOK_QKV if p not in parts]
        if missing:
            raise CheckpointMismatchError(
                f"checkpoint is missing 'trf_blocks.{layer}.att.{missing[0]}.{kind}'"
            )
        # c_attn(x).split(D) yields q, k, v in this order.
        out[f"h.{layer}.attn.c_attn.{kind}"] = torch.cat([parts[p] for p in _BOOK_QKV], dim=0)
    return out


def load_book_checkpoint(
    path: str | os.PathLike[str],
    config: GPTConfig | Mapping[str, Any] | str,
    *,
    device: str | torch.device = "cpu",
    allow_nonfinite: bool = False,
) -> GPTModel:
    """A model saved by the book's code (`torch.save(model.state_dict(), "...pth")`), eval mode.

    `config` is the book's config for it: a GPTConfig, a preset name ("gpt2-medium (355M)")
    or the chapter's dict. The file is read with `weights_only=True` (no code runs).
    NaN or infinite weights are refused unless `allow_nonfinite`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    cfg = _as_config(config)
    book_state = _book_state_from_file(path)
    check_finite(book_state, path, allow=allow_nonfinite)  # named as the book names them
    state = book_to_course_state(book_state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    check_config_shapes(cfg, shapes, path)  # before allocating the model
    head, wte = state.get(TIED_KEY), state.get("wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        # The book's untied output head, as after fine-tuning: load it as a separate head.
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    model = GPTModel(cfg)
    try:
        load_state_checked(model, state)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{path}: {err}") from None
    return model.to(device).eval()


def course_to_book_state(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights in the book's GPTModel layout (causal-mask buffers included)."""
    cfg = model.cfg
    back_block = {v: k for k, v in _BOOK_BLOCK.items()}
    back_top = {v: k for k, v in _BOOK_TOP.items()}
    out: dict[str, torch.Tensor] = {}
    ctx = cfg.context_length
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        m = LAYER_KEY.match(name)
        if m is None:
            out[back_top[name]] = t.clone()  # the head gets its own copy, as in the book
            continue
        layer, rest = m.group(1), name[m.end() :]
        if rest.startswith("attn.c_attn."):
            kind = rest.rsplit(".", 1)[1]
            for part, chunk in zip(_BOOK_QKV, t.split(cfg.emb_dim, dim=0), strict=True):
                out[f"trf_blocks.{layer}.att.{part}.{kind}"] = chunk.clone()
        else:
            out[f"trf_blocks.{layer}.{back_block[rest]}"] = t.clone()
    for layer in range(cfg.n_layers):
        # The book registers its causal mask as a persistent buffer: load_state_dict wants it.
        out[f"trf_blocks.{layer}.att.mask"] = torch.triu(torch.ones(ctx, ctx), diagonal=1)
    return out


def save_book_checkpoint(model: GPTModel, path: str | os.PathLike[str]) -> Path:
    """Write `model` as the book's code saves it (a state dict for its GPTModel); atomic."""
    path = Path(path)
    state = course_to_book_state(model)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        fsync_file(tmp)
    return path
