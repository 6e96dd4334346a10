"""Model configurations: the GPT-2 presets the chapter uses plus a `tiny` one for offline runs.

Also each preset's run defaults (`run_defaults`): the chapter's for GPT-2, smaller ones for
`tiny`, defined here once for the command line and the notebooks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a GPT-2 style model; validated on creation."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    # GPT-2 ties its output head to the token embedding (`lm_head.weight is wte.weight`);
    # False gives the chapter's separate, separately trained `out_head` (chapter-faithful mode).
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for field in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{field} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(
                f"GPTConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. to store inside a checkpoint."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        """The inverse of `to_dict`; dicts saved before a field existed get its default."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"GPTConfig: unknown field {unknown[0]!r}")
        return replace(cls(), **values)  # validated by __post_init__ like any GPTConfig


# The chapter's names (with sizes) are canonical; short names are accepted as aliases.
MODEL_PRESETS: dict[str, GPTConfig] = {
    "gpt2-small (124M)": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium (355M)": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large (774M)": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl (1558M)": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
    # Offline/CI stand-in: GPT-2's tokenizer and context with a small body (7.4M parameters,
    # 6.4M of them the tied 50257-token embedding/head, which dominates the cost), trained from
    # a random init in a few CPU minutes (see TINY_RUN_DEFAULTS); dropout 0.1 because that
    # training makes many passes over few examples (GPT-2 presets: 0, as in the chapter).
    "tiny": GPTConfig(emb_dim=128, n_layers=4, n_heads=4, drop_rate=0.1),
}

# Hugging Face Hub repositories holding OpenAI's released weights as safetensors.
HF_REPOS: dict[str, str] = {
    "gpt2-small (124M)": "openai-community/gpt2",
    "gpt2-medium (355M)": "openai-community/gpt2-medium",
    "gpt2-large (774M)": "openai-community/gpt2-large",
    "gpt2-xl (1558M)": "openai-community/gpt2-xl",
}

_ALIASES = {name.split(" ")[0]: name for name in MODEL_PRESETS} | {"gpt2": "gpt2-small (124M)"}


def resolve_model_name(name: str) -> str:
    """Map a preset name or alias ('gpt2-medium', 'gpt2') to its canonical preset name."""
    key = name.strip()
    if key in MODEL_PRESETS:
        return key
    if key.lower() in _ALIASES:
        return _ALIASES[key.lower()]
    aliases = [a for a in _ALIASES if a not in MODEL_PRESETS]
    valid = ", ".join(repr(n) for n in [*MODEL_PRESETS, *aliases])
    raise ValueError(f"Unknown model preset {name!r}; valid names: {valid}")


def get_config(name: str, **overrides: Any) -> GPTConfig:
    """Config of a preset (see MODEL_PRESETS), with optional field overrides."""
    return replace(MODEL_PRESETS[resolve_model_name(name)], **overrides)


def is_pretrained_preset(name: str) -> bool:
    """True for the presets that have OpenAI weights (everything but `tiny`)."""
    return resolve_model_name(name) in HF_REPOS


@dataclass(frozen=True)
class RunDefaults:
    """Run settings that depend on the model: the chapter's, or the tiny preset's.

    Fields named like `TrainConfig` fields (lr, num_epochs, schedule, warmup_steps) are that
    config's defaults for the preset (`helpers.run.train_config.preset_train_config`).
    """

    limit: int | None  # use only the first N dataset entries (None: all)
    lr: float  # AdamW learning rate
    num_epochs: int
    max_new_tokens: int  # length of the test-split responses
    sample_max_new_tokens: int  # length of the per-epoch sample response
    schedule: str = "constant"  # learning-rate schedule (TrainConfig.schedule)
    warmup_steps: int = 0
    eval_freq: int = 5  # evaluate every N optimizer steps...
    eval_iter: int = 5  # ...on this many train and validation batches
    overfit_limit: int = 100  # notebook 04's overfitting demo: this many training entries,
    overfit_epochs: int = 8  # ...this many epochs,
    overfit_lr: float = 5e-5  # ...this learning rate (constant after a short warmup)
    demo_limit: int | None = None  # side-by-side demo runs (notebook 06, exercises): entries
    demo_epochs: int | None = None  # ...and epochs (None: num_epochs)
    # Answers never repeat an n-token sequence (GenerationSettings.no_repeat_ngram); 0: off,
    # the chapter's plain greedy decoding.
    no_repeat_ngram: int = 0


CHAPTER_RUN_DEFAULTS = RunDefaults(
    limit=None, lr=5e-5, num_epochs=2, max_new_tokens=256, sample_max_new_tokens=50
)
# tiny (random init, two CPU cores), chosen by experiment (README, "The model switch"): six
# epochs over the whole training split at a high learning rate with warmup and cosine decay,
# dropout 0.1 in the preset (six passes over 935 examples overfit without it), evaluated on
# the whole 55-entry validation split (7 batches) every 50 steps, and answers that never
# repeat a 3-token sequence (greedy decoding of a model this small loops otherwise). Measured
# on 2 idle cores: 3 min 51 s for the whole `python -m helpers.finetune --model tiny`
# run. Its demo runs (notebooks 04 and 06): all entries, two epochs. Its overfitting demo:
# one batch of 8 entries for 60 steps.
TINY_RUN_DEFAULTS = RunDefaults(
    limit=None,
    lr=5e-3,
    num_epochs=6,
    max_new_tokens=40,
    sample_max_new_tokens=35,
    schedule="cosine",
    warmup_steps=10,
    eval_freq=50,
    eval_iter=7,
    overfit_limit=8,
    overfit_epochs=60,
    overfit_lr=5e-3,
    demo_limit=None,
    demo_epochs=2,
    no_repeat_ngram=3,
)


def run_defaults(name: str) -> RunDefaults:
    """The run defaults of preset `name`: TINY_RUN_DEFAULTS for tiny, else the chapter's."""
    return TINY_RUN_DEFAULTS if resolve_model_name(name) == "tiny" else CHAPTER_RUN_DEFAULTS
