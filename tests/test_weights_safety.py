"""Crafted or broken checkpoint files get one clear error naming the file, before any allocation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers.weights as weights
from helpers.config import GPTConfig
from helpers.model import GPTModel
from helpers.weights import (
    CheckpointFileError,
    CheckpointMismatchError,
    NonFiniteWeightsError,
    load_model,
    read_metadata,
    save_model,
)


@pytest.fixture()
def saved(tiny_config: GPTConfig, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(GPTModel(tiny_config), tmp_path / "ok.safetensors")


def rewrite(path: Path, out: Path, config: object = None, meta_text: str | None = None) -> Path:
    """A copy of checkpoint `path` whose config metadata claims `config` (or raw `meta_text`)."""
    meta = read_metadata(path)
    meta["config"] = meta_text if meta_text is not None else json.dumps(config)
    save_file(load_file(str(path)), str(out), metadata=meta)
    return out


@pytest.fixture()
def no_model_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(weights, "GPTModel", refuse)


@pytest.mark.parametrize(
    ("field", "value"),
    [("emb_dim", 65536), ("n_layers", 200_000), ("vocab_size", 10**9), ("context_length", 10**8)],
)
def test_crafted_config_is_refused_before_allocating(
    saved: Path,
    tmp_path: Path,
    tiny_config: GPTConfig,
    no_model_built: None,
    field: str,
    value: Any,
) -> None:
    cfg = tiny_config.to_dict() | {field: value}
    if field == "emb_dim":
        cfg["n_heads"] = 1
    crafted = rewrite(saved, tmp_path / "crafted.safetensors", cfg)
    with pytest.raises(CheckpointMismatchError, match=rf"crafted\.safetensors.*{field}={value}"):
        load_model(crafted)


def test_malformed_config_metadata_names_the_file(
    saved: Path, tmp_path: Path, tiny_config: GPTConfig
) -> None:
    bad = rewrite(saved, tmp_path / "bad.safetensors", meta_text="{not json")
    with pytest.raises(CheckpointFileError, match=r"bad\.safetensors.*not valid JSON"):
        load_model(bad)
    listed = rewrite(saved, tmp_path / "list.safetensors", meta_text="[1, 2]")
    with pytest.raises(CheckpointFileError, match=r"list\.safetensors.*not a JSON object"):
        load_model(listed)
    extra = rewrite(saved, tmp_path / "extra.safetensors", tiny_config.to_dict() | {"x": 1})
    with pytest.raises(CheckpointFileError, match=r"extra\.safetensors.*unknown field 'x'"):
        load_model(extra)
    negative = rewrite(saved, tmp_path / "neg.safetensors", tiny_config.to_dict() | {"n_heads": -1})
    with pytest.raises(CheckpointFileError, match=r"neg\.safetensors.*n_heads"):
        load_model(negative)


def test_unreadable_safetensors_names_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointFileError, match=r"junk\.safetensors.*not a readable safetensors"):
        load_model(junk)
    with pytest.raises(CheckpointFileError, match="junk.safetensors"):
        read_metadata(junk)


def test_truncated_file_names_the_file(saved: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(CheckpointFileError, match="cut.safetensors"):
        load_model(cut)


def test_hf_config_json_is_checked_before_allocating(
    saved: Path, tmp_path: Path, no_model_built: None
) -> None:
    # A transformers directory whose config.json claims far more layers than the file holds.
    from helpers.weights import load_hf_gpt2

    state = {k: v for k, v in load_file(str(saved)).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"vocab_size": 50257, "n_positions": 128, "n_embd": 32, "n_head": 2, "n_layer": 200000}
        )
    )
    with pytest.raises(CheckpointMismatchError, match=r"model\.safetensors.*n_layers=200000"):
        load_hf_gpt2(tmp_path)


def test_untied_model_keeps_its_head_when_saved(tiny_config: GPTConfig, tmp_path: Path) -> None:
    # save_model drops lm_head.weight only when it is the tied wte.weight.
    model = GPTModel(tiny_config)
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach().clone() + 1)
    path = save_model(model, tmp_path / "untied.safetensors")
    assert "lm_head.weight" in load_file(str(path))


# --- weights holding NaN or infinity: refused, naming the file and the first bad tensor ---


def _with_values(
    path: Path, out: Path, key: str | None, value: float, *, everywhere: bool = False
) -> Path:
    """A copy of checkpoint `path` with `value` in tensor `key` (or in every tensor)."""
    state = load_file(str(path))
    for name in list(state) if everywhere or key is None else [key]:
        state[name] = state[name].clone()
        state[name].view(-1)[0 if name == key and not everywhere else slice(None)] = value
    save_file(state, str(out), metadata=read_metadata(path))
    return out


def test_all_nan_weights_are_refused(saved: Path, tmp_path: Path) -> None:
    broken = _with_values(saved, tmp_path / "nan.safetensors", None, float("nan"), everywhere=True)
    with pytest.raises(
        NonFiniteWeightsError, match=r"nan\.safetensors: tensor '[\w.]+' holds"
    ) as err:
        load_model(broken)
    assert "\n" not in str(err.value) and "allow_nonfinite=True" in str(err.value)
    model = load_model(broken, allow_nonfinite=True)  # to inspect a diverged run's weights
    assert torch.isnan(model.wte.weight).all()


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_one_non_finite_value_names_its_tensor(saved: Path, tmp_path: Path, value: Any) -> None:
    key = "h.1.mlp.c_fc.weight"
    broken = _with_values(saved, tmp_path / "one.safetensors", key, value)
    with pytest.raises(
        NonFiniteWeightsError, match=rf"one\.safetensors: tensor '{key}' holds 1 of"
    ):
        load_model(broken)
    assert isinstance(
        NonFiniteWeightsError("x"), CheckpointFileError
    )  # a ValueError: CLIs print it


def test_non_finite_hf_weights_are_refused(
    saved: Path, tmp_path: Path, tiny_config: GPTConfig
) -> None:
    from helpers.weights import load_hf_gpt2

    state = load_file(str(saved))
    state["h.0.ln_1.bias"][3] = float("nan")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        NonFiniteWeightsError, match=r"model\.safetensors: tensor 'h\.0\.ln_1\.bias'"
    ):
        load_hf_gpt2(tmp_path, config=tiny_config)


def test_pickle_file_is_named_as_such(tmp_path: Path, tiny_config: GPTConfig) -> None:
    pth = tmp_path / "model.pth"
    torch.save(GPTModel(tiny_config).state_dict(), pth)
    with pytest.raises(
        CheckpointFileError, match=r"model\.pth: .*torch\.save/pickle file.*load_book_checkpoint"
    ):
        load_model(pth)
