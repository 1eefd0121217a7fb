"""A run's prompts and its jobs: the prompt file read and checked, each prompt crossed with its
seeds, and each (prompt, seed) given a file name that never changes.

A prompt file is either plain text, one prompt a line, or JSON Lines, one object a line:

    {"prompt": "a red fox in snow", "negative_prompt": "blurry", "seed": 7, "name": "fox"}

with `prompt` required and the other fields optional. JSON Lines is recognised by the extension
.jsonl, or by every non-empty line starting with "{". Blank lines are skipped in both. Every
mistake is refused before any model loads, in one line naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from pipelines.base import MAX_SEED

FIELDS = ("prompt", "negative_prompt", "seed", "name")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")   # a name is part of a file name: no "/" nor ".."
EXAMPLE = '{"prompt": "a red fox in snow", "seed": 2}'


class PromptFileError(ValueError):
    """A mistake in a prompt file: the message names the file and line, and the fix."""


@dataclass(frozen=True)
class PromptLine:
    """One prompt of the file."""
    where: str                  # "FILE:LINE", for messages
    prompt: str
    negative_prompt: str | None = None   # None: the run's
    seed: int | None = None     # this prompt's first seed, in place of the run's
    name: str | None = None     # the file name's label, in place of the prompt's slug


@dataclass(frozen=True)
class Job:
    """One image of a run."""
    index: int                  # position in the run: prompt after prompt, each with its seeds in order
    prompt_index: int           # the prompt's position in the file (blank lines not counted)
    prompt: str
    negative_prompt: str
    seed: int
    file: str                   # the PNG's name in the output folder


def read_prompts(path: str | Path) -> list[PromptLine]:
    """The prompts of a text or JSON Lines file, checked (PromptFileError on the first mistake)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path} is not a file: give a text file with one prompt a line, or JSON Lines "
                              f"with one object a line, like {EXAMPLE}")
    lines = [(number, text) for number, text in enumerate(_decode(path), start=1) if text.strip()]
    if not lines:
        raise PromptFileError(f"{path}: the file holds no prompt: write one prompt a line, or one JSON object "
                              f"a line, like {EXAMPLE}")
    if path.suffix.lower() == ".jsonl" or all(text.lstrip().startswith("{") for _, text in lines):
        prompts = [_json_line(f"{path}:{number}", text) for number, text in lines]
    else:
        prompts = [PromptLine(f"{path}:{number}", text.strip()) for number, text in lines]
    named: dict[str, str] = {}   # name -> where it was first given
    for line in (line for line in prompts if line.name is not None):
        if line.name in named:
            raise PromptFileError(f"{line.where}: name {line.name!r} is already used at {named[line.name]}: give "
                                  "each prompt its own name")
        named[line.name] = line.where
    return prompts


def _decode(path: Path) -> list[str]:
    """The file's lines as text, split on newlines only (so line numbers are an editor's)."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")   # a byte-order mark some editors write
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise PromptFileError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}): save the file as "
                              "UTF-8") from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def _json_line(where: str, text: str) -> PromptLine:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{where}: not valid JSON ({error.msg} at column {error.colno}): write one JSON "
                              f"object a line, like {EXAMPLE}") from None
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: a JSON {type(record).__name__} where an object is needed: write one "
                              f"object a line, like {EXAMPLE}")
    unknown = [key for key in record if key not in FIELDS]
    if unknown:
        raise PromptFileError(f"{where}: unknown field {unknown[0]!r}: the fields are {', '.join(FIELDS)}")
    prompt, negative, seed, name = (record.get(key) for key in FIELDS)
    if not isinstance(prompt, str) or not prompt.strip():
        problem = ("no \"prompt\"" if prompt is None
                   else f"\"prompt\" {json.dumps(prompt)[:40]} is not a non-empty string")
        raise PromptFileError(f"{where}: {problem}: give each line a prompt, like {EXAMPLE}")
    if negative is not None and not isinstance(negative, str):
        raise PromptFileError(f"{where}: \"negative_prompt\" must be a string (or left out)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED):
        raise PromptFileError(f"{where}: seed {json.dumps(seed)[:40]} is not a whole number from 0 to 2**63 - 1: "
                              "give a seed in that range (or leave it out)")
    if name is not None and (not isinstance(name, str) or not NAME.fullmatch(name)):
        raise PromptFileError(f"{where}: name {json.dumps(name)[:70]} cannot be part of a file name: use up to 64 "
                              "letters, digits, '.', '_' and '-', starting with a letter or digit")
    return PromptLine(where, prompt.strip(), negative, seed, name)


def seed_list(seeds: list[int] | None = None, images_per_prompt: int = 1, base_seed: int = 0) -> list[int]:
    """Each prompt's seeds: `seeds` as given, or images_per_prompt seeds from base_seed on."""
    if seeds is None:
        if images_per_prompt < 1:
            raise ValueError(f"images per prompt {images_per_prompt}: give at least 1")
        seeds = list(range(base_seed, base_seed + images_per_prompt))
    if not seeds:
        raise ValueError("no seed given: give at least one")
    seen = set()
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
            raise ValueError(f"seed {seed!r} is not a whole number from 0 to 2**63 - 1")
        if seed in seen:
            raise ValueError(f"seed {seed} is given twice: give each seed once (it would make the same image)")
        seen.add(seed)
    return list(seeds)


def make_jobs(prompts: list[PromptLine], seeds: list[int], negative_prompt: str = "") -> list[Job]:
    """Every prompt with every seed (`seed_list`). A prompt with its own seed s takes s, s+1, ...:
    as many seeds as the others, starting at its own; one without its own negative prompt takes
    `negative_prompt`."""
    digits = max(4, len(str(len(prompts) - 1)))
    jobs = []
    for prompt_index, line in enumerate(prompts):
        own = seeds if line.seed is None else [line.seed + k for k in range(len(seeds))]
        if own[-1] >= MAX_SEED:
            raise PromptFileError(f"{line.where}: seed {line.seed} with {len(seeds)} images per prompt passes "
                                  "2**63 - 1: give a smaller seed")
        label = line.name or slug(line.prompt)
        for seed in own:
            negative = negative_prompt if line.negative_prompt is None else line.negative_prompt
            jobs.append(Job(len(jobs), prompt_index, line.prompt, negative, seed,
                            f"{prompt_index:0{digits}d}-{label}-s{seed}.png"))
    return jobs


def slug(text: str, limit: int = 40) -> str:
    """A short file-name form of a prompt: its ASCII words, lowercased, joined by "-", cut at a
    word (the first word itself cut if it is longer than `limit`); "prompt" if nothing is left."""
    words = re.findall(r"[a-z0-9]+", unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower())
    if not words:
        return "prompt"
    kept = words[0][:limit]
    for word in words[1:]:
        if len(kept) + 1 + len(word) > limit:
            break
        kept += "-" + word
    return kept
