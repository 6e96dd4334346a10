"""The course-wide model switch and the labels on model-dependent outputs."""

from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.runtime import DEFAULT_MODEL, course_model, describe_model, get_device, is_tiny


def test_default_is_the_chapters_gpt2_medium(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COURSE_MODEL", raising=False)
    assert course_model() == DEFAULT_MODEL == "gpt2-medium (355M)"


def test_environment_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURSE_MODEL", "tiny")
    assert course_model() == "tiny" and is_tiny(course_model())
    monkeypatch.setenv("COURSE_MODEL", "gpt2")
    assert course_model() == "gpt2-small (124M)"
    monkeypatch.setenv("COURSE_MODEL", "bogus")
    with pytest.raises(ValueError, match="Unknown model preset 'bogus'"):
        course_model()


def test_tiny_outputs_never_pass_for_gpt2() -> None:
    label = describe_model("tiny")
    assert "random init" in label and "not GPT-2" in label
    assert describe_model("gpt2-medium") == "gpt2-medium (355M), OpenAI GPT-2 weights"
    assert describe_model("gpt2-small", "fine-tuned run.safetensors").endswith(
        "fine-tuned run.safetensors"
    )


def test_device_preference() -> None:
    assert get_device("cpu") == torch.device("cpu")
    assert get_device().type in {"cpu", "cuda", "mps"}


def test_run_folder_and_model_file_are_shared_names() -> None:
    from helpers.runtime import REPO_ROOT, finetuned_path, model_slug, run_dir

    assert model_slug("gpt2-medium") == "gpt2-medium355M"
    assert run_dir("gpt2-medium") == REPO_ROOT / "runs" / "gpt2-medium355M-sft"
    assert finetuned_path("tiny") == REPO_ROOT / "runs" / "tiny-sft" / "tiny-sft.safetensors"


# --- --device: a device this machine has, or one clear error naming the ones it has ---------


@pytest.fixture()
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "mps", "bogus", "cuda:x", "", "meta"])
def test_unavailable_or_unknown_device_is_refused(cpu_only: None, name: str) -> None:
    from helpers.runtime import DeviceError, available_devices, check_device, device_problem

    assert available_devices() == ["cpu"]
    with pytest.raises(DeviceError, match=r"available here: cpu$") as err:
        check_device(name)
    assert repr(name) in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(DeviceError):
        get_device(name)
    assert device_problem(name) == str(err.value)


def test_available_devices_are_accepted(cpu_only: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers.runtime import available_devices, check_device, device_problem

    assert check_device("cpu") == torch.device("cpu") and device_problem(None) is None
    assert device_problem("cpu") is None and get_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_devices() == ["cpu", "cuda", "cuda:0", "cuda:1"]
    assert check_device("cuda:1") == torch.device("cuda:1") and device_problem("cuda") is None
    problem = device_problem("cuda:2") or ""
    assert "'cuda:2' is not available: this machine has 2 CUDA device(s)" in problem
    assert problem.endswith("available here: cpu, cuda, cuda:0, cuda:1")


@pytest.mark.parametrize("command", ["helpers.finetune", "helpers.dpo"])
@pytest.mark.parametrize("name", ["cuda", "bogus"])
def test_device_flag_of_both_commands(
    cpu_only: None, capsys: pytest.CaptureFixture[str], command: str, name: str
) -> None:
    import importlib

    main = importlib.import_module(
        "helpers.finetune" if command == "helpers.finetune" else "helpers.dpo.cli"
    ).main
    with pytest.raises(SystemExit) as info:
        main(["--model", "tiny", "--device", name])
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"argument --device: device '{name}'" in errors[0] and errors[0].endswith(
        "available here: cpu"
    )


def test_check_output_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import helpers.runtime as runtime
    from helpers.runtime import OutputDirError, check_output_file

    target = tmp_path / "new" / "pairs.json"
    assert check_output_file(target, "--output") == target and target.parent.is_dir()
    assert list(target.parent.iterdir()) == []  # the probe is gone, no file made
    with pytest.raises(OutputDirError, match=r"^--cache .*: is a folder"):
        check_output_file(tmp_path, "--cache")
    with pytest.raises(OutputDirError, match="NUL"):
        check_output_file("a\x00b.json", "--output")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match=r"^--output .*file/x\.json: not writable"):
        check_output_file(tmp_path / "file" / "x.json", "--output")

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runtime.tempfile, "TemporaryFile", read_only)
    with pytest.raises(OutputDirError, match=r"not writable \(Read-only file system\)$"):
        check_output_file(target, "--output")
