"""GPT-2 built from scratch, with GPT-2's own module names so OpenAI's weights load by name.

Shapes in comments: B batch, T new tokens in this call, S = past + T keys, D emb_dim,
H heads, Dh = D / H head size, V vocabulary. The KV cache used for generation is
`helpers.kv_cache.KVCache`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from helpers.config import GPTConfig
from helpers.kv_cache import KVCache


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block in eval mode (no dropout), then put the model back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused q/k/v projection, as in GPT-2."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate
        self.resid_dropout = nn.Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); `mask` (B, 1, T, S) boolean, True = may attend."""
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # 3 x (B, T, D)
        # (B, T, D) -> (B, H, T, Dh)
        q = q.view(b, t, self.n_heads, -1).transpose(1, 2)
        k = k.view(b, t, self.n_heads, -1).transpose(1, 2)
        v = v.view(b, t, self.n_heads, -1).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, H, S, Dh)
        dropout_p = self.drop_rate if self.training else 0.0
        if mask is None:
            # No padding: a plain causal mask (lets GPUs use the fused flash kernel). With a
            # single new token and a cache, that token may see every key: no mask at all.
            causal = t > 1 and k.shape[2] == t
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(b, t, d)  # (B, H, T, Dh) -> (B, T, D)
        return self.resid_dropout(self.c_proj(out))


class MLP(nn.Module):
    """GPT-2's feed-forward network: D -> 4D -> GELU (tanh approximation) -> D."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form
        # would shift the pretrained model's outputs slightly.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, kv_cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        x = x + self.attn(self.ln_1(x), mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


def _attention_mask(
    attention_mask: torch.Tensor, t: int, past: int, device: torch.device
) -> torch.Tensor:
    """Padding mask (B, S) of 1/0 -> boolean (B, 1, T, S): causal, no padded keys."""
    s = past + t
    if attention_mask.shape[1] != s:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} positions, expected {s} "
            f"({past} cached + {t} new)"
        )
    q_pos = torch.arange(past, s, device=device).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(s, device=device).unsqueeze(0)  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
    # A padding query would otherwise see no key at all and SDPA would return NaN; letting
    # it see itself keeps numbers finite and never reaches real tokens (they skip pad keys).
    return (causal & keys) | (k_pos == q_pos)  # (B, 1, T, S)


def make_position_ids(
    attention_mask: torch.Tensor | None, t: int, past: int, device: torch.device
) -> torch.Tensor:
    """Positions of the T new tokens after `past` cached ones: (B, T), or (1, T) unpadded.

    The one place the course computes them. With a padding mask (B, past + T) a row's
    positions count its real tokens only, so a left-padded prompt starts at 0 like an
    unpadded one; pads get 0 (they are masked out anyway).
    """
    if attention_mask is None:
        return torch.arange(past, past + t, device=device).unsqueeze(0)  # (1, T)
    counts = attention_mask.to(device=device, dtype=torch.long).cumsum(-1) - 1  # (B, past + T)
    return counts[:, past:].clamp(min=0)  # (B, T)


class GPTModel(nn.Module):
    """GPT-2: embeddings, `n_layers` blocks, final LayerNorm, output head `lm_head`.

    The head is tied to `wte` (one matrix, GPT-2's layout) unless `cfg.tie_embeddings` is
    False: then it is a separate parameter, trained on its own, as the chapter's `out_head`.
    """

    def __init__(self, cfg: GPTConfig | Mapping[str, Any]) -> None:
        super().__init__()
        if isinstance(cfg, Mapping):  # the chapter passes a plain dict
            cfg = GPTConfig(**cfg)
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # Weight tying as in GPT-2: the output head reuses the token embedding matrix
            # (the chapter keeps a separate copy: 163M instead of 124M parameters).
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    @property
    def tied(self) -> bool:
        """True when the output head is the token embedding matrix itself."""
        return self.lm_head.weight is self.wte.weight

    def untie_output_head(self) -> GPTModel:
        """Give the model a separate output head that starts as a copy of `wte`; returns self.

        What the chapter does with OpenAI's weights (`out_head.weight = wte`, assigned as its
        own parameter): from here on the head and the embedding train separately. Build an
        optimizer only after calling this (the new head is a new parameter).
        """
        if self.tied:
            weight = self.wte.weight
            self.lm_head.weight = nn.Parameter(
                weight.detach().clone(), requires_grad=weight.requires_grad
            )
            self.cfg = replace(self.cfg, tie_embeddings=False)
        return self

    def set_dropout(self, rate: float) -> GPTModel:
        """Use dropout `rate` from now on (embeddings, attention, residuals); returns self.

        The config records it, so a saved model says how it was trained. Fine-tuning's
        `--drop-rate`, and DPO, which trains without dropout as the book does.
        """
        self.cfg = replace(self.cfg, drop_rate=rate)  # validated like any GPTConfig
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = rate
            elif isinstance(module, CausalSelfAttention):
                module.drop_rate = rate
        return self

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections scaled down."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # LayerNorm scale
                nn.init.ones_(p)
            else:
                # Each block adds two residual branches; scaling their projections by
                # 1/sqrt(2 * n_layers) keeps the residual stream's variance from growing.
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if "c_proj" in name else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def new_kv_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty KV cache matching this model's dtype and device."""
        p = self.wte.weight
        return KVCache(self.cfg, batch_size, max_length, dtype=p.dtype, device=p.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V), or (B, 1, V) with `last_only`.

        `attention_mask` (B, past + T) marks real tokens with 1 and padding with 0 (left
        padding for generation); `position_ids` (B, T) default to each row's count of real
        tokens so far (`make_position_ids`, also with a cache: callers need not pass them);
        `kv_cache` holds earlier positions' keys/values and is advanced by T.
        """
        b, t = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + t > self.cfg.context_length:
            raise ValueError(
                f"Sequence of {past + t} tokens exceeds the model's context length "
                f"{self.cfg.context_length}; cut the input from the left"
            )
        device = input_ids.device
        if position_ids is None:
            position_ids = make_position_ids(attention_mask, t, past, device)  # (B or 1, T)
        mask = None
        if attention_mask is not None:
            mask = _attention_mask(attention_mask, t, past, device)  # (B, 1, T, S)
        elif kv_cache is not None and past > 0 and t > 1:
            ones = torch.ones(b, past + t, dtype=torch.bool, device=device)
            mask = _attention_mask(ones, t, past, device)

        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, D)
        for i, block in enumerate(self.h):
            x = block(x, mask, kv_cache, i)  # (B, T, D)
        if kv_cache is not None:
            kv_cache.advance(t)
        if last_only:
            # Generation needs the next-token logits only; skipping the (T, V) projection
            # of the prompt saves most of the prefill's work for a 50k vocabulary.
            x = x[:, -1:]  # (B, 1, D)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied output head is counted once)."""
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates shared ones


