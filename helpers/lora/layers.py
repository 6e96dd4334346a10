"""LoRA (low-rank adaptation) from scratch, as in the book's appendix E, for the course's GPT-2.

LoRA freezes every pretrained weight W (out, in) and learns a low-rank update instead:
each wrapped nn.Linear computes `linear(x) + scaling * (x @ A @ B)` with A (in, r) and
B (r, out), so a layer trains r * (in + out) numbers instead of in * out.

Scaling: the book multiplies by `alpha` (`alpha * (x @ A @ B)`); this module does the same by
default, so the book's rank=16, alpha=16 behaves as in the book. The LoRA paper (Hu et al.,
2021) and litgpt/peft scale by `alpha / rank` instead, which keeps the update's size roughly
independent of the rank; pass `rank_scaled=True` for that. Each layer's `scaling` attribute
holds the factor actually used.

    model = apply_lora(model, rank=16, alpha=16)   # freezes the base, wraps attn + mlp linears
    # the same: LoRAConfig(rank=16, alpha=16).apply(model); LoRAConfig checks the settings
    print(parameter_report(model))
    ...train as usual (frozen weights get no gradient, so AdamW leaves them alone)...
    save_lora_adapters(model, "adapters.safetensors")   # a few MB instead of the whole model
    merge_lora(model)                                   # plain GPTModel again, e.g. for save_model

GPT-2 projects q, k and v with one fused `c_attn` linear (D -> 3D); LoRA on it is one
rank-r update of the fused matrix, r * (D + 3D) parameters, where the book's separate
W_query/W_key/W_value get three updates, 3 * r * (D + D). Per block this module trains
16 * r * D parameters (c_attn 4rD, attn.c_proj 2rD, c_fc 5rD, mlp.c_proj 5rD).
The tied output head (lm_head = wte) is never wrapped: it stays frozen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from helpers.model import GPTModel
from helpers.run.fields import boolean, positive_int, positive_number, setting, validate

# `targets` names a group or one linear inside a block; a group stands for its linears.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.c_attn", "attn.c_proj"),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
}
_ALL_LINEARS = tuple(name for group in TARGET_GROUPS.values() for name in group)
LORA_TARGETS = ("attn", "mlp")  # the book's choice: every linear of every block


def _resolve_targets(targets: Iterable[str] | str) -> tuple[str, ...]:
    """Groups/linears -> linear names inside a block, in the block's order, no duplicates."""
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    wanted: set[str] = set()
    for name in names:
        if name in TARGET_GROUPS:
            wanted.update(TARGET_GROUPS[name])
        elif name in _ALL_LINEARS:
            wanted.add(name)
        else:
            valid = ", ".join(repr(n) for n in [*TARGET_GROUPS, *_ALL_LINEARS])
            raise ValueError(f"Unknown LoRA target {name!r}; valid targets: {valid}")
    if not wanted:
        raise ValueError("LoRA needs at least one target")
    return tuple(n for n in _ALL_LINEARS if n in wanted)


def _targets_problem(value: Any) -> str | None:
    try:
        _resolve_targets(value)
    except (ValueError, TypeError) as exc:
        return f"must name LoRA targets: {exc}"
    return None


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA's settings (appendix E), validated once: rank, alpha, targets, scaling.

    `targets` may name groups ("attn", "mlp") or single linears ("attn.c_attn"); it is kept as
    the linear names inside a block, in the block's order, so equal settings compare equal.
    Each field carries its command-line flag (--lora-rank, ... in helpers.run.cli).
    """

    rank: int = setting(
        help="freeze the model and train rank-R LoRA adapters (the book: 16)",
        check=positive_int,
        metavar="R",
    )
    alpha: float = setting(
        help="LoRA scaling alpha (default: equal to --lora-rank)",
        check=positive_number,
        metavar="A",
    )
    targets: Sequence[str] = setting(  # a tuple of linear names once validated
        LORA_TARGETS,
        "linears to adapt",
        _targets_problem,
        choices=tuple(TARGET_GROUPS),
        nargs="+",
    )
    rank_scaled: bool = setting(
        False, "scale by alpha / rank (the LoRA paper) instead of alpha (the book)", boolean
    )

    def __post_init__(self) -> None:
        validate(self)
        object.__setattr__(self, "targets", _resolve_targets(self.targets))  # frozen: once, here

    def apply(self, model: GPTModel) -> GPTModel:
        """Freeze every parameter of `model`, then wrap the target linears of every block."""
        blocks = _blocks(model)
        if any(isinstance(m, LinearWithLoRA) for m in model.modules()):
            raise ValueError("model already has LoRA layers; merge_lora(model) first")
        # The book's order: freeze everything, then add the (trainable) LoRA layers.
        for param in model.parameters():
            param.requires_grad = False
        for block in blocks:
            for name in self.targets:
                parent_name, attr = name.split(".")
                parent = block.get_submodule(parent_name)
                linear = getattr(parent, attr)
                if not isinstance(linear, nn.Linear):
                    raise TypeError(f"{name} is a {type(linear).__name__}, expected nn.Linear")
                wrapped = LinearWithLoRA(
                    linear, self.rank, self.alpha, rank_scaled=self.rank_scaled
                )
                setattr(parent, attr, wrapped)
        return model


class LoRALayer(nn.Module):
    """The low-rank update x -> scaling * (x @ A @ B); B starts at zero, so it starts as 0."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        *,
        rank_scaled: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        LoRAConfig(rank=rank, alpha=alpha)  # the same checks as every LoRA setting
        self.rank = rank
        self.alpha = alpha
        self.rank_scaled = rank_scaled
        # Book: alpha; paper/litgpt: alpha / rank (see the module docstring).
        self.scaling = alpha / rank if rank_scaled else alpha
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        # The book's init (nn.Linear's default for its weight): small random A ...
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        # ... and zero B, so the wrapped model's outputs are unchanged until B is trained.
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        # Left to right: (x @ A) is (..., rank), far cheaper than forming A @ B (in, out).
        return self.scaling * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update in nn.Linear's (out, in) layout: W_merged = W + delta_weight()."""
        return (self.scaling * (self.A @ self.B)).T

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.rank}, "
            f"alpha={self.alpha}, scaling={self.scaling:g}"
        )


