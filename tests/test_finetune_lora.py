"""`python -m helpers.finetune --lora-rank R` (appendix E, exercise 7.4) end to end in tiny mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from helpers.finetune import ADAPTERS_NAME, main
from helpers.lora.adapters import load_lora_adapters
from helpers.lora.layers import LoRAConfig, count_parameters, merge_lora
from helpers.review.responses import load_responses
from helpers.run.cli import FinetuneSettings, build_parser, settings_from_args
from helpers.run.train_config import TrainConfig
from helpers.weights import load_model, random_model, read_metadata


def _args(data_path: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--data", str(data_path), "--limit", "40", "--batch-size", "4",
        "--epochs", "1", "--eval-freq", "4", "--eval-iter", "1", "--max-new-tokens", "2",
        "--test-limit", "1", "--output-dir", str(out), "--quiet", *extra,
    ]  # fmt: skip


def test_lora_run_trains_only_the_adapters_and_saves_them_and_the_merged_model(
    chapter_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_args(chapter_data_path, out, "--lora-rank", "2", "--lora-alpha", "4")) == 0
    printed = capsys.readouterr().out
    assert "Total trainable parameters after: " in printed and "LoRA rank 2, alpha 4" in printed

    summary = json.loads((out / "summary.json").read_text())
    merged = load_model(out / "tiny-sft.safetensors")  # a plain model file, as without LoRA
    cfg = merged.cfg
    # 16 * r * D per block (c_attn 4rD, attn.c_proj 2rD, c_fc 5rD, mlp.c_proj 5rD)
    trainable = 16 * 2 * cfg.emb_dim * cfg.n_layers
    assert summary["parameters"] == {"trainable": trainable,
                                     "total": count_parameters(merged)[1] + trainable}  # fmt: skip
    assert summary["lora"] == {"rank": 2, "alpha": 4.0, "rank_scaled": False,
                               "targets": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                               "adapters": ADAPTERS_NAME}  # fmt: skip
    assert ADAPTERS_NAME in summary["files"] and summary["settings"]["lora"]["rank"] == 2
    meta = read_metadata(out / "tiny-sft.safetensors")
    assert json.loads(meta["lora"])["rank"] == 2 and "LoRA" in meta["weights"]
    assert "LoRA" in load_responses(out / "instruction-data-with-response.json").metadata["weights"]

    # The base stayed frozen: the run's own seeded init plus the adapter file gives back the
    # saved model exactly, and the adapters did learn something.
    adapter_meta = read_metadata(out / ADAPTERS_NAME)
    assert (adapter_meta["base_model"], adapter_meta["base_seed"]) == ("tiny", "123")
    base = random_model("tiny", seed=TrainConfig().seed)
    adapted = load_lora_adapters(random_model("tiny", seed=TrainConfig().seed), out / ADAPTERS_NAME)
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if n.endswith("lora.B"))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = adapted(tokens)
        torch.testing.assert_close(merged(tokens), logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base(tokens), logits)
    frozen = {n: p for n, p in merged.state_dict().items() if "attn" not in n and "mlp" not in n}
    base_state = merge_lora(adapted).state_dict()
    assert frozen and all(torch.equal(p, base.state_dict()[n]) for n, p in frozen.items())
    assert all(torch.allclose(p, base_state[n], atol=1e-6) for n, p in merged.state_dict().items())

    # The checkpoint holds the adapters: the same LoRA settings resume, others are refused.
    lora = ("--lora-rank", "2", "--lora-alpha", "4", "--epochs", "2", "--resume")
    assert main(_args(chapter_data_path, out, *lora[2:], "--lora-rank", "4")) == 2
    assert "do not fit the model" in capsys.readouterr().err
    assert main(_args(chapter_data_path, out, *lora)) == 0
    # 40 entries -> 34 train -> 8 batches of 4 a epoch; evaluated every 4 steps
    assert pd.read_csv(out / "history.csv")["step"].tolist() == [0, 4, 8, 12]


def test_lora_settings_default_alpha_to_the_rank_and_check_their_values() -> None:
    book = settings_from_args(build_parser().parse_args(["--model", "tiny", "--lora-rank", "16"]))
    assert book.lora == LoRAConfig(rank=16, alpha=16.0, targets=("attn", "mlp"))
    assert settings_from_args(build_parser().parse_args(["--model", "tiny"])).lora is None
    picked = settings_from_args(
        build_parser().parse_args(
            [
                "--model",
                "tiny",
                "--lora-rank",
                "4",
                "--lora-targets",
                "mlp",
                "mlp",
                "--lora-rank-scaled",
            ]
        )
    )
    assert picked.lora == LoRAConfig(rank=4, alpha=4.0, targets=("mlp",), rank_scaled=True)
    assert picked.lora.targets == ("mlp.c_fc", "mlp.c_proj")

    def make(**lora: Any) -> FinetuneSettings:
        config = LoRAConfig(**lora)
        return FinetuneSettings(
            model="tiny", output_dir=Path("out"), train=TrainConfig(), lora=config
        )

    assert make(rank=8, alpha=8, targets=["attn"]).lora == LoRAConfig(8, 8, ("attn",))
    with pytest.raises(TypeError, match="alpha"):
        make(rank=8)
    with pytest.raises(ValueError, match="LoRAConfig.alpha must be > 0"):
        make(rank=8, alpha=float("inf"))
    with pytest.raises(ValueError, match="LoRAConfig.targets"):
        make(rank=8, alpha=8, targets=("head",))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora-alpha", "16"], "error: --lora-alpha needs --lora-rank"),
        (
            ["--lora-rank-scaled", "--lora-targets", "attn"],
            "error: --lora-targets/--lora-rank-scaled needs --lora-rank",
        ),  # fmt: skip
        (["--lora-rank", "0"], "--lora-rank: must be > 0"),
        (["--lora-rank", "2.5"], "--lora-rank: expected a int"),
        (["--lora-rank", "2", "--lora-alpha", "-1"], "--lora-alpha: must be > 0"),
        (["--lora-rank", "2", "--lora-targets", "head"], "--lora-targets: invalid choice"),
    ],
)
def test_bad_lora_flags_are_usage_errors(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
