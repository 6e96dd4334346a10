"""Model weights: course checkpoints (safetensors + config) and OpenAI's GPT-2 from the HF Hub.

`save_model`/`load_model` write and read course checkpoints; `load_hf_gpt2` reads a
transformers GPT-2 (`convert_hf_state_dict`/`to_hf_state_dict` convert the layouts),
`load_pretrained` downloads OpenAI's weights and `build_model` picks them or a seeded random
init by preset name. An untied config (`GPTConfig.tie_embeddings=False`, the chapter's separate
`out_head`; `build_model(..., chapter_compat=True)`) loads OpenAI's files, which store the head
once as `wte`, tied and then unties it (`GPTModel.untie_output_head`). The book's own `.pth`
checkpoints are `helpers.book_checkpoints`, which shares the checks and error types below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from helpers.atomic import atomic_path
from helpers.config import HF_REPOS, GPTConfig, get_config, is_pretrained_preset, resolve_model_name
from helpers.model import GPTModel

# --- checks every loader shares (also helpers.book_checkpoints): errors, shapes, keys ---

TIED_KEY = "lm_head.weight"  # shares its tensor with wte.weight; stored once
LAYER_KEY = re.compile(r"h\.(\d+)\.")  # the start of a block's key: h.<layer>.


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: names the first bad key and both shapes."""


class CheckpointFileError(ValueError):
    """A weights file is unreadable or malformed (bad header, bad metadata): names the file."""


