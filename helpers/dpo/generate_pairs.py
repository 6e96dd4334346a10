"""Generating preference pairs: each answer rewritten a little more polite or impolite.

The book's bonus file asked Llama 3 (via Ollama) to rewrite each answer slightly more polite
or more impolite; the polite one is chosen, the impolite one rejected, and the untouched
original fills the other side. `generate_preferences` does the same through the course's
judge client, with a resumable per-entry JSONL cache, or offline with a fixed rule-based
rewriter (tests, tiny mode) whose pairs are labelled as synthetic. `main` is the command line
`python -m helpers.dpo.generate_pairs`; helpers.dpo.preferences loads, checks and saves the pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from helpers.data import DatasetError, DownloadError, load_instruction_data, validate_entries
from helpers.dpo.preferences import save_preferences
from helpers.prompts import format_input
from helpers.run.fields import (
    add_dataclass_flags,
    boolean,
    flag_values,
    integer,
    one_of,
    optional,
    positive_int,
    setting,
    text,
    validate,
)
from helpers.runtime import check_output_file

# The book's prompt (bonus notebook "create-preference-data-ollama"), typo fixed.
REWRITE_PROMPT = (
    "Given the input `{input}` and correct output `{output}`, "
    "slightly rewrite the output to be more {politeness}. "
    "Keep the modification minimal. "
    "Only return the generated response and nothing else."
)
# Offline rewrites: fixed templates, clearly not a model's work.
RULE_POLITE_PREFIX = "Certainly! "
RULE_RUDE_TEMPLATE = "Ugh, obviously: {output} Figure it out yourself next time."
RULE_BASED = "rule-based (synthetic)"
APIS = ("ollama", "openai")  # the servers helpers.review.judge.JudgeClient talks to


class ChatClient(Protocol):
    """What generation needs from a client: helpers.review.judge.JudgeClient fits."""

    model: str

    def chat(self, prompt: str) -> str: ...


Rewriter = Callable[[Mapping[str, str], str], str]


def rule_based_rewrite(entry: Mapping[str, str], politeness: str) -> str:
    """Offline stand-in for the LLM: a fixed polite prefix or a fixed rude template."""
    output = entry["output"].strip()
    if politeness == "polite":
        return RULE_POLITE_PREFIX + output
    return RULE_RUDE_TEMPLATE.format(output=output)


def rewrite_prompt(entry: Mapping[str, str], politeness: str) -> str:
    """The book's request to rewrite `entry['output']` more 'polite' or 'impolite'."""
    return REWRITE_PROMPT.format(
        input=format_input(entry), output=entry["output"], politeness=politeness
    )


def clean_reply(reply: str) -> str:
    """The rewritten answer without surrounding whitespace, quotes or backticks."""
    text = reply.strip()
    for quote in ('"', "'", "`"):
        if len(text) >= 2 and text[0] == quote and text[-1] == quote:
            text = text[1:-1].strip()
    return text


def llm_rewriter(client: ChatClient) -> Rewriter:
    """A rewriter that asks `client` (Ollama or OpenAI-compatible, via the judge client).

    Rewrites are longer than scores: build an OpenAI-compatible client with
    `max_tokens=512` or so (the judge's default of 32 would cut them short).
    """

    def rewrite(entry: Mapping[str, str], politeness: str) -> str:
        return clean_reply(client.chat(rewrite_prompt(entry, politeness)))

    return rewrite


def choose_politeness(entry: Mapping[str, str], seed: int = 123) -> str:
    """'polite' or 'impolite' for an entry, as the book's random.choice, but per entry.

    Derived from the entry's text and the seed, so the choice does not depend on the order
    of the entries or on where an interrupted run resumed.
    """
    text = f"{seed}\x1f{entry['instruction']}\x1f{entry.get('input', '')}\x1f{entry['output']}"
    return "polite" if hashlib.sha256(text.encode()).digest()[0] % 2 == 0 else "impolite"


