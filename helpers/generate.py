"""Text generation: greedy or sampled, KV cache, batches of prompts of different lengths.

`generate_responses` answers instruction entries; `generate_test_responses` does the same
for the test split and records how (model, checkpoint, prompt style, settings) in a
response file (helpers.review.responses).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from helpers.model import GPTModel, eval_mode
from helpers.prompts import extract_response, format_prompt
from helpers.review.responses import RESPONSE_KEY, ResponseSet, save_responses
from helpers.tokenizer import EOS_ID, decode, encode
from helpers.widgets.progress import tqdm


def _fit_prompts(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, context_size: int
) -> list[list[int]]:
    """Cut prompts from the left so prompt + `max_new_tokens` fits the context (with a warning)."""
    if max_new_tokens >= context_size:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) must be smaller than the context size "
            f"({context_size}) to leave room for the prompt"
        )
    budget = context_size - max_new_tokens
    fitted = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
        if len(p) > budget:
            warnings.warn(
                f"prompt {i} has {len(p)} tokens; keeping its last {budget} so that "
                f"{max_new_tokens} new tokens fit the context of {context_size}",
                stacklevel=3,
            )
            p = p[-budget:]
        fitted.append(p)
    return fitted


# Temperatures below this decode greedily: softmax(logits / T) would overflow float32 (NaN
# probabilities) and is the argmax anyway. The same rule as the server's (helpers.serve.api).
MIN_SAMPLING_TEMPERATURE = 1e-5


def is_greedy(temperature: float) -> bool:
    """True when `temperature` means greedy decoding (0, or below MIN_SAMPLING_TEMPERATURE)."""
    return temperature < MIN_SAMPLING_TEMPERATURE


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next-token logits (B, V) -> token ids (B,): argmax, or sampled with temperature/top-k.

    Greedy when `is_greedy(temperature)`; otherwise the logits are shifted so their maximum is
    0 before dividing by the temperature, so the probabilities stay finite.
    """
    if top_k is not None:
        # Keep the k largest logits (the chapter's rule: ties with the k-th also stay).
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if is_greedy(temperature):
        return logits.argmax(dim=-1)
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # <= 0: no overflow when scaled
    probs = torch.softmax(shifted / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def _generate_ids(
    model: GPTModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    use_cache: bool,
    generator: torch.Generator | None,
) -> list[list[int]]:
    """Core loop: new tokens of each (already fitted) prompt, eos excluded."""
    vocab = model.cfg.vocab_size
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or an integer from 1 to {vocab}, got {top_k!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    device = model.wte.weight.device
    n = len(prompts)
    width = max(len(p) for p in prompts)
    # Left padding puts every row's last real token in the last column, so one step
    # appends one column for all rows; the mask hides the pads, position ids skip them.
    pad = 0  # any valid id: padded positions are masked out
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # (B, L)
    mask = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
    )  # (B, L)
    padded = bool((mask == 0).any())
    outputs: list[list[int]] = [[] for _ in range(n)]
    rows = torch.arange(n, device=device)  # original index of each row still generating
    cache = model.new_kv_cache(n, width + max_new_tokens) if use_cache else None

    step_ids = ids
    for _ in range(max_new_tokens):
        if cache is not None:
            positions = (mask.cumsum(-1) - 1)[:, -step_ids.shape[1] :].clamp(min=0)
            logits = model(
                step_ids,
                attention_mask=mask if padded else None,
                position_ids=positions,
                kv_cache=cache,
                last_only=True,
            )
        else:
            logits = model(ids, attention_mask=mask if padded else None, last_only=True)
        next_ids = sample_next_token(logits[:, -1].float(), temperature, top_k, generator)  # (B,)

        done = (
            next_ids == eos_id
            if eos_id is not None
            else torch.zeros_like(next_ids, dtype=torch.bool)
        )
        for row, tok, fin in zip(rows.tolist(), next_ids.tolist(), done.tolist(), strict=True):
            if not fin:
                outputs[row].append(tok)
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            # Drop finished rows so the remaining steps only compute what is still needed.
            rows, next_ids = rows[keep], next_ids[keep]
            ids, mask = ids[keep], mask[keep]
            if cache is not None:
                cache.select(keep)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)  # (B, L + 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_ids = next_ids[:, None]  # (B, 1): with a cache only the new token is fed
    return outputs


