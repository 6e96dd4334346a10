"""Text generation: greedy or sampled, KV cache, batches of prompts of different lengths.

`GenerationSettings` says how (length, temperature, top-k, seed, where to stop, prompt
style). `generate_steps` is the one decoding loop: every caller consumes its steps, to the
end (`generate`, `generate_batch`, `generate_responses`) or token by token as they are made
(`generate_stream`, what the chat server streams from). `generate_responses` answers
instruction entries; `generate_test_responses` does the same for the test split and records
how (model, checkpoint, prompt style, settings) in a response file (helpers.review.responses).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from helpers.model import GPTModel, eval_mode
from helpers.prompts import extract_response, format_prompt, get_style
from helpers.review.responses import RESPONSE_KEY, ResponseSet, save_responses
from helpers.tokenizer import EOS_ID, decode, encode
from helpers.widgets.progress import tqdm

# Temperatures below this decode greedily: softmax(logits / T) would overflow float32 (NaN
# probabilities) and is the argmax anyway. The server's requests follow the same rule.
MIN_SAMPLING_TEMPERATURE = 1e-5

# One step of the decoding loop: (prompt index, new token id) for each prompt still going.
Step = list[tuple[int, int]]


def is_greedy(temperature: float) -> bool:
    """True when `temperature` means greedy decoding (0, or below MIN_SAMPLING_TEMPERATURE)."""
    return temperature < MIN_SAMPLING_TEMPERATURE


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationSettings:
    """How text is generated, checked once when made; `dataclasses.replace` makes a variant.

    Decoding: `max_new_tokens`; greedy when `temperature` is 0, else sampled (from the
    `top_k` best tokens only, if given; the same `seed`, the same tokens); a row stops at
    `eos_id`, which is not returned (None: never early); `use_cache` keeps a KV cache (False
    recomputes every position, the chapter's way: the same tokens, slower);
    `no_repeat_ngram` n never repeats an n-token sequence within a row's new tokens
    (`block_repeated_ngrams`; None: off, the chapter's way). Instruction
    entries (`generate_responses`): the prompt `style`, `chapter_compat` (the chapter's
    prompt and answer extraction) and `batch_size` (prompts generated together).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    seed: int | None = None
    eos_id: int | None = EOS_ID
    use_cache: bool = True
    no_repeat_ngram: int | None = None
    style: str = "alpaca"
    chapter_compat: bool = False
    batch_size: int = 8

    def __post_init__(self) -> None:
        n, t, k, eos = self.max_new_tokens, self.temperature, self.top_k, self.eos_id
        ngram = self.no_repeat_ngram
        number = isinstance(t, (int, float)) and not isinstance(t, bool)
        checks = (
            ("max_new_tokens", _is_int(n) and n >= 0, "an integer >= 0"),
            ("temperature", number and math.isfinite(t) and t >= 0, "a finite number >= 0"),
            ("top_k", k is None or (_is_int(k) and k >= 1), "None or an integer >= 1"),
            ("seed", self.seed is None or _is_int(self.seed), "None or an integer"),
            ("eos_id", eos is None or (_is_int(eos) and eos >= 0), "None or a token id"),
            ("use_cache", isinstance(self.use_cache, bool), "True or False"),
            ("no_repeat_ngram", ngram is None or (_is_int(ngram) and ngram >= 1), "None or >= 1"),
            ("chapter_compat", isinstance(self.chapter_compat, bool), "True or False"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
        )
        for name, ok, what in checks:
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"GenerationSettings.{name} must be {what}, got {value!r}")
        get_style(self.style)  # ValueError listing the valid styles

    @property
    def decoding(self) -> str:
        """'greedy' or 'sampling': what the temperature means."""
        return "greedy" if is_greedy(self.temperature) else "sampling"

    def metadata(self) -> dict[str, Any]:
        """The settings a response file records under "generation"."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "decoding": self.decoding,
            "chapter_compat": self.chapter_compat,
            # Recorded only when on, so files made without it read as before.
            **({"no_repeat_ngram": self.no_repeat_ngram} if self.no_repeat_ngram else {}),
        }


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
                stacklevel=4,  # the caller of generate / generate_batch / generate_stream
            )
            p = p[-budget:]
        fitted.append(p)
    return fitted


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


def block_repeated_ngrams(logits: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """Logits (B, V) with -inf at each token that would repeat an `n`-token sequence in its row.

    `generated` (B, T): the tokens each row generated so far (not the prompt, so copying
    from the prompt stays possible). A row's next token is banned where its last n - 1
    tokens occurred before, followed by that token (Hugging Face's `no_repeat_ngram_size`).
    """
    if generated.shape[1] < n:  # no complete n-gram yet
        return logits
    windows = generated.unfold(1, n, 1)  # (B, T - n + 1, n): every n-gram so far
    prefix = generated[:, generated.shape[1] - n + 1 :]  # (B, n - 1): the last n - 1 tokens
    seen = (windows[:, :, :-1] == prefix[:, None, :]).all(dim=-1)  # (B, T - n + 1)
    hits = torch.zeros_like(logits).scatter_add_(1, windows[:, :, -1], seen.to(logits.dtype))
    return logits.masked_fill(hits > 0, float("-inf"))


def generate_steps(
    model: GPTModel,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    *,
    context_size: int | None = None,
) -> Generator[Step, None, None]:
    """The decoding loop, one step at a time: each step is the (prompt index, token) pairs
    of the prompts still generating (eos ends a prompt and is not returned).

    Prompts are checked and cut to fit `context_size` (default: the model's) here, before
    the first step; the steps run in eval mode and without autograd. Stop early by closing
    the iterator (or dropping it).
    """
    vocab, top_k = model.cfg.vocab_size, settings.top_k
    if top_k is not None and top_k > vocab:
        raise ValueError(f"top_k must be None or an integer from 1 to {vocab}, got {top_k!r}")
    context = min(context_size or model.cfg.context_length, model.cfg.context_length)
    return _steps(model, _fit_prompts(prompts, settings.max_new_tokens, context), settings)


def _left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, L): prompts padded on the left, mask 1 on real tokens."""
    width = max(len(p) for p in prompts)
    pad = 0  # any valid id: padded positions are masked out
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.inference_mode()
def _steps(
    model: GPTModel, prompts: list[list[int]], settings: GenerationSettings
) -> Generator[Step, None, None]:
    """The loop of `generate_steps` for prompts that fit the context."""
    if not prompts:
        return
    device = model.wte.weight.device
    generator = None  # None: the global RNG decides (torch.manual_seed, as in the chapter)
    if settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    # Left padding puts every row's last real token in the last column, so one step
    # appends one column for all rows; the mask hides the pads, position ids skip them.
    ids, mask = _left_pad(prompts, device)  # (B, L)
    width = ids.shape[1]  # ids[:, width:] are the new tokens
    padded = bool((mask == 0).any())
    rows = list(range(len(prompts)))  # the prompt index of each row still going
    cache = None
    if settings.use_cache:
        cache = model.new_kv_cache(len(prompts), ids.shape[1] + settings.max_new_tokens)
    step_ids = ids  # with a cache: the prompt, then only each step's new token
    with eval_mode(model):
        for _ in range(settings.max_new_tokens):
            logits = model(
                step_ids if cache is not None else ids,
                attention_mask=mask if padded else None,
                kv_cache=cache,
                last_only=True,
            )  # (B, 1, V)
            scores = logits[:, -1].float()  # (B, V)
            if settings.no_repeat_ngram is not None:
                scores = block_repeated_ngrams(scores, ids[:, width:], settings.no_repeat_ngram)
            next_ids = sample_next_token(scores, settings.temperature, settings.top_k, generator)
            tokens = next_ids.tolist()
            going = [i for i, t in enumerate(tokens) if t != settings.eos_id]  # eos ends a row
            if not going:
                return
            if len(going) < len(tokens):
                # Drop finished rows so the remaining steps compute only what is needed.
                keep = torch.tensor(going, device=device)
                rows, next_ids = [rows[i] for i in going], next_ids[keep]
                ids, mask = ids[keep], mask[keep]
                if cache is not None:
                    cache.select(keep)
            yield [(row, tokens[i]) for row, i in zip(rows, going, strict=True)]
            ids = torch.cat([ids, next_ids[:, None]], dim=1)  # (B, L + 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_ids = next_ids[:, None]  # (B, 1)


def _collect(steps: Iterator[Step], n: int) -> list[list[int]]:
    """Run `steps` to the end: the new tokens of each of the `n` prompts."""
    outputs: list[list[int]] = [[] for _ in range(n)]
    for step in steps:
        for row, token in step:
            outputs[row].append(token)
    return outputs


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
    (optionally from the `top_k` best tokens) with the global RNG (`torch.manual_seed`).
    A row stops at `eos_id`; as in the chapter the eos token itself is not appended, and
    rows that stop early are filled with `eos_id` up to the longest row.
    """
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        eos_id=eos_id,
        use_cache=use_cache,
    )
    steps = generate_steps(model, idx.tolist(), settings, context_size=context_size)
    new = _collect(steps, len(idx))
    longest = max(len(t) for t in new)
    fill = eos_id if eos_id is not None else 0
    tail = torch.tensor([t + [fill] * (longest - len(t)) for t in new], dtype=idx.dtype)
    return torch.cat([idx, tail.reshape(len(new), longest).to(idx.device)], dim=1)


def generate_batch(
    model: GPTModel, prompts: Sequence[Sequence[int]], settings: GenerationSettings
) -> list[list[int]]:
    """New tokens (eos excluded) for prompts of different lengths, generated together."""
    return _collect(generate_steps(model, prompts, settings), len(prompts))


def generate_stream(
    model: GPTModel, prompt: Sequence[int], settings: GenerationSettings
) -> Generator[int, None, None]:
    """New token ids of one prompt, each as soon as it is made (eos ends it, unreturned).

    The same loop and tokens as `generate_batch(model, [prompt], settings)[0]`; the prompt
    is checked now, not at the first token. Closing the iterator stops the generation.
    """
    steps = generate_steps(model, [prompt], settings)

    def tokens() -> Generator[int, None, None]:
        with closing(steps):  # stopping early leaves eval mode at once, not at garbage collection
            for [(_, token)] in steps:  # one prompt: one (index, token) pair per step
                yield token

    return tokens()


def generate_responses(
    model: GPTModel,
    entries: Sequence[Mapping[str, str]],
    settings: GenerationSettings = GenerationSettings(),
    *,
    progress: bool = True,
    part: tuple[int, int] = (0, 1),
) -> list[str]:
    """The model's response text to each entry's formatted prompt, in the entries' order.

    With `settings.chapter_compat` the chapter's section 7.7: the prompt is
    `format_input(entry)` (no response header; the model writes it) and the answer is the new
    text with the header removed and stripped, nothing else cut (`extract_response(...,
    chapter_compat=True)`). The chapter generates one entry at a time: `batch_size=1` also
    avoids padding. With a `seed`, batch number i is sampled with seed + its first index.
    `part=(index, count)` answers only batches index, index + count, ... ("" elsewhere): the
    ranks of a distributed run split the batches so (helpers.run.distributed.gather_parts).
    """
    style, compat = settings.style, settings.chapter_compat
    prompts = [encode(format_prompt(e, style, chapter_compat=compat)) for e in entries]
    # Batches of similar length waste little compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[str] = [""] * len(prompts)
    starts = range(0, len(order), settings.batch_size)[part[0] :: part[1]]
    total = sum(len(order[s : s + settings.batch_size]) for s in starts)
    bar = tqdm(total=total, desc="Generating", unit="entry", disable=not progress)
    for start in starts:
        chunk = order[start : start + settings.batch_size]
        seed = None if settings.seed is None else settings.seed + start
        new = generate_batch(model, [prompts[i] for i in chunk], replace(settings, seed=seed))
        for i, tokens in zip(chunk, new, strict=True):
            # `tokens` are the new tokens only: no prompt to cut from the front.
            responses[i] = extract_response(decode(tokens), style, chapter_compat=compat)
        bar.update(len(chunk))
    bar.close()
    return responses


def generate_test_responses(
    model: GPTModel,
    entries: Sequence[Mapping[str, Any]],
    path: str | Path | None = None,
    settings: GenerationSettings = GenerationSettings(),
    *,
    model_name: str,
    checkpoint: str | None = None,
    progress: bool = True,
    response_key: str = RESPONSE_KEY,
    extra_metadata: Mapping[str, Any] | None = None,
    answers: Sequence[str] | None = None,
) -> ResponseSet:
    """Answer every entry with `generate_responses` (greedy by default); save to `path` if given.

    The metadata records model, checkpoint, prompt style and generation settings (with
    `chapter_compat`, the chapter's prompt and extraction), plus `extra_metadata` (e.g. the
    fine-tuning options that produced the model). `answers`: already generated (e.g. by
    the ranks of a distributed run); the model is not run.
    """
    if answers is None:
        answers = generate_responses(model, list(entries), settings, progress=progress)
    out = [{**dict(e), response_key: a} for e, a in zip(entries, answers, strict=True)]
    metadata = {
        "model": model_name,
        "checkpoint": checkpoint,
        "prompt_style": settings.style,
        "generation": settings.metadata(),
        "n_entries": len(out),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra_metadata or {}),
    }
    if path is not None:
        save_responses(out, path, metadata=metadata, response_key=response_key)
    return ResponseSet(out, metadata)