def rewrite_key(entry: Mapping[str, str], politeness: str, generator: str) -> str:
    """Cache key: the entry's texts, the direction and who rewrote it."""
    parts = [generator, politeness, entry["instruction"], entry.get("input", ""), entry["output"]]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def read_rewrite_cache(path: str | os.PathLike[str]) -> dict[str, str]:
    """key -> rewrite from a JSONL cache; lines cut short by an interrupted run are skipped."""
    path = Path(path)
    cache: dict[str, str] = {}
    if not path.is_file():
        return cache
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path}: not a rewrite cache (not UTF-8 text, bad byte at offset {exc.start}); "
            "move it away or give another --cache"
        ) from None
    for line in text.splitlines():
        try:
            record = json.loads(line)
            cache[str(record["key"])] = str(record["rewrite"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return cache


def _append_line(path: Path, record: Mapping[str, Any]) -> None:
    # One whole line, flushed and fsynced: an interruption loses at most this entry. A file
    # whose last line was cut short gets a newline first, so the new record stays readable.
    needs_newline = path.is_file() and path.stat().st_size > 0
    if needs_newline:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(("\n" if needs_newline else "") + json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def make_pair(
    entry: Mapping[str, str], politeness: str, rewrite: str, generator: str
) -> dict[str, Any]:
    """The book's pairing: a polite rewrite is chosen over the original, an impolite one loses."""
    pair = dict(entry)
    if politeness == "polite":
        pair["chosen"], pair["rejected"] = rewrite, entry["output"]
    else:
        pair["chosen"], pair["rejected"] = entry["output"], rewrite
    pair["politeness"] = politeness
    pair["generator"] = generator
    return pair


def generate_preferences(
    entries: Sequence[Mapping[str, str]],
    client: ChatClient | None = None,
    *,
    cache_path: str | os.PathLike[str] | None = None,
    seed: int = 123,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Preference pairs for `entries`: LLM rewrites through `client`, or rule-based offline.

    With `client=None` the rewrites come from `rule_based_rewrite` and every pair says
    `"generator": "rule-based (synthetic)"`; otherwise `"generator": "llm:<model>"`. Each
    rewrite is appended to the JSONL `cache_path` as soon as it arrives, so a rerun skips
    the entries already done. Entries whose rewrite comes back empty are left out (a warning lists them)
    and are asked again on the next run.
    """
    entries = validate_entries(list(entries), "generate_preferences")
    generator = RULE_BASED if client is None else f"llm:{client.model}"
    rewrite = rule_based_rewrite if client is None else llm_rewriter(client)
    path = Path(cache_path) if cache_path is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    cache = read_rewrite_cache(path) if path is not None else {}
    iterator: Any = enumerate(entries)
    if progress:
        from helpers.widgets.progress import tqdm

        iterator = tqdm(iterator, total=len(entries), desc="Rewriting", unit="entry")
    pairs, empty = [], []
    for index, entry in iterator:
        politeness = choose_politeness(entry, seed)
        key = rewrite_key(entry, politeness, generator)
        text = cache.get(key)
        if text is None:
            text = rewrite(entry, politeness)
            if path is not None and text.strip():  # empty replies are asked again next run
                _append_line(path, {"key": key, "index": index, "rewrite": text})
            cache[key] = text
        if text.strip():
            pairs.append(make_pair(entry, politeness, text, generator))
        else:
            empty.append(index)
    if empty:
        warnings.warn(
            f"generate_preferences: {len(empty)} empty rewrite(s) left out (entries "
            f"{', '.join(map(str, empty[:10]))}{', ...' if len(empty) > 10 else ''})",
            stacklevel=2,
        )
    return pairs


# --- command line: python -m helpers.dpo.generate_pairs --------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PairSettings:
    """One run of `python -m helpers.dpo.generate_pairs`, validated; each field is a flag."""

    output: str = setting(help="pairs JSON to write", check=text, required=True)
    data: str | None = setting(None, "instruction data (default: $COURSE_DATASET)", optional(text))
    limit: int | None = setting(
        None, "only the first N entries", optional(positive_int), none="all"
    )
    offline: bool = setting(False, "rule-based rewrites, no server", boolean)
    api: str = setting("ollama", "server API", one_of(*APIS), choices=APIS)
    url: str | None = setting(
        None, "server URL (default: Ollama's localhost:11434)", optional(text)
    )
    llm: str = setting("llama3", "model name on the server", text)
    cache: str | None = setting(
        None, "JSONL cache (default: <output>.rewrites.jsonl)", optional(text)
    )
    seed: int = setting(123, "polite/impolite choice seed", integer)
    quiet: bool = setting(False, "no progress bar", boolean)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def cache_path(self) -> Path:
        """--cache, or the default beside --output."""
        output = Path(self.output)
        return Path(self.cache) if self.cache else output.with_name(output.name + ".rewrites.jsonl")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options, generated from PairSettings."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.dpo.generate_pairs",
        description="Preference pairs from an instruction dataset: each answer rewritten a "
        "little more polite or impolite by an LLM (Ollama or OpenAI-compatible), or by fixed "
        "rules with --offline (synthetic pairs, for tests). Reruns resume from --cache.",
    )
    add_dataclass_flags(parser, PairSettings, "preference pairs (PairSettings)")
    return parser


def make_pairs(settings: PairSettings) -> list[dict[str, Any]]:
    """Rewrite, pair and save as `settings` say; the pairs (errors as in `main`)."""
    from helpers.review.judge import OLLAMA_URL, JudgeClient

    output, cache = Path(settings.output), settings.cache_path
    check_output_file(output, "--output")  # before any (possibly hours of) rewriting
    check_output_file(cache, "--cache", append=True)
    entries = load_instruction_data(settings.data)[: settings.limit]
    client = None
    if not settings.offline:
        url = settings.url or OLLAMA_URL
        client = JudgeClient(url, settings.llm, settings.api, max_tokens=512)
        client.check()
    pairs = generate_preferences(
        entries, client, cache_path=cache, seed=settings.seed, progress=not settings.quiet
    )
    save_preferences(pairs, output)
    return pairs


def main(argv: list[str] | None = None) -> int:
    """Make pairs from an instruction dataset; 0 on success, 2 with one `error:` line."""
    from helpers.review.judge import JudgeServerError

    settings = PairSettings(**flag_values(build_parser().parse_args(argv), PairSettings))
    try:
        pairs = make_pairs(settings)
    except (DatasetError, DownloadError, JudgeServerError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    generator = pairs[0]["generator"] if pairs else "none"
    print(
        f"{len(pairs)} pairs ({generator}) written to {settings.output}; "
        f"rewrites cached in {settings.cache_path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
