"""The KV cache for generation: every layer's keys and values, pre-allocated once.

`GPTModel.new_kv_cache(batch_size)` makes one sized for the model; each forward call with
`kv_cache=` stores its new positions, so generating a token costs one position, not the
whole past.
"""

from __future__ import annotations

import torch

from helpers.config import GPTConfig


class KVCache:
    """Pre-allocated keys/values of every layer, so each new token costs one position, not T."""

    def __init__(
        self,
        cfg: GPTConfig,
        batch_size: int,
        max_length: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_length = max_length or cfg.context_length
        if self.max_length > cfg.context_length:
            raise ValueError(
                f"KV cache length {self.max_length} exceeds the context length {cfg.context_length}"
            )
        shape = (batch_size, cfg.n_heads, self.max_length, cfg.emb_dim // cfg.n_heads)
        # One buffer pair per layer, filled left to right; allocating once avoids a
        # torch.cat (a full copy of the past) per generated token.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.length = 0  # positions filled so far

    @property
    def batch_size(self) -> int:
        """Rows currently held."""
        return self.keys[0].shape[0]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's k, v (B, H, T, Dh) for `layer`; return all keys/values (B, H, S, Dh)."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_length} allocated")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions as filled (called once per forward, after all layers)."""
        self.length += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (e.g. drop sequences that finished generating)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
