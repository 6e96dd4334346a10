"""What every weights loader shares: the error types and the checks run before loading.

`check_config_shapes` compares a config with a file's tensor shapes before any model is
built; `load_state_checked` loads a state dict after checking every key and shape. Both
`helpers.weights` (course and OpenAI files) and `helpers.book_checkpoints` (the book's own
`.pth` files) use them, and `fsync_file` for their atomic writes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from helpers.config import GPTConfig
from helpers.model import GPTModel

TIED_KEY = "lm_head.weight"  # shares its tensor with wte.weight; stored once
LAYER_KEY = re.compile(r"h\.(\d+)\.")  # the start of a block's key: h.<layer>.


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: names the first bad key and both shapes."""


class CheckpointFileError(ValueError):
    """A weights file is unreadable or malformed (bad header, bad metadata): names the file."""


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file to disk (before an atomic rename makes it visible)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def check_config_shapes(
    cfg: GPTConfig, shapes: Mapping[str, tuple[int, ...]], source: str | os.PathLike
) -> None:
    """Check `cfg` against a course-layout file's tensor shapes before any model is built.

    A config claiming 200,000 layers or a width of 65,536 would otherwise allocate gigabytes
    before the first shape check. Raises CheckpointMismatchError naming `source` and the field.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointMismatchError(f"{source}: has no tensor {key!r}")
        return shapes[key]

    layers = {int(m.group(1)) for k in shapes if (m := LAYER_KEY.match(k))}
    found = {
        "vocab_size": shape("wte.weight")[0],
        "emb_dim": shape("wte.weight")[-1],
        "context_length": shape("wpe.weight")[0],
        "n_layers": max(layers) + 1 if layers else 0,
        "qkv_bias": "h.0.attn.c_attn.bias" in shapes,
    }
    for field, value in found.items():
        if getattr(cfg, field) != value:
            raise CheckpointMismatchError(
                f"{source}: config field {field}={getattr(cfg, field)!r} does not match the "
                f"file's tensors ({field}={value!r})"
            )


def load_state_checked(model: GPTModel, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load `state_dict` into `model` after checking every key and shape; errors name the first bad one."""
    expected = model.state_dict()
    state = dict(state_dict)
    tied = model.lm_head.weight is model.wte.weight
    if tied and TIED_KEY in state and "wte.weight" in state:
        if not torch.equal(state[TIED_KEY], state["wte.weight"]):
            raise CheckpointMismatchError(
                f"{TIED_KEY} differs from wte.weight, but this model ties them (GPT-2 style); "
                "the checkpoint comes from an untied model (e.g. the chapter's separate out_head)"
            )
    if tied:
        state.pop(TIED_KEY, None)
    for key, tensor in expected.items():
        if tied and key == TIED_KEY:
            continue
        if key not in state:
            raise CheckpointMismatchError(
                f"checkpoint is missing {key!r} (model expects shape {tuple(tensor.shape)})"
            )
        if state[key].shape != tensor.shape:
            raise CheckpointMismatchError(
                f"shape mismatch for {key!r}: checkpoint {tuple(state[key].shape)}, "
                f"model {tuple(tensor.shape)}"
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointMismatchError(
            f"checkpoint has unexpected key {unexpected[0]!r} "
            f"(shape {tuple(state[unexpected[0]].shape)}) and {len(unexpected) - 1} more"
        )
    model.load_state_dict(
        state, strict=False
    )  # strictness checked above; only the tied key is absent
