"""Instruction fine-tuning a GPT model: the course's data, model, training and evaluation code.

The most used names can be imported from `helpers` directly; they are loaded on first use,
so `import helpers` stays fast and `python -m helpers.serve` does not import the trainer.
(`generate` and `train` are modules of the same name: import those functions from them.)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # model switch and configs
    "course_model": "runtime",
    "describe_model": "runtime",
    "get_device": "runtime",
    "GPTConfig": "config",
    "get_config": "config",
    "MODEL_PRESETS": "config",
    # text
    "get_tokenizer": "tokenizer",
    "text_to_token_ids": "tokenizer",
    "token_ids_to_text": "tokenizer",
    "PROMPT_STYLES": "prompts",
    "format_input": "prompts",
    "format_response": "prompts",
    "format_prompt": "prompts",
    "format_example": "prompts",
    "extract_response": "prompts",
    # data
    "load_instruction_data": "data",
    "split_data": "data",
    "DatasetError": "data",
    "InstructionDataset": "batching",
    "collate_fn": "batching",
    "make_loaders": "batching",
    # model
    "GPTModel": "model",
    "build_model": "weights",
    "load_pretrained": "weights",
    "load_hf_gpt2": "weights",
    "save_model": "weights",
    "load_model": "weights",
    "generate_responses": "generate",
    # training
    "TrainConfig": "train_config",
    "calc_loss_batch": "train",
    "calc_loss_loader": "train",
    "plot_losses": "plots",
    # evaluation
    "save_responses": "evaluate",
    "load_responses": "evaluate",
    "score_responses": "evaluate",
    "JudgeClient": "judge",
    "score_entries": "judge",
    "evaluate_mcq": "mcq",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import `name` from its module on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'helpers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"helpers.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