class LinearWithLoRA(nn.Module):
    """An nn.Linear plus a LoRA update: linear(x) + lora(x)."""

    def __init__(
        self, linear: nn.Linear, rank: int, alpha: float, *, rank_scaled: bool = False
    ) -> None:
        super().__init__()
        self.linear = linear
        w = linear.weight
        self.lora = LoRALayer(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            rank_scaled=rank_scaled,
            device=w.device,
            dtype=w.dtype,
        )

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        return self.linear(x) + self.lora(x)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """The wrapped linear with the update added into its weight (in place)."""
        delta = self.lora.delta_weight().to(self.linear.weight.dtype)
        self.linear.weight += delta  # both (out, in)
        return self.linear


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"expected a GPTModel (transformer blocks in .h), got {type(model).__name__}"
        )
    return blocks


def apply_lora(
    model: GPTModel,
    rank: int,
    alpha: float,
    targets: Iterable[str] | str = LORA_TARGETS,
    *,
    rank_scaled: bool = False,
) -> GPTModel:
    """Freeze every parameter of `model`, then wrap the `targets` linears of every block in place.

    `targets`: "attn" (c_attn, c_proj), "mlp" (c_fc, c_proj) or single linears such as
    "attn.c_attn". Embeddings, LayerNorms and the tied output head stay frozen; only the new
    LoRA A/B matrices train. Returns `model`. See the module docstring for `rank_scaled`;
    `LoRAConfig(...).apply(model)` does the same with settings checked beforehand.
    """
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    return LoRAConfig(rank=rank, alpha=alpha, targets=names, rank_scaled=rank_scaled).apply(model)


def _lora_modules(model: nn.Module) -> dict[str, LinearWithLoRA]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def lora_settings(model: nn.Module) -> LoRAConfig | None:
    """The `LoRAConfig` of the model's LoRA layers; None without any.

    Its `targets` are the wrapped linears inside a block (e.g. "attn.c_attn"). Raises if the
    layers disagree (a model put together by hand), since an adapter file stores one setting.
    """
    modules = _lora_modules(model)
    if not modules:
        return None
    kinds = {(m.lora.rank, m.lora.alpha, m.lora.rank_scaled) for m in modules.values()}
    if len(kinds) > 1:
        raise ValueError(f"LoRA layers use different (rank, alpha, rank_scaled): {sorted(kinds)}")
    rank, alpha, rank_scaled = kinds.pop()
    found = tuple(name.split(".", 2)[2] for name in modules)  # "h.0.attn.c_attn" -> "attn.c_attn"
    return LoRAConfig(rank=rank, alpha=alpha, targets=found, rank_scaled=rank_scaled)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied output head is counted once."""
    params = list(model.parameters())  # parameters() de-duplicates shared tensors
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


def parameter_report(model: nn.Module) -> str:
    """The book's before/after lines: what full fine-tuning would train vs what trains now."""
    trainable, total = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora." in f".{n}")
    base = total - lora  # full fine-tuning trains every base parameter
    lines = [
        f"Total trainable parameters before: {base:,}",
        f"Total trainable parameters after: {trainable:,}",
    ]
    if lora:
        lines.append(f"Total trainable LoRA parameters: {lora:,}")
    share = 100 * trainable / base if base else 0.0
    lines.append(f"Trainable share: {share:.2f}% of {base:,} base parameters")
    return "\n".join(lines)


def merge_lora(model: GPTModel) -> GPTModel:
    """Add each update into its base weight, W += (scaling * A @ B).T, and unwrap; in place.

    The result is a plain GPTModel (same outputs, no LoRA overhead) that helpers.weights'
    save_model/load_model handle. Parameters keep their requires_grad (frozen after
    apply_lora); call `model.requires_grad_(True)` to train the merged model fully.
    """
    for name, module in _lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module.merged_linear())
    return model