def count_config_parameters(cfg: GPTConfig) -> int:
    """Parameters of a model with config `cfg`, counted without allocating its weights."""
    with torch.device("meta"):  # shapes only: works for gpt2-xl on any laptop
        return count_parameters(GPTModel(cfg))


class ParameterCounts(NamedTuple):
    """A config's parameter count with the output head tied to `wte` and untied."""

    tied: int  # GPT-2's layout: the head is `wte`, counted once
    untied: int  # the chapter's GPTModel: a separate `out_head` of vocab_size x emb_dim


def parameter_counts(cfg: GPTConfig) -> ParameterCounts:
    """Both counts for `cfg` (whatever its `tie_embeddings`), without allocating weights.

    gpt2-small: 124,439,808 tied (OpenAI's GPT-2) and 163,037,184 untied. The book's
    chapter 4 prints 163,009,536 and "considering weight tying" 124,412,160: 27,648 fewer,
    because its GPT_CONFIG_124M has `qkv_bias=False` (12 layers x 3 x 768 q/k/v biases);
    with `qkv_bias=False` these functions give the book's two numbers exactly. Chapters
    5-7 load OpenAI's weights with `qkv_bias=True`, hence the larger pair.
    """
    return ParameterCounts(
        tied=count_config_parameters(replace(cfg, tie_embeddings=True)),
        untied=count_config_parameters(replace(cfg, tie_embeddings=False)),
    )


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes taken by the model's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
