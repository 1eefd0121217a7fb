"""A run's output folder: its PNGs, and manifest.jsonl with one JSON line per image in it.

Written so that an interruption (Ctrl-C, a kill, a lost machine) leaves only whole files: a PNG
is written beside its final name and renamed into place (cli/files.py's write_png), and its
manifest line is appended only then, flushed to disk. An image is complete when its PNG and its
line are both there; a rerun skips complete images and makes the others.

Under torchrun each rank appends to a part of its own, manifest.rank-R.jsonl, so no two
processes write one file; once every rank is done, rank 0 merges the parts into manifest.jsonl
(`merge`). Parts a killed run left are read by the next run and merged at its end.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from pathlib import Path

from PIL import Image

from cli.files import write_png

MANIFEST = "manifest.jsonl"
PART = re.compile(r"manifest\.rank-(\d+)\.jsonl")
# What cli.files.write_png and `write_whole` write before the rename: ".NAME.RANDOM.part".
TEMPORARY = (".*.png.*.part", f".{MANIFEST}.*.part")


class OutputFolder:
    """The folder, as seen by one process of a run (rank `rank` of `world`)."""

    def __init__(self, path: str | Path, rank: int = 0, world: int = 1):
        self.path = Path(path)
        # A single process appends to manifest.jsonl itself; ranks each to their own part.
        self.lines = self.path / (MANIFEST if world == 1 else f"manifest.rank-{rank}.jsonl")

    def parts(self) -> list[Path]:
        """The ranks' manifest parts here, by rank."""
        found = [(int(match.group(1)), path) for path in self.path.glob("manifest.rank-*.jsonl")
                 if (match := PART.fullmatch(path.name))]
        return [path for _, path in sorted(found)]

    def records(self) -> dict[str, dict]:
        """Every manifest line by its image's file: manifest.jsonl's, then each part's (a later line
        for a file replaces an earlier one: it is a newer image). Lines a kill cut short are skipped."""
        records = {}
        for path in [self.path / MANIFEST, *self.parts()]:
            if not path.is_file():
                continue
            for line in path.read_bytes().split(b"\n"):
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict) and isinstance(record.get("file"), str):
                    records[record["file"]] = record
        return records

    def completed(self) -> set[str]:
        """The files of the images complete here: a manifest line, and the PNG in place."""
        return {file for file in self.records() if (self.path / file).is_file()}

    def remove_leftovers(self) -> int:
        """Delete the temporary files of runs killed while writing (never call it while another
        process of the run may be writing); the number deleted."""
        leftovers = [path for pattern in TEMPORARY for path in self.path.glob(pattern)]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def add(self, image: Image.Image, parameters: dict, record: dict) -> None:
        """One complete image: the PNG (with `parameters` in its text chunk) in place, then its
        manifest line (`record`, with the PNG's name under "file")."""
        write_png(image, self.path / record["file"], parameters)
        append_line(self.lines, json.dumps(record, ensure_ascii=False))

    def merge(self) -> int:
        """Rewrite manifest.jsonl whole from itself and the parts: one line per image whose PNG is
        here, ordered by job index; then remove the parts. The number of lines."""
        records = [record for file, record in self.records().items() if (self.path / file).is_file()]
        records.sort(key=lambda record: (_number(record.get("index")), record["file"]))
        if records or (self.path / MANIFEST).exists():     # a run that made nothing leaves no empty manifest
            text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            write_whole(self.path / MANIFEST, text.encode("utf-8"))
        for part in self.parts():
            part.unlink()
        return len(records)


def _number(value) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.inf


def append_line(path: Path, line: str) -> None:
    """Append one line and flush it to disk before returning. A line a kill cut short (no newline
    at the end of the file) is closed first, so it stays alone on its line and is skipped."""
    with open(path, "a+b") as file:
        if file.seek(0, os.SEEK_END) > 0:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                file.write(b"\n")
        file.write(line.encode("utf-8") + b"\n")
        file.flush()
        os.fsync(file.fileno())


def write_whole(path: Path, data: bytes) -> None:
    """Replace `path` by `data` at once: into a new file beside it, then an atomic rename."""
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with open(temporary, "xb") as file:     # 0666 less the umask, as any file the user writes
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
