"""The course-wide model switch and the labels on model-dependent outputs."""

import pytest
import torch

from helpers.runtime import DEFAULT_MODEL, course_model, describe_model, get_device, is_tiny


def test_default_is_the_chapters_gpt2_medium(monkeypatch):
    monkeypatch.delenv("COURSE_MODEL", raising=False)
    assert course_model() == DEFAULT_MODEL == "gpt2-medium (355M)"


def test_environment_switch(monkeypatch):
    monkeypatch.setenv("COURSE_MODEL", "tiny")
    assert course_model() == "tiny" and is_tiny(course_model())
    monkeypatch.setenv("COURSE_MODEL", "gpt2")
    assert course_model() == "gpt2-small (124M)"
    monkeypatch.setenv("COURSE_MODEL", "bogus")
    with pytest.raises(ValueError, match="Unknown model preset 'bogus'"):
        course_model()


def test_tiny_outputs_never_pass_for_gpt2():
    label = describe_model("tiny")
    assert "random init" in label and "not GPT-2" in label
    assert describe_model("gpt2-medium") == "gpt2-medium (355M), OpenAI GPT-2 weights"
    assert describe_model("gpt2-small", "fine-tuned run.safetensors").endswith(
        "fine-tuned run.safetensors"
    )


def test_device_preference():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device().type in {"cpu", "cuda", "mps"}


def test_run_folder_and_model_file_are_shared_names():
    from helpers.runtime import REPO_ROOT, finetuned_path, model_slug, run_dir

    assert model_slug("gpt2-medium") == "gpt2-medium355M"
    assert run_dir("gpt2-medium") == REPO_ROOT / "runs" / "gpt2-medium355M-sft"
    assert finetuned_path("tiny") == REPO_ROOT / "runs" / "tiny-sft" / "tiny-sft.safetensors"
