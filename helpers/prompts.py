"""Prompt styles in one place: how an entry becomes training text, an inference prompt, and back.

Training text and inference prompts are built by the same function, `format_prompt`:
training text is `format_prompt(entry) + entry["output"]`, and at inference the model
continues `format_prompt(entry)`. `extract_response` undoes it after generation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from helpers.tokenizer import EOS_TOKEN


@dataclass(frozen=True)
class PromptStyle:
    """A prompt template: how the instruction/input is shown and what precedes the response."""

    name: str
    render_input: Callable[[Mapping[str, str]], str]
    response_header: str
    # Text that would start another turn; a generated response is cut there.
    turn_starts: tuple[str, ...]


def _alpaca_input(entry: Mapping[str, str]) -> str:
    # The chapter's exact template; "### Input:" only when the entry has an input.
    instruction_text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def _phi3_input(entry: Mapping[str, str]) -> str:
    # The chapter's Phi-3 exercise template.
    input_text = f"\n{entry['input']}" if entry.get("input") else ""
    return f"<|user|>\n{entry['instruction']}" + input_text


PROMPT_STYLES: dict[str, PromptStyle] = {
    "alpaca": PromptStyle(
        name="alpaca",
        render_input=_alpaca_input,
        response_header="\n\n### Response:\n",
        turn_starts=("### Instruction:", "### Input:", "### Response:", "Below is an instruction"),
    ),
    "phi3": PromptStyle(
        name="phi3",
        render_input=_phi3_input,
        response_header="\n<|assistant|>:\n",
        turn_starts=("<|user|>", "<|assistant|>"),
    ),
}


def get_style(style: str | PromptStyle) -> PromptStyle:
    """Look up a prompt style by name ('alpaca', 'phi3'); errors list the valid names."""
    if isinstance(style, PromptStyle):
        return style
    try:
        return PROMPT_STYLES[style.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"Unknown prompt style {style!r}; valid styles: {', '.join(PROMPT_STYLES)}"
        ) from None


def format_input(entry: Mapping[str, str], style: str | PromptStyle = "alpaca") -> str:
    """The instruction (and input, if any) in the chosen style: the chapter's `format_input`."""
    return get_style(style).render_input(entry)


def format_response(entry: Mapping[str, str], style: str | PromptStyle = "alpaca") -> str:
    """The response part of the training text: header plus the entry's output."""
    return get_style(style).response_header + entry["output"]


def format_prompt(entry: Mapping[str, str], style: str | PromptStyle = "alpaca") -> str:
    """Inference prompt: the formatted input followed by the response header."""
    s = get_style(style)
    return s.render_input(entry) + s.response_header


def format_example(entry: Mapping[str, str], style: str | PromptStyle = "alpaca") -> str:
    """Full training text: `format_prompt(entry) + entry['output']`."""
    return format_prompt(entry, style) + entry["output"]


def extract_response(generated_text: str, style: str | PromptStyle = "alpaca") -> str:
    """Cut the model's answer out of generated text (with or without the prompt in front).

    With the prompt in front, takes what follows the prompt's response header; then stops at
    `<|endoftext|>` or at text that would start a new turn of the template (models often
    carry on with an invented "### Instruction: ... ### Response: ..." turn: that is cut).
    """
    s = get_style(style)
    header = s.response_header.strip()
    text = generated_text
    pos = text.find(header)
    if pos != -1:
        before = text[:pos]
        # Turn starts other than the header itself (phi3's "<|assistant|>" is its prefix).
        prompt_starts = [t for t in s.turn_starts if not header.startswith(t)]
        # The header belongs to the prompt when the text opens with the header or with a
        # prompt; otherwise it is part of a new turn the model invented after its answer.
        opening = before.lstrip()
        if not opening or opening.startswith(tuple(prompt_starts)):
            text = text[pos + len(header) :]
    if text.startswith(":"):  # phi3's header is "<|assistant|>:"; tolerate a split colon
        text = text[1:]
    cut = len(text)
    for stop in (EOS_TOKEN, *s.turn_starts):
        pos = text.find(stop)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut].strip()