class NonFiniteWeightsError(CheckpointFileError):
    """A weights file holds NaN or infinite values: names the file and the first bad tensor."""


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file to disk (before an atomic rename makes it visible)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def first_nonfinite(state: Mapping[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(key, bad count, size) of the first tensor holding NaN or infinity, or None if all are finite."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key, int((~torch.isfinite(tensor)).sum()), tensor.numel()
    return None


def check_finite(
    state: Mapping[str, torch.Tensor], source: str | os.PathLike[str], *, allow: bool = False
) -> None:
    """Refuse weights with NaN or infinite values (NonFiniteWeightsError naming `source`).

    Such a model answers garbage without a word; `allow=True` (loaders' `allow_nonfinite`)
    lets them through, e.g. to inspect what a diverged run saved.
    """
    bad = None if allow else first_nonfinite(state)
    if bad is not None:
        key, count, size = bad
        raise NonFiniteWeightsError(
            f"{source}: tensor {key!r} holds {count} of {size} values that are NaN or infinite "
            "(did the run that saved it diverge?); refusing to load weights that can only "
            "produce garbage (pass allow_nonfinite=True to load them anyway)"
        )


FINGERPRINT_SAMPLES = 4096  # values per tensor that weights_fingerprint reads


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash telling two models' weights apart: names, shapes, sampled values.

    Up to FINGERPRINT_SAMPLES evenly spaced values per tensor, as float32, so it is cheap for
    gpt2-xl and the same on any device; two different inits or fine-tunes never share it.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        flat = tensor.reshape(-1)
        if flat.numel() > FINGERPRINT_SAMPLES:  # integer steps: the same indices everywhere
            steps = torch.arange(FINGERPRINT_SAMPLES, device=flat.device)
            flat = flat[steps * (flat.numel() - 1) // (FINGERPRINT_SAMPLES - 1)]
        digest.update(f"{key}{tuple(tensor.shape)}".encode())
        digest.update(flat.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_config_shapes(
    cfg: GPTConfig, shapes: Mapping[str, tuple[int, ...]], source: str | os.PathLike[str]
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


INIT_SEED = 123  # random-init models are seeded so every run starts from the same weights
# Head counts of OpenAI's four sizes; a bare model.safetensors has no config to read them from.
GPT2_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    # helpers.atomic: readers see the old file or the complete new one, never half of one.
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as err:
            # safetensors reports a full disk as "... I/O error: No space left on device
            # (os error 28)": raise it as the OSError it is, naming the file.
            found = re.search(r"os error (\d+)", str(err))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from err
        fsync_file(tmp)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Re-raise safetensors' errors (which do not say which file) naming the file."""
    try:
        yield
    except SafetensorError as err:
        raise CheckpointFileError(
            f"{path}: not a readable safetensors file ({err}){_pickle_hint(path)}"
        ) from err


def _pickle_hint(path: Path) -> str:
    """Advice when `path` is a torch.save/pickle file: safetensors' own error says 'header too large'."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a bare pickle
        return (
            "; it is a torch.save/pickle file (the book's .pth checkpoints load with "
            "helpers.book_checkpoints.load_book_checkpoint)"
        )
    return ""


def save_model(
    model: GPTModel, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the weights as safetensors with the config (and `metadata`) inside; atomic.

    The stored config records whether the head is tied as the model has it now, so a head
    untied (or tied) by hand after construction reloads the same way.
    """
    path = Path(path)
    # safetensors refuses two names for one tensor: drop the tied head, load_model re-ties it.
    tied = model.tied
    tensors = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not (tied and k == TIED_KEY)
    }
    cfg = dataclasses.replace(model.cfg, tie_embeddings=tied)
    meta = {"format": "pt", "config": json.dumps(cfg.to_dict())}
    for key, value in (metadata or {}).items():
        if key in meta:
            raise ValueError(f"metadata key {key!r} is reserved")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    _atomic_save(tensors, path, meta)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata stored in a safetensors file (config JSON included), keys sorted.

    The file keeps no key order (safetensors reads it back in hash order), so the keys are
    sorted: printed metadata reads the same on every run.
    """
    with _reading(Path(path)), safe_open(str(path), framework="pt") as f:
        return dict(sorted((f.metadata() or {}).items()))


def read_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header (no data loaded)."""
    with _reading(Path(path)), safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _config_from_metadata(path: Path, text: str) -> GPTConfig:
    """The GPTConfig stored as JSON in a checkpoint's metadata; errors name the file."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointFileError(
            f"{path}: the 'config' metadata is not valid JSON ({err})"
        ) from None
    if not isinstance(fields, dict):
        raise CheckpointFileError(f"{path}: the 'config' metadata is not a JSON object")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointFileError(f"{path}: unknown field {unknown[0]!r} in the 'config' metadata")
    try:
        return GPTConfig(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointFileError(f"{path}: invalid 'config' metadata: {err}") from None


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    allow_nonfinite: bool = False,
) -> GPTModel:
    """A course checkpoint written by `save_model`, rebuilt from its stored config (eval mode).

    Weights holding NaN or infinity are refused (NonFiniteWeightsError) unless `allow_nonfinite`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    meta = read_metadata(path)
    if "config" not in meta:
        raise ValueError(
            f"{path.name} has no model config in its metadata; was it written by save_model? "
            "(for transformers/OpenAI files use load_hf_gpt2)"
        )
    cfg = _config_from_metadata(path, meta["config"])
    check_config_shapes(cfg, read_shapes(path), path)  # before allocating anything
    model = GPTModel(cfg)
    with _reading(path):
        state = load_file(str(path))
    check_finite(state, path, allow=allow_nonfinite)
    load_state_checked(model, state)
    return model.to(device).eval()


# Conv1D layers in transformers' GPT-2 store weights as (in, out); nn.Linear wants (out, in).
_TRANSPOSED = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Causal-mask buffers saved by old transformers versions: not weights.
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def convert_hf_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/transpose a transformers GPT-2 state dict into this course's GPTModel layout."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        name = key.removeprefix("transformer.")
        if _BUFFERS.search(name):
            continue
        out[name] = tensor.t().contiguous() if _TRANSPOSED.search(name) else tensor
    return out


def to_hf_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The inverse of `convert_hf_state_dict`: weights for transformers' GPT2LMHeadModel."""
    out = {}
    for name, tensor in model.state_dict().items():
        key = name if name == TIED_KEY else f"transformer.{name}"
        out[key] = tensor.t().contiguous() if _TRANSPOSED.search(name) else tensor
    return out


def _config_from_hf(path: Path, state: Mapping[str, torch.Tensor]) -> GPTConfig:
    """Config from transformers' config.json beside the weights, else from the tensor shapes.

    `tie_word_embeddings` (transformers' default: True) becomes `tie_embeddings`.
    """
    config_json = path / "config.json" if path.is_dir() else path.with_name("config.json")
    vocab_size, emb_dim = state["wte.weight"].shape
    if config_json.is_file():
        hf = json.loads(config_json.read_text(encoding="utf-8"))
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            context_length=hf["n_positions"],
            emb_dim=hf["n_embd"],
            n_heads=hf["n_head"],
            n_layers=hf["n_layer"],
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    if emb_dim not in GPT2_HEADS_BY_WIDTH:
        raise ValueError(
            f"Cannot tell the number of heads of {path.name} (width {emb_dim}): "
            "put transformers' config.json beside it or pass config="
        )
    n_layers = len({m.group(1) for k in state if (m := re.match(r"h\.(\d+)\.", k))})
    return GPTConfig(
        vocab_size=vocab_size,
        context_length=state["wpe.weight"].shape[0],
        emb_dim=emb_dim,
        n_heads=GPT2_HEADS_BY_WIDTH[emb_dim],
        n_layers=n_layers,
    )


def load_hf_gpt2(
    path: str | os.PathLike[str], *, config: GPTConfig | None = None, allow_nonfinite: bool = False
) -> GPTModel:
    """GPTModel from a transformers `save_pretrained` directory or a GPT-2 model.safetensors.

    With an untied config (`tie_embeddings=False`) and a file that stores no separate
    `lm_head.weight` (OpenAI's and transformers' GPT-2 files), the head starts as a copy of
    `wte`, as in the chapter. NaN or infinite weights are refused unless `allow_nonfinite`.
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"No GPT-2 weights at {file} (expected a transformers save_pretrained directory "
            "or a model.safetensors file)"
        )
    with _reading(file):
        state = convert_hf_state_dict(load_file(str(file)))
    if "wte.weight" not in state:
        raise ValueError(f"{file.name} is not a GPT-2 checkpoint: it has no wte.weight")
    cfg = config or _config_from_hf(path, state)
    # A config.json beside the weights could claim any size: check it before allocating.
    check_config_shapes(cfg, {k: tuple(v.shape) for k, v in state.items()}, file)
    check_finite(state, file, allow=allow_nonfinite)
    untie = not cfg.tie_embeddings and TIED_KEY not in state
    model = GPTModel(dataclasses.replace(cfg, tie_embeddings=True) if untie else cfg)
    load_state_checked(model, state)  # checks every tensor's shape
    if untie:
        model.untie_output_head()
    return model.eval()


def load_pretrained(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, tie_embeddings: bool = True
) -> GPTModel:
    """OpenAI's GPT-2 weights for preset `name`, downloaded once from the Hugging Face Hub.

    `tie_embeddings=False` gives the chapter's untied head, starting as a copy of `wte`.
    """
    canonical = resolve_model_name(name)
    if not is_pretrained_preset(canonical):
        raise ValueError(f"{canonical!r} has no pretrained weights; use build_model({name!r})")
    repo = HF_REPOS[canonical]
    from huggingface_hub import hf_hub_download  # here: a heavy import, only for downloads

    try:
        # The hub handles caching, resuming partial downloads, progress bars and HF_HUB_OFFLINE.
        file = hf_hub_download(
            repo, "model.safetensors", cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except Exception as err:  # offline mode, no network, hub error: all mean "no weights"
        raise RuntimeError(
            f"Cannot download the {canonical} weights from the Hugging Face Hub ({repo}): "
            f"{type(err).__name__}: {err}\n"
            "To work offline: load a local copy with helpers.weights.load_hf_gpt2(path) "
            "(a transformers save_pretrained directory or its model.safetensors), or use the "
            "small offline model with COURSE_MODEL=tiny (command-line tools: --model tiny)."
        ) from err
    cfg = dataclasses.replace(get_config(canonical), tie_embeddings=tie_embeddings)
    return load_hf_gpt2(file, config=cfg)


def random_model(name: str, *, seed: int = INIT_SEED, tie_embeddings: bool = True) -> GPTModel:
    """A randomly initialised model of preset `name`, the same on every run (seeded)."""
    cfg = dataclasses.replace(get_config(name), tie_embeddings=tie_embeddings)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state untouched
        torch.manual_seed(seed)
        model = GPTModel(cfg)
    return model.eval()


def build_model(
    name: str, *, pretrained: bool = True, chapter_compat: bool = False
) -> tuple[GPTModel, str]:
    """(model, weights description): OpenAI weights for GPT-2 presets, seeded random init for tiny.

    `chapter_compat=True` (chapter-faithful mode) gives the chapter's untied output head: a
    separate parameter that starts as a copy of `wte` for OpenAI's weights.
    """
    canonical = resolve_model_name(name)
    tie = not chapter_compat
    if pretrained and is_pretrained_preset(canonical):
        return load_pretrained(canonical, tie_embeddings=tie), "OpenAI GPT-2 weights"
    return random_model(canonical, tie_embeddings=tie), "random init"