def _seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    *,
    use_cache: bool = True,
) -> torch.Tensor:
    """The chapter's `generate`: (B, T) ids -> (B, T + new) ids, prompt included.

    Greedy when `temperature` is 0 (or below MIN_SAMPLING_TEMPERATURE), else sampled
    (optionally from the `top_k` best tokens).
    A row stops at `eos_id`; as in the chapter the eos token itself is not appended, and
    rows that stop early are filled with `eos_id` up to the longest row.
    """
    context_size = min(context_size or model.cfg.context_length, model.cfg.context_length)
    prompts = _fit_prompts(idx.tolist(), max_new_tokens, context_size)
    with eval_mode(model):
        new = _generate_ids(
            model,
            prompts,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            eos_id=eos_id,
            use_cache=use_cache,
            generator=None,  # like the chapter: torch.manual_seed before the call decides
        )
    longest = max(len(t) for t in new)
    fill = eos_id if eos_id is not None else 0
    tail = torch.tensor([t + [fill] * (longest - len(t)) for t in new], dtype=idx.dtype)
    return torch.cat([idx, tail.reshape(len(new), longest).to(idx.device)], dim=1)


def generate_batch(
    model: GPTModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = EOS_ID,
    use_cache: bool = True,
    seed: int | None = None,
) -> list[list[int]]:
    """New tokens (eos excluded) for prompts of different lengths, generated together."""
    if not prompts:
        return []
    fitted = _fit_prompts(prompts, max_new_tokens, model.cfg.context_length)
    with eval_mode(model):
        return _generate_ids(
            model,
            fitted,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            eos_id=eos_id,
            use_cache=use_cache,
            generator=_seeded_generator(seed, model.wte.weight.device),
        )


def generate_responses(
    model: GPTModel,
    entries: Sequence[Mapping[str, str]],
    *,
    style: str = "alpaca",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    chapter_compat: bool = False,
) -> list[str]:
    """The model's response text to each entry's formatted prompt, in the entries' order.

    With `chapter_compat=True` the chapter's section 7.7: the prompt is `format_input(entry)`
    (no response header; the model writes it) and the answer is the new text with the header
    removed and stripped, nothing else cut (`extract_response(..., chapter_compat=True)`).
    The chapter generates one entry at a time: `batch_size=1` also avoids padding.
    """
    prompts = [encode(format_prompt(e, style, chapter_compat=chapter_compat)) for e in entries]
    # Batches of similar length waste little compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="Generating", unit="entry", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        new = generate_batch(
            model,
            [prompts[i] for i in chunk],
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=None if seed is None else seed + start,
        )
        for i, tokens in zip(chunk, new, strict=True):
            # `tokens` are the new tokens only: no prompt to cut from the front.
            responses[i] = extract_response(decode(tokens), style, chapter_compat=chapter_compat)
        bar.update(len(chunk))
    bar.close()
    return responses


def generate_test_responses(
    model: GPTModel,
    entries: Sequence[Mapping[str, Any]],
    path: str | Path | None = None,
    *,
    model_name: str,
    checkpoint: str | None = None,
    style: str = "alpaca",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    response_key: str = RESPONSE_KEY,
    extra_metadata: Mapping[str, Any] | None = None,
    chapter_compat: bool = False,
) -> ResponseSet:
    """Answer every entry with `generate_responses` (greedy by default); save to `path` if given.

    The metadata records model, checkpoint, prompt style and generation settings (with
    `chapter_compat`, the chapter's prompt and extraction), plus `extra_metadata` (e.g. the
    fine-tuning options that produced the model).
    """
    answers = generate_responses(
        model,
        list(entries),
        style=style,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        progress=progress,
        chapter_compat=chapter_compat,
    )
    out = [{**dict(e), response_key: a} for e, a in zip(entries, answers, strict=True)]
    metadata = {
        "model": model_name,
        "checkpoint": checkpoint,
        "prompt_style": style,
        "generation": {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "seed": seed,
            "batch_size": batch_size,
            "decoding": "greedy" if is_greedy(temperature) else "sampling",
            "chapter_compat": chapter_compat,
        },
        "n_entries": len(out),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra_metadata or {}),
    }
    if path is not None:
        save_responses(out, path, metadata=metadata, response_key=response_key)
    return ResponseSet(out, metadata)
