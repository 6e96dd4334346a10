"""The book's own checkpoints (`torch.save(model.state_dict())` of its GPTModel) load and save.

The reference below is the book's GPTModel (chapter 4, MultiHeadAttention of chapter 3),
written independently of helpers.model, so equal logits prove the key mapping.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from helpers.book_checkpoints import load_book_checkpoint, save_book_checkpoint
from helpers.config import GPTConfig
from helpers.weights import CheckpointFileError, CheckpointMismatchError, NonFiniteWeightsError

# --- the book's model, as in the chapter's previous_chapters.py ---------------------------


class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        mask = torch.triu(torch.ones(context_length, context_length), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
        scores = q @ k.transpose(2, 3)
        mask: torch.Tensor = self.mask  # type: ignore[assignment]  # a registered buffer
        scores.masked_fill_(mask.bool()[:n, :n], -torch.inf)
        weights = self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1))
        context = (weights @ v).transpose(1, 2).contiguous().view(b, n, self.d_out)
        return self.out_proj(context)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.sqrt(torch.tensor(2.0 / torch.pi))
        return 0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        d = cfg["emb_dim"]
        self.att = MultiHeadAttention(
            d, d, cfg["context_length"], cfg["drop_rate"], cfg["n_heads"], cfg["qkv_bias"]
        )
        self.ff = FeedForward(d)
        self.norm1, self.norm2 = LayerNorm(d), LayerNorm(d)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPTModel(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(n, device=idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


# --- tests ---------------------------------------------------------------------------------

BOOK_CFG: dict[str, Any] = {
    "vocab_size": 300,
    "context_length": 32,
    "emb_dim": 48,
    "n_heads": 4,
    "n_layers": 3,
    "drop_rate": 0.1,
    "qkv_bias": True,
}
IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(5))
SUPPORTS_UNTIED = "tie_embeddings" in {f.name for f in dataclasses.fields(GPTConfig)}


def book_model(cfg: dict[str, Any] = BOOK_CFG, *, tied: bool = True, seed: int = 0) -> BookGPTModel:
    torch.manual_seed(seed)
    model = BookGPTModel(cfg)
    for p in model.parameters():  # non-trivial norms and biases, so a swap would show
        nn.init.normal_(p, std=0.1)
    if tied:  # as after the book's load_weights_into_gpt: out_head is a copy of tok_emb
        model.out_head.weight.data.copy_(model.tok_emb.weight.data)
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def test_book_layout_is_the_books(tmp_path: Path) -> None:
    keys = set(book_model().state_dict())
    assert {"tok_emb.weight", "trf_blocks.2.att.W_query.bias", "trf_blocks.0.att.mask"} <= keys
    assert {"trf_blocks.1.ff.layers.2.weight", "final_norm.shift", "out_head.weight"} <= keys


def test_load_book_checkpoint_gives_the_books_logits(tmp_path: Path) -> None:
    book = book_model()
    path = tmp_path / "gpt2-sft.pth"
    torch.save(book.state_dict(), path)
    model = load_book_checkpoint(path, BOOK_CFG)
    assert not model.training
    assert model.cfg == GPTConfig(**BOOK_CFG)
    torch.testing.assert_close(logits(model), logits(book), atol=1e-5, rtol=0)


def test_config_as_gptconfig_and_model_optimizer_checkpoint(tmp_path: Path) -> None:
    book = book_model(BOOK_CFG | {"qkv_bias": False})
    path = tmp_path / "model_and_optimizer.pth"
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": {}}, path)
    model = load_book_checkpoint(path, GPTConfig(**BOOK_CFG | {"qkv_bias": False}))
    torch.testing.assert_close(logits(model), logits(book), atol=1e-5, rtol=0)


def test_untied_book_head(tmp_path: Path) -> None:
    book = book_model(tied=False)
    path = tmp_path / "untied.pth"
    torch.save(book.state_dict(), path)
    if SUPPORTS_UNTIED:
        model = load_book_checkpoint(path, BOOK_CFG)
        assert model.lm_head.weight is not model.wte.weight
        torch.testing.assert_close(logits(model), logits(book), atol=1e-5, rtol=0)
        # And back: the book's model gets its own head again.
        again = BookGPTModel(BOOK_CFG).eval()
        again.load_state_dict(
            torch.load(save_book_checkpoint(model, tmp_path / "b.pth"), weights_only=True)
        )
        torch.testing.assert_close(logits(again), logits(book), atol=1e-5, rtol=0)
    else:
        with pytest.raises(ValueError, match="untied.pth.*out_head differs from tok_emb"):
            load_book_checkpoint(path, BOOK_CFG)


def test_save_book_checkpoint_loads_into_the_books_model(tmp_path: Path) -> None:
    book = book_model(seed=3)
    torch.save(book.state_dict(), tmp_path / "a.pth")
    model = load_book_checkpoint(tmp_path / "a.pth", BOOK_CFG)
    out = save_book_checkpoint(model, tmp_path / "out" / "b.pth")
    assert [p.name for p in out.parent.iterdir()] == ["b.pth"]  # no temp files left
    state = torch.load(out, weights_only=True)
    assert set(state) == set(book.state_dict())
    again = BookGPTModel(BOOK_CFG).eval()
    again.load_state_dict(state, strict=True)  # exactly the book's keys, masks included
    torch.testing.assert_close(logits(again), logits(book), atol=1e-5, rtol=0)
    assert torch.equal(state["trf_blocks.1.att.mask"], book.state_dict()["trf_blocks.1.att.mask"])


def test_config_mismatch_is_reported_before_building(tmp_path: Path) -> None:
    path = tmp_path / "book.pth"
    torch.save(book_model().state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"book\.pth.*n_layers=200000.*n_layers=3"):
        load_book_checkpoint(path, BOOK_CFG | {"n_layers": 200_000})
    with pytest.raises(CheckpointMismatchError, match=r"book\.pth.*emb_dim=64"):
        load_book_checkpoint(path, BOOK_CFG | {"emb_dim": 64})
    with pytest.raises(CheckpointMismatchError, match="qkv_bias"):
        load_book_checkpoint(path, BOOK_CFG | {"qkv_bias": False})


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFileError, match="garbage.pth"):
        load_book_checkpoint(bad, BOOK_CFG)
    with pytest.raises(FileNotFoundError):
        load_book_checkpoint(tmp_path / "missing.pth", BOOK_CFG)
    state = book_model().state_dict()
    del state["trf_blocks.1.att.W_key.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match=r"trf_blocks\.1\.att\.W_key\.weight"):
        load_book_checkpoint(tmp_path / "partial.pth", BOOK_CFG)


def test_non_finite_weights_are_refused_naming_the_books_tensor(tmp_path: Path) -> None:
    state = book_model().state_dict()
    state["trf_blocks.2.att.W_value.weight"][1, 2] = float("nan")
    torch.save(state, tmp_path / "diverged.pth")
    with pytest.raises(
        NonFiniteWeightsError,
        match=r"diverged\.pth: tensor 'trf_blocks\.2\.att\.W_value\.weight' holds 1 of 2304",
    ):
        load_book_checkpoint(tmp_path / "diverged.pth", BOOK_CFG)
    model = load_book_checkpoint(tmp_path / "diverged.pth", BOOK_CFG, allow_nonfinite=True)
    assert torch.isnan(model.state_dict()["h.2.attn.c_attn.weight"]).sum() == 1


def test_readme_states_the_parameter_counts_parameter_counts_gives() -> None:
    # The book's 163,009,536 / 124,412,160 hold only without q/k/v biases; the preset has them.
    import re
    from pathlib import Path

    from helpers.config import get_config
    from helpers.model import parameter_counts

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    sentence = readme[readme.index("`helpers.model.parameter_counts` gives") :].split(")")[0]
    small = get_config("gpt2-small")
    book = dataclasses.replace(small, qkv_bias=False)
    numbers = [int(n.replace(",", "")) for n in re.findall(r"\d{3},\d{3},\d{3}", sentence)]
    assert numbers == [*reversed(parameter_counts(small)), *reversed(parameter_counts(book))]
    assert "qkv_bias=False" in sentence and "gpt2-small" in sentence
