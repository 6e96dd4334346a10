"""Model weights: course checkpoints (safetensors + config) and OpenAI's GPT-2 from the HF Hub."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from helpers.atomic import atomic_path
from helpers.config import HF_REPOS, GPTConfig, get_config, is_pretrained_preset, resolve_model_name
from helpers.model import GPTModel

TIED_KEY = "lm_head.weight"  # shares its tensor with wte.weight; stored once
INIT_SEED = 123  # random-init models are seeded so every run starts from the same weights
# Head counts of OpenAI's four sizes; a bare model.safetensors has no config to read them from.
GPT2_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: names the first bad key and both shapes."""


class CheckpointFileError(ValueError):
    """A weights file is unreadable or malformed (bad header, bad metadata): names the file."""


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    # helpers.atomic: readers see the old file or the complete new one, never half of one.
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _fsync(tmp)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Re-raise safetensors' errors (which do not say which file) naming the file."""
    try:
        yield
    except SafetensorError as err:
        raise CheckpointFileError(f"{path}: not a readable safetensors file ({err})") from err


def save_model(model: GPTModel, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write the weights as safetensors with the config (and `metadata`) inside; atomic."""
    path = Path(path)
    # safetensors refuses two names for one tensor: drop the tied head, load_model re-ties it.
    tied = model.lm_head.weight is model.wte.weight
    tensors = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not (tied and k == TIED_KEY)
    }
    meta = {"format": "pt", "config": json.dumps(model.cfg.to_dict())}
    for key, value in (metadata or {}).items():
        if key in meta:
            raise ValueError(f"metadata key {key!r} is reserved")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    _atomic_save(tensors, path, meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors file (config JSON included)."""
    with _reading(Path(path)), safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
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


_LAYER = re.compile(r"h\.(\d+)\.")


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

    layers = {int(m.group(1)) for k in shapes if (m := _LAYER.match(k))}
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


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> GPTModel:
    """A course checkpoint written by `save_model`, rebuilt from its stored config (eval mode)."""
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
    """Config from transformers' config.json beside the weights, else from the tensor shapes."""
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


def load_hf_gpt2(path: str | os.PathLike, *, config: GPTConfig | None = None) -> GPTModel:
    """GPTModel from a transformers `save_pretrained` directory or a GPT-2 model.safetensors."""
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
    model = GPTModel(cfg)
    load_state_checked(model, state)  # checks every tensor's shape
    return model.eval()


def load_pretrained(name: str, *, cache_dir: str | os.PathLike | None = None) -> GPTModel:
    """OpenAI's GPT-2 weights for preset `name`, downloaded once from the Hugging Face Hub."""
    canonical = resolve_model_name(name)
    if not is_pretrained_preset(canonical):
        raise ValueError(f"{canonical!r} has no pretrained weights; use build_model({name!r})")
    repo = HF_REPOS[canonical]
    from huggingface_hub import hf_hub_download

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
    return load_hf_gpt2(file, config=get_config(canonical))


def random_model(name: str, *, seed: int = INIT_SEED) -> GPTModel:
    """A randomly initialised model of preset `name`, the same on every run (seeded)."""
    cfg = get_config(name)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state untouched
        torch.manual_seed(seed)
        model = GPTModel(cfg)
    return model.eval()


def build_model(name: str, *, pretrained: bool = True) -> tuple[GPTModel, str]:
    """(model, weights description): OpenAI weights for GPT-2 presets, seeded random init for tiny."""
    canonical = resolve_model_name(name)
    if pretrained and is_pretrained_preset(canonical):
        return load_pretrained(canonical), "OpenAI GPT-2 weights"
    return random_model(canonical), "random init"


# --- the book's own checkpoints: torch.save(model.state_dict()) of the chapter's GPTModel ---

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


def _as_config(config: GPTConfig | Mapping | str) -> GPTConfig:
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


def _untied_config(cfg: GPTConfig, path: Path) -> GPTConfig:
    """The config with an untied output head, if GPTConfig has that option."""
    if "tie_embeddings" not in {f.name for f in dataclasses.fields(GPTConfig)}:
        raise ValueError(
            f"{path}: its out_head differs from tok_emb (the book's untied output head, as "
            "after fine-tuning), but this course's GPTModel ties the head to wte and has no "
            "untied-head option; the checkpoint cannot be loaded without changing its weights"
        )
    return dataclasses.replace(cfg, tie_embeddings=False)  # type: ignore[call-arg,unused-ignore]


def load_book_checkpoint(
    path: str | os.PathLike,
    config: GPTConfig | Mapping | str,
    *,
    device: str | torch.device = "cpu",
) -> GPTModel:
    """A model saved by the book's code (`torch.save(model.state_dict(), "...pth")`), eval mode.

    `config` is the book's config for it: a GPTConfig, a preset name ("gpt2-medium (355M)")
    or the chapter's dict. The file is read with `weights_only=True` (no code runs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    cfg = _as_config(config)
    state = book_to_course_state(_book_state_from_file(path))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    check_config_shapes(cfg, shapes, path)  # before allocating the model
    head, wte = state.get(TIED_KEY), state.get("wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        cfg = _untied_config(cfg, path)
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
        m = _LAYER.match(name)
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


def save_book_checkpoint(model: GPTModel, path: str | os.PathLike) -> Path:
    """Write `model` as the book's code saves it (a state dict for its GPTModel); atomic."""
    path = Path(path)
    state = course_to_book_state(model)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        _fsync(tmp)
    return path
