"""Prompt styles in one place: how an entry becomes training text, an inference prompt, and back.

Training text and inference prompts are built by the same function, `format_prompt`:
training text is `format_prompt(entry) + entry["output"]`, and at inference the model
continues `format_prompt(entry)`. `extract_response` undoes it after generation.

Chapter-faithful mode (`chapter_compat=True`, off by default; `chapter_compat_from_env()`
reads the $COURSE_CHAPTER_COMPAT switch) prompts and extracts as the chapter's section 7.7
does: the prompt is `format_input(entry)` alone, the model writes the response header
itself, and the answer is the generated text after the prompt with the header removed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

from helpers.tokenizer import EOS_TOKEN


@dataclass(frozen=True)
class PromptStyle:
    """A prompt template: how the instruction/input is shown and what precedes the response."""

    name: str
    render_input: Callable[[Mapping[str, str]], str]
    response_header: str
    # Section headers of the template ("### Input:"): text is cut at a line that is exactly
    # one of them, never where an answer merely mentions one inside a sentence.
    section_headers: tuple[str, ...] = ()
    # Markers that start another turn wherever they appear (special tokens, the preamble).
    turn_markers: tuple[str, ...] = ()

    @property
    def prompt_openers(self) -> tuple[str, ...]:
        """What a prompt of this style starts with (every turn start but the response header)."""
        head = self.response_header.strip()
        starts = (*self.section_headers, *self.turn_markers)
        return tuple(t for t in starts if not head.startswith(t))


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
        section_headers=("### Instruction:", "### Input:", "### Response:"),
        turn_markers=("Below is an instruction",),
    ),
    "phi3": PromptStyle(
        name="phi3",
        render_input=_phi3_input,
        response_header="\n<|assistant|>:\n",
        turn_markers=("<|user|>", "<|assistant|>"),
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


def format_prompt(
    entry: Mapping[str, str], style: str | PromptStyle = "alpaca", *, chapter_compat: bool = False
) -> str:
    """Inference prompt: the formatted input followed by the response header.

    With `chapter_compat=True` the chapter's inference prompt, `format_input(entry)` without
    the header: the fine-tuned model writes "### Response:" itself. Training text always
    includes the header (`format_example`), as in the chapter.
    """
    s = get_style(style)
    if chapter_compat:
        return s.render_input(entry)
    return s.render_input(entry) + s.response_header


def format_example(entry: Mapping[str, str], style: str | PromptStyle = "alpaca") -> str:
    """Full training text: `format_prompt(entry) + entry['output']`."""
    return format_prompt(entry, style) + entry["output"]


def extract_response(
    generated_text: str,
    style: str | PromptStyle = "alpaca",
    *,
    prompt: str | None = None,
    chapter_compat: bool = False,
) -> str:
    """Cut the model's answer out of generated text (with or without the prompt in front).

    With `chapter_compat=True` the chapter's rule and nothing more:
    `generated_text[len(prompt):].replace("### Response:", "").strip()` (the style's header;
    no prompt: nothing is cut from the front). Otherwise, as follows.

    With the prompt in front, takes what follows the prompt's response header, or, when the
    model was given the prompt without a header and wrote none, what follows the prompt
    (pass `prompt=` to remove it exactly; otherwise each prompt section ends at a blank
    line). Then stops at `<|endoftext|>` or where a new turn of the template starts (models
    often carry on with an invented "### Instruction: ... ### Response: ..." turn): at a
    special token anywhere, at a section header only on a line that is exactly the header.
    """
    s = get_style(style)
    if chapter_compat:
        text = generated_text[len(prompt) :] if prompt is not None else generated_text
        return text.replace(s.response_header.strip(), "").strip()
    text = generated_text
    if prompt is not None and text.startswith(prompt):
        text = text[len(prompt) :]
    found = _find_response_header(text, s)
    # The header belongs to the prompt when the text opens with it or with a prompt;
    # otherwise it is part of a new turn the model invented after its answer.
    if found is not None and _is_prompt(text[: found[0]], s):
        text = text[found[1] :]
    elif _opens_prompt(text, s):
        text = _skip_prompt_sections(text, s)
    if text.startswith(":"):  # phi3's header is "<|assistant|>:"; tolerate a split colon
        text = text[1:]
    return text[: _turn_start(text, s)].strip()


@cache
def _header_line(header: str) -> re.Pattern[str]:
    return re.compile(rf"^[ \t]*{re.escape(header)}[ \t]*$", re.MULTILINE)


def _find_response_header(text: str, s: PromptStyle) -> tuple[int, int] | None:
    """(start, end) of the first response header in `text`, or None."""
    head = s.response_header.strip()
    if head in s.section_headers:  # alpaca's "### Response:" counts only as a line of its own
        m = _header_line(head).search(text)
        return (m.start(), m.end()) if m else None
    pos = text.find(head)
    return (pos, pos + len(head)) if pos != -1 else None


def _opens_prompt(text: str, s: PromptStyle) -> bool:
    return text.lstrip().startswith(s.prompt_openers)


def _is_prompt(before_header: str, s: PromptStyle) -> bool:
    return not before_header.strip() or _opens_prompt(before_header, s)


def _skip_prompt_sections(text: str, s: PromptStyle) -> str:
    """Drop a header-less prompt: each section that opens like a prompt, up to a blank line."""
    while _opens_prompt(text, s):
        end = text.lstrip().find("\n\n")
        if end == -1:
            return ""  # nothing but prompt
        text = text.lstrip()[end:]
    return text


def _turn_start(text: str, s: PromptStyle) -> int:
    """Where a new turn of the template starts in `text` (its length when none does)."""
    cut = len(text)
    for marker in (EOS_TOKEN, *s.turn_markers):
        pos = text.find(marker)
        if pos != -1:
            cut = min(cut, pos)
    for header in s.section_headers:
        m = _header_line(header).search(text)
        if m:
            cut = min(cut, m.start())
    return cut


# --- the chapter-faithful switch ---------------------------------------------------------------

CHAPTER_COMPAT_ENV = "COURSE_CHAPTER_COMPAT"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def chapter_compat_from_env(default: bool = False) -> bool:
    """The chapter-faithful switch, $COURSE_CHAPTER_COMPAT (1/0, true/false, on/off; unset: off).

    The one place it is read. Pass the result as `chapter_compat=` to the pieces that have
    one: `GPTConfig(tie_embeddings=not on)` / `GPTModel.untie_output_head()` (the chapter's
    separate output head), `make_loaders` (the chapter's shuffling from the global random
    state), `format_prompt`, `extract_response`, `generate_responses` (its prompt and answer).
    """
    value = os.environ.get(CHAPTER_COMPAT_ENV, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"${CHAPTER_COMPAT_ENV} must be 1 or 0 (also true/false, yes/no, on/off), "
        f"got {os.environ[CHAPTER_COMPAT_ENV]!r}"
    )


def describe_chapter_compat(enabled: bool) -> str:
    """The line notebooks print about the switch: 'chapter-faithful mode: off' (or on)."""
    if enabled:
        return (
            "chapter-faithful mode: on (untied output head, global-RNG shuffling, "
            "header-less prompts)"
        )
    return "chapter-faithful mode: off"
